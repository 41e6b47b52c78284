"""The first-start wizard: what the machine has, which preset suits it, reuse of another install's models, the
token only when a gated file is chosen, then the downloads. The logic is plain functions the TUI's models
screen can call; `run_wizard` is the terminal version (before the TUI exists)."""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from bootstrap import fit
from bootstrap.config_file import PROJECT_ROOT, ProjectConfig
from bootstrap.disk import usable_folder
from bootstrap.errors import BootstrapError, InputEnded
from bootstrap.hardware import Platform, SystemInfo, detect_system
from bootstrap.hub import TOKEN_SETTINGS_PAGE, endpoint, find_token, repo_page, token_file
from bootstrap.manifest import Manifest, ModelFile, Preset, load_manifest
from bootstrap.reuse import ExistingFolder, candidate_places, classify, find_existing
from bootstrap.untrusted import printable, write_private
from engine.runtime.estimate import duration
from engine.runtime.speed import Speed

DEFAULT_MAX_MINUTES = 5.0  # the time per image a recommendation stays under, unless told otherwise
CPU_MAX_STEPS = 8  # without a speed figure: on the CPU only few-step models are recommended


# ---- the logic (shared with the TUI) ----


def runnable(manifest: Manifest) -> list[Preset]:
    """The presets that bring a model to run (not the tokenizers alone), in the manifest's order."""
    return [p for p in manifest.presets.values() if p.files and any(fit.preset_parts(manifest, p))]


def verdicts(manifest: Manifest, system: SystemInfo, speed: Speed | None) -> dict[str, fit.Verdict]:
    return {p.name: fit.verdict(manifest, p, system, speed) for p in runnable(manifest)}


def recommend(
    manifest: Manifest,
    system: SystemInfo,
    speed: Speed | None = None,
    max_minutes: float = DEFAULT_MAX_MINUTES,
    found: dict[str, fit.Verdict] | None = None,
) -> tuple[Preset, str]:
    """The best-quality preset (lowest rank) that fits and makes an image within `max_minutes`, and why, in
    one line. Slower than that everywhere: the fastest that fits. Nothing fits: the one needing least RAM."""
    found = verdicts(manifest, system, speed) if found is None else found
    ranked = sorted((v for v in found.values() if v.preset.rank > 0), key=lambda v: v.preset.rank)
    ranked = ranked or list(found.values())
    fitting = [v for v in ranked if v.fits]
    timed = [v for v in fitting if v.image_seconds is not None]
    limit = max_minutes * 60
    if timed:
        quick = [v for v in timed if v.image_seconds <= limit]
        if quick:
            best = quick[0]
            why = (
                f"the best quality that fits this machine and makes an image in about "
                f"{duration(best.image_seconds)} (within {max_minutes:g} min)"
            )
            better = next((v for v in fitting if v.preset.rank < best.preset.rank), None)
            if better is not None and better.image_seconds is not None:
                why += f"; {better.preset.name} fits too but takes about {duration(better.image_seconds)}"
            return best.preset, why
        best = min(timed, key=lambda v: v.image_seconds)
        return best.preset, (
            f"nothing here makes an image within {max_minutes:g} min; this is the fastest that fits "
            f"(about {duration(best.image_seconds)})"
        )
    if fitting:
        if system.gpu is None:  # no speed measured: a few-step model, on the CPU
            fitting = [v for v in fitting if v.preset.steps <= CPU_MAX_STEPS] or fitting
        return fitting[0].preset, "the best quality that fits this machine (its speed is not measured yet)"
    if not ranked:
        raise BootstrapError("The manifest has no preset with a model to run: check --manifest.")
    least = min(
        ranked,
        key=lambda v: (v.estimate.placement.ram_needed if v.estimate else 0, v.preset.disk_gb),
    )
    return least.preset, "nothing fits this machine well; this one needs the least memory"


def explain(verdict: fit.Verdict, manifest: Manifest) -> str:
    """One line: what it is, what it costs, the trade-off, and how it runs on this machine."""
    preset = verdict.preset
    account = (
        "needs a Hugging Face token"
        if any(f.gated for f in manifest.preset_files(preset.name))
        else "no account"
    )
    mark = "fits" if verdict.fits else "tight"
    return f"{preset.title}: {preset.disk_gb:g} GB, {account}; {preset.note} [{mark}: {verdict.text()}]"


def describe_system(system: SystemInfo) -> str:
    gpu = (
        f"{system.gpu.name} with {system.vram_gb:.1f} GB VRAM"
        if system.gpu
        else "no NVIDIA GPU (the CPU will do the work)"
    )
    return f"This machine: {gpu}, {system.ram_gb:.1f} GB RAM, {system.free_disk_gb:.0f} GB free disk."


