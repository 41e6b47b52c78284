"""Which file gives each role: explicit flags, an all-in-one checkpoint, or a ComfyUI models folder scanned by tensor names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.contract import layout
from engine.contract.errors import UserError
from engine.contract.request import ModelFiles
from engine.formats.weights import (
    ROLE_NAMES,
    ROLES,
    Component,
    component_from,
    describe,
    find_components,
    open_weights,
    uncomputable_format,
)

BUNDLE_MODELS = Path(__file__).resolve().parents[2] / "models"
FLAGS = {
    "transformer": "--transformer",
    "clip": "--clip",
    "t5": "--t5",
    "vae": "--vae",
    "text_encoder": "--text-encoder",
}
# The roles each family needs; the transformer's tensor names say which family a job is.
FAMILY_ROLES = {
    "flux1": ("transformer", "clip", "t5", "vae"),
    "flux2": ("transformer", "text_encoder", "vae"),
}
FAMILY_NAMES = {"flux1": "FLUX.1", "flux2": "FLUX.2 [klein]"}


@dataclass
class ResolvedFiles:
    components: dict[str, Component]  # one per role
    clip_tokenizer: Path | None
    t5_tokenizer: Path | None
    notes: list[str] = field(default_factory=list)  # files of the models folder that were skipped, and why
    family: str = "flux1"  # "flux2": FLUX.2 [klein] (Qwen3 text encoder, FLUX.2 autoencoder)
    text_tokenizer: Path | None = None  # FLUX.2's Qwen3 tokenizer folder


def family_of(component: Component) -> str:
    """A transformer's or autoencoder's family, from its tensor names."""
    from engine.models.flux2 import is_flux2
    from engine.models.flux2_autoencoder import is_flux2_autoencoder

    names = component.shapes()
    if component.role == "transformer":
        return "flux2" if is_flux2(names) else "flux1"
    return "flux2" if is_flux2_autoencoder(names) else "flux1"


def scan_models_dir(models_dir: Path, notes: list[str] | None = None) -> dict[str, list[Component]]:
    """Every weight file under the ComfyUI folders, grouped by the roles its tensor names show. A file that
    cannot be read (truncated, foreign, a malformed header) is skipped with a note in `notes`: one bad file in a
    shared folder never stops the scan."""
    if not models_dir.is_dir():
        raise UserError(f"The models folder {models_dir} does not exist: check --models-dir.")
    found: dict[str, list[Component]] = {role: [] for role in ROLES}
    folders = [models_dir / f for f in layout.ROLE_FOLDERS + layout.FORGE_ROLE_FOLDERS]
    for folder in dict.fromkeys(f.resolve() for f in folders if f.is_dir()):  # "vae" is "VAE" on Windows
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() not in layout.WEIGHT_SUFFIXES or not path.is_file():
                continue
            try:
                components = find_components(open_weights(path))
            except UserError as error:
                if notes is not None:
                    notes.append(f"skipped {path.name}: {error}")
                continue
            except Exception as error:  # a reader's own failure on a hostile file: still only this file
                if notes is not None:
                    notes.append(f"skipped {path.name}: it could not be read ({type(error).__name__})")
                continue
            for role, component in components.items():
                if role in found:  # a ControlNet among the models: given with --controlnet, not picked
                    found[role].append(component)
    return found


def _prefer_single_role(candidates: list[Component]) -> Component:
    """A file of its own for the role beats the same role inside an all-in-one checkpoint, and a file the engine
    computes beats one in a quantization it does not (which, alone, is still taken: loading it says why not)."""
    computable = [c for c in candidates if _computable(c)] or candidates
    standalone = [c for c in computable if c.prefix == "" or len(find_components(c.file)) == 1]
    return (standalone or computable)[0]


def _computable(component: Component) -> bool:
    try:
        return uncomputable_format(component) is None
    except UserError:  # its quantization config is unreadable
        return False


def resolve(files: ModelFiles) -> ResolvedFiles:
    components: dict[str, Component] = {}
    given: dict[str, str] = {}  # role → the path a flag named
    if files.checkpoint:
        checkpoint = open_weights(files.checkpoint)
        components.update(find_components(checkpoint))
        if not components or "controlnet" in components:
            raise UserError(
                f"--checkpoint {files.checkpoint} looks like {describe(checkpoint)}: give a FLUX checkpoint."
            )
    for role in ROLES:
        path = getattr(files, role)
        if path:
            components[role] = component_from(path, role, FLAGS[role])
            given[role] = path
    family = family_of(components["transformer"]) if "transformer" in components else None
    notes: list[str] = []
    clip_tok = Path(files.clip_tokenizer) if files.clip_tokenizer else None
    t5_tok = Path(files.t5_tokenizer) if files.t5_tokenizer else None
    if files.models_dir:
        models_dir = Path(files.models_dir)
        scanned = scan_models_dir(models_dir, notes)
        if not any(scanned.values()):
            raise UserError(
                f"The models folder {models_dir} holds no FLUX model files: download them "
                "(python -m bootstrap download) or point --models-dir at a ComfyUI models folder."
            )
        if family is None and scanned["transformer"]:
            components["transformer"] = _prefer_single_role(scanned["transformer"])
            family = family_of(components["transformer"])
        for role in ROLES:
            candidates = scanned[role]
            if role == "vae" and family is not None:  # the autoencoder of the transformer's family
                candidates = [c for c in candidates if family_of(c) == family] or candidates
            if role not in components and candidates and role in FAMILY_ROLES[family or "flux1"]:
                components[role] = _prefer_single_role(candidates)
        clip_tok = clip_tok or models_dir / layout.CLIP_TOKENIZER
        t5_tok = t5_tok or models_dir / layout.T5_TOKENIZER
    family = family or "flux1"
    _check_family(components, family, given)
    missing = [role for role in FAMILY_ROLES[family] if role not in components]
    if missing:
        where = f"The models folder {files.models_dir} lacks" if files.models_dir else "The files given lack"
        wanted = [f"{ROLE_NAMES[r]} ({FLAGS[r]})" for r in missing]
        listed = wanted[0] if len(wanted) == 1 else ", ".join(wanted[:-1]) + " and " + wanted[-1]
        raise UserError(f"{where} {listed}: add the missing file or give it with its flag.")
    # Files given one by one: the tokenizers the bootstrap downloads into the bundle's own models folder.
    clip_tok = clip_tok or _bundled_tokenizer(layout.CLIP_TOKENIZER)
    t5_tok = t5_tok or _bundled_tokenizer(layout.T5_TOKENIZER)
    text_tok = Path(files.text_tokenizer) if files.text_tokenizer else None
    if files.models_dir and text_tok is None:
        text_tok = Path(files.models_dir) / layout.QWEN3_TOKENIZER
    text_tok = text_tok or _bundled_tokenizer(layout.QWEN3_TOKENIZER)
    used = {role: components[role] for role in FAMILY_ROLES[family]}
    return ResolvedFiles(used, clip_tok, t5_tok, notes, family, text_tok)


def _check_family(components: dict[str, Component], family: str, given: dict[str, str]) -> None:
    """Files named by flags that belong to the other family, and an autoencoder of the other family, are
    refused in one sentence naming the file."""
    transformer = components.get("transformer")
    if transformer is None:
        return
    model = f"the {FAMILY_NAMES[family]} transformer {transformer.file.path.name}"
    for role, path in given.items():
        if role not in FAMILY_ROLES[family]:
            wanted = " and ".join(FLAGS[r] for r in FAMILY_ROLES[family] if r not in ("transformer", "vae"))
            raise UserError(
                f"{FLAGS[role]} {path} is {ROLE_NAMES[role]}, which {model} does not use: give {wanted} instead."
            )
    vae = components.get("vae")
    if vae is not None and family_of(vae) != family:
        other = FAMILY_NAMES[family_of(vae)]
        raise UserError(
            f"The autoencoder {vae.file.path} is {other}'s, which does not fit {model}: "
            f"give the {FAMILY_NAMES[family]} autoencoder with --vae."
        )


def _bundled_tokenizer(name: str) -> Path | None:
    folder = BUNDLE_MODELS / name
    return folder if folder.is_dir() else None


def controlnet_component(path: str, models_dir: str | None) -> Component:
    """The ControlNet a --controlnet names: the file itself, or a bare name looked up in
    <models-dir>/controlnet/ (with or without its suffix); one sentence when it is missing or not a ControlNet."""
    candidates = [Path(path)]
    if models_dir and Path(path).name == path:
        folder = Path(models_dir) / layout.CONTROLNET
        candidates += [folder / path, *(folder / (path + suffix) for suffix in layout.WEIGHT_SUFFIXES)]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        where = (
            f" (nor in {Path(models_dir) / layout.CONTROLNET})"
            if models_dir and Path(path).name == path
            else ""
        )
        raise UserError(f"--controlnet {path} does not exist{where}: give the path of a ControlNet file.")
    return component_from(found, "controlnet", "--controlnet")