@dataclass
class Selection:
    """What the wizard settled on: the files to fetch, and those another install already has."""

    preset: Preset
    to_download: list[ModelFile]
    reused: dict[str, Path] = field(default_factory=dict)  # file name -> where it already is

    @property
    def gated(self) -> list[ModelFile]:
        return [f for f in self.to_download if f.gated]

    def download_gb(self) -> float:
        return sum(f.size or 0 for f in self.to_download) / 1e9


def select(manifest: Manifest, preset: Preset, reuse: ExistingFolder | None) -> Selection:
    files = manifest.preset_files(preset.name)
    reused: dict[str, Path] = {}
    missing: list[ModelFile] = []
    for f in files:
        there = reuse.find(f) if reuse else None
        if there is not None:
            reused[f.name] = there
        else:
            missing.append(f)
    return Selection(preset, missing, reused)


def licence_advice(files: list[ModelFile], base: str) -> str:
    pages = sorted({repo_page(base, f.repo) for f in files})
    return (
        f"{', '.join(f.name for f in files)} {'is' if len(files) == 1 else 'are'} gated: open {', '.join(pages)}, "
        f"log in and accept the licence, then create a read token at {TOKEN_SETTINGS_PAGE}."
    )


def config_values(
    models_dir: Path, reuse: ExistingFolder | None, system: SystemInfo, preset: Preset, root: Path
) -> dict:
    """The keys written to config.toml (the TUI reads the same ones)."""
    try:
        shown = str(models_dir.resolve().relative_to(root.resolve()))
    except ValueError:
        shown = str(models_dir.resolve())
    values: dict = {"models_dir": shown, "device": "cuda" if system.gpu else "cpu", "preset": preset.name}
    if reuse is not None:
        # the engine and the TUI read ComfyUI's and Forge's folder names alike
        values["extra_model_paths"] = [str(reuse.path)]
    if reuse is not None and reuse.kind != "ComfyUI":
        values["extra_model_folders"] = reuse.config_folders()  # Forge's folders by our folder names
    return values


# ---- the terminal version ----


class WizardIO(Protocol):
    def say(self, text: str) -> None: ...

    def ask(self, question: str, default: str = "") -> str: ...

    def secret(self, question: str) -> str: ...


END_OF_INPUT = "\x1a"  # Ctrl+Z: what getpass hands back on Windows, where it reads keys, not lines


class TerminalIO:
    """Prompts on the terminal. Input that ends, or Ctrl+C, at any prompt is InputEnded (the CLI's sentence)."""

    def say(self, text: str) -> None:
        print(printable(text))

    def ask(self, question: str, default: str = "") -> str:
        answer = _answer(lambda: input(f"{question} " + (f"[{default}] " if default else "")))
        return answer or default

    def secret(self, question: str) -> str:
        return _answer(lambda: getpass.getpass(f"{question} "))


def _answer(read: Callable[[], str]) -> str:
    if sys.stdin is None:  # started without a stdin at all (input() would raise RuntimeError)
        raise InputEnded()
    try:
        answer = read()
    except KeyboardInterrupt:
        print(flush=True)  # the prompt's line stays unfinished otherwise
        raise InputEnded(interrupted=True) from None
    except (EOFError, OSError):  # Ctrl+D / Ctrl+Z+Enter, /dev/null, or a console that went away
        print(flush=True)
        raise InputEnded() from None
    if answer.startswith(END_OF_INPUT):
        raise InputEnded()
    return answer.strip()


def _yes(answer: str) -> bool:
    return answer.strip().lower() in ("y", "yes")


def _choose_reuse(io: WizardIO, found: list[ExistingFolder], assume_yes: bool) -> ExistingFolder | None:
    if found:
        for i, folder in enumerate(found, 1):
            io.say(f"  {i}. {folder.kind} models in {folder.path}")
        if assume_yes:
            return found[0]
        answer = io.ask("Use the models already there instead of downloading copies? Number, or n:", "1")
        if answer.isdigit() and 1 <= int(answer) <= len(found):
            return found[int(answer) - 1]
        if not answer.lower().startswith("n"):
            io.say("Not a choice in the list: no folder is reused.")
        return None
    if assume_yes:
        return None
    answer = io.ask("If you have ComfyUI or Forge, type its folder to reuse its models (Enter to skip):")
    if not answer:
        return None
    folder = classify(Path(answer).expanduser())
    if folder is None:
        io.say(f"{answer} holds no ComfyUI or Forge models folder: nothing is reused.")
    return folder


def _choose_preset(
    io: WizardIO,
    manifest: Manifest,
    system: SystemInfo,
    speed: Speed | None,
    max_minutes: float,
    assume_yes: bool,
) -> Preset:
    found = verdicts(manifest, system, speed)
    best, why = recommend(manifest, system, speed, max_minutes, found)
    presets = [found[name].preset for name in found]
    io.say("Model sets:")
    for i, preset in enumerate(presets, 1):
        star = " (recommended)" if preset is best else ""
        io.say(f"  {i}. {preset.name}{star} - {explain(found[preset.name], manifest)}")
    io.say(f"Recommended: {best.name}, {why}.")
    if assume_yes:
        return best
    while True:
        answer = io.ask("Which one?", str(presets.index(best) + 1))
        if answer.isdigit() and 1 <= int(answer) <= len(presets):
            return presets[int(answer) - 1]
        if answer in manifest.presets:
            return manifest.presets[answer]
        io.say(f"Type a number from 1 to {len(presets)}.")


def _get_token(io: WizardIO, selection: Selection, assume_yes: bool) -> str | None:
    token = find_token()
    if not selection.gated or token:
        return token
    io.say(licence_advice(selection.gated, endpoint()))
    if assume_yes:
        raise BootstrapError(
            "A gated file was chosen and no token is set: run the wizard in a window to type it, or `setx HF_TOKEN hf_...` and open a new window."
        )
    token = io.secret("Paste the token (hf_...), or press Enter to stop:")
    if not token:
        raise BootstrapError("No token was given: set HF_TOKEN or choose a preset that needs no account.")
    path = token_file(os.environ, Path.home())
    if _yes(io.ask(f"Save the token in {path} for next time? (y/n)", "n")):
        save_token(path, token)
        io.say(f"Saved; only your account can read {path}.")
    return token


def save_token(path: Path, token: str) -> None:
    """The token file as huggingface_hub reads it, whole and readable by the owner only (write_private)."""
    try:
        write_private(path, (token + "\n").encode("utf-8"))
    except OSError as exc:
        raise BootstrapError(
            f"Could not save the token in {path} ({exc.strerror or exc}): set HF_TOKEN instead."
        ) from None


def run_wizard(
    io: WizardIO,
    models_dir: Path | None = None,
    manifest_path: Path | None = None,
    config_path: Path | None = None,
    assume_yes: bool = False,
    detect: Callable[[Path], SystemInfo] = detect_system,
    places: list[Path] | None = None,
    speed: Callable[[Callable[[str], None]], Speed | None] | None = None,
    max_minutes: float = DEFAULT_MAX_MINUTES,
) -> int:
    from bootstrap.download import Downloader, DownloadOptions
    from bootstrap.progress import TerminalProgress

    config = ProjectConfig.load(config_path)
    root = config.path.parent
    models_dir = usable_folder(models_dir or config.models_dir)
    manifest = load_manifest(manifest_path)
    system = detect(models_dir)
    io.say(describe_system(system))

    if places is None:
        drives = ("C:/", "D:/", "E:/") if Platform.current().windows else ()
        places = candidate_places(Path.home(), PROJECT_ROOT, drives)
    reuse = _choose_reuse(io, find_existing(places, models_dir), assume_yes)
    measured = (speed or fit.machine_speed)(io.say)
    preset = _choose_preset(io, manifest, system, measured, max_minutes, assume_yes)
    selection = select(manifest, preset, reuse)
    for name, path in selection.reused.items():
        io.say(f"{name}: reusing {path}")
    token = _get_token(io, selection, assume_yes)

    config.update(**config_values(models_dir, reuse, system, preset, root))
    config.save()
    io.say(f"Saved the choice in {config.path}.")
    if not selection.to_download:
        io.say("Every file is already there.")
        return 0
    size = (
        f"{selection.download_gb():.1f} GB"
        if all(f.size for f in selection.to_download)
        else f"about {preset.disk_gb:g} GB"
    )
    if not assume_yes and not _yes(
        io.ask(f"Download {len(selection.to_download)} files ({size}) into {models_dir} now? (y/n)", "y")
    ):
        io.say(f"Later: python -m bootstrap download --preset {preset.name}")
        return 0
    options = DownloadOptions(token=token)
    downloader = Downloader(
        models_dir, options, TerminalProgress(), say=lambda text: print(printable(text), file=sys.stderr)
    )
    outcomes, errors = downloader.ensure(selection.to_download)
    for error in errors:
        io.say(f"error: {error}")
    io.say(f"{len(outcomes)} of {len(selection.to_download)} files are in place and verified.")
    return 1 if errors else 0
