"""PNG files with the request inside them (A1111/Forge `parameters` text and our JSON), never overwriting."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from PIL import Image, PngImagePlugin

from engine.atomic_write import partial_name, write_atomic
from engine.contract.errors import UserError
from engine.contract.request import GenerateRequest
from engine.formats.lora.hashes import FileHashes

JSON_KEY = "fluxdeck"
VERSION = "FluxDeck 0.1.0"


def parameters_text(
    request: GenerateRequest,
    *,
    steps: int,
    model: str,
    batch_index: int = 0,
    hashes: FileHashes | None = None,
) -> str:
    """The A1111/Forge `parameters` chunk that image viewers, Civitai and Forge's PNG Info read."""
    lines = [_prompt_line(request)]
    if request.negative:
        lines.append(f"Negative prompt: {request.negative}")
    fields = {
        "Steps": steps,
        "Sampler": "Euler",
        "Schedule type": "Simple",
        "CFG scale": _num(request.cfg),
        "Distilled CFG Scale": None if request.guidance is None else _num(request.guidance),
        "Seed": request.seed,
        "Size": f"{request.width}x{request.height}",
        "Model": model,
    }
    # the engine saves the request with its size and guidance filled in (edits.resolve); unresolved, say nothing
    if request.guidance is None:
        del fields["Distilled CFG Scale"]
    if request.width is None or request.height is None:
        del fields["Size"]
    if request.batch > 1:
        fields["Batch size"] = request.batch
        fields["Batch pos"] = batch_index
    if request.clip_prompt is not None and request.clip_prompt != request.prompt:
        fields["CLIP prompt"] = json.dumps(request.clip_prompt)
    if request.init_image:
        fields["Denoising strength"] = _num(request.denoise)
    if request.shift != "auto":
        fields["Shift"] = request.shift
    if request.cache != "none":
        fields["Cache"] = request.cache
    if request.loras:
        fields["Lora hashes"] = _lora_hashes(request, hashes or FileHashes())
    if request.controlnets:
        fields["ControlNet"] = _controlnets(request)
    fields["Version"] = VERSION
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items()))
    return "\n".join(lines)


def _controlnets(request: GenerateRequest) -> str:
    """`ControlNet: "name (strength S, A-B[, mode M][, preprocessor]), ..."`, one entry per net, its file's
    name."""
    entries = []
    for spec in request.controlnets:
        name = Path(spec.path.replace("\\", "/")).stem.replace(",", "_").replace(":", "_")
        mode = f", mode {spec.mode}" if spec.mode is not None else ""
        mode += f", {spec.preprocess}" if spec.preprocess != "none" else ""
        entries.append(f"{name} (strength {_num(spec.strength)}, {_num(spec.start)}-{_num(spec.end)}{mode})")
    return '"' + ", ".join(entries) + '"'


def _num(x: float) -> str:
    return f"{x:g}"


def _prompt_line(request: GenerateRequest) -> str:
    """The prompt with an A1111 `<lora:name:strength>` tag for each LoRA it does not already carry."""
    from engine.formats.lora import lora_name

    prompt = request.prompt
    tags = []
    for spec in request.loras:
        tag = f"<lora:{lora_name(spec.path)}:{_num(spec.strength)}>"
        if tag.lower() not in prompt.lower():
            tags.append(tag)
    return " ".join([prompt, *tags]) if tags else prompt


def _lora_hashes(request: GenerateRequest, hashes: FileHashes) -> str:
    """A1111's `Lora hashes: "name: hash10, ..."` (hash10: the first 10 hex digits of the file's SHA-256,
    Civitai's AutoV2); a file that cannot be read is listed without a hash."""
    from engine.formats.lora import lora_name

    entries = []
    for spec in request.loras:
        name = lora_name(spec.path).replace(",", "_").replace(":", "_")
        try:
            entries.append(f"{name}: {hashes.sha256(spec.path)[:10]}")
        except OSError:
            entries.append(name)
    return '"' + ", ".join(entries) + '"'


def check_writable(out: str | Path) -> Path:
    """Fail before any model loads when the output cannot be written; creates the folder if needed."""
    path = Path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = partial_name(path)
        probe.open("xb").close()
        probe.unlink()
    except OSError as e:
        raise UserError(f"Cannot write to {path.parent} ({e.strerror}): choose another --out.") from None
    return path


def free_path(path: Path) -> Path:
    """`path`, or `name-1.png`, `name-2.png`... whichever does not exist yet."""
    candidate = path
    n = 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def save_png(image: Image.Image, out: Path, parameters: str, request_json: dict) -> Path:
    """Write the PNG under a name that does not exist yet: written whole under a temporary name, then linked
    into place without replacing anything (a racing writer cannot clobber it, an interrupt leaves no half PNG)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    info.add_text(JSON_KEY, json.dumps(request_json))
    while True:
        path = free_path(out)
        try:
            return write_atomic(path, lambda f: image.save(f, format="PNG", pnginfo=info))
        except FileExistsError:
            continue


def read_request(path: str | Path) -> dict:
    """The JSON request stored in one of our PNGs."""
    with Image.open(path) as image:
        text = image.text.get(JSON_KEY)
    if text is None:
        raise UserError(f"{path} carries no FluxDeck request.")
    return json.loads(text)


def input_records(request: GenerateRequest, hashes: FileHashes | None = None) -> list[dict]:
    """Every input image of the request (init image, mask, control image, references, ControlNet images): its
    role, file name, path and SHA-256, so that reusing the PNG finds the same inputs again and can tell when
    one has changed. A file that cannot be read is recorded without a hash."""
    hashes = hashes or FileHashes()
    records = []
    for role, path in request.input_images():
        records.append(input_record(role, path, hashes.sha256))
    return records


def input_record(role: str, path: str, sha256: Callable[[str], str]) -> dict:
    """One input image's record: role, file name, path and SHA-256 (left out when the file cannot be read)."""
    record = {"role": role, "name": Path(path.replace("\\", "/")).name, "path": path}
    try:
        record["sha256"] = sha256(path)
    except OSError:
        pass
    return record


def save_images(
    images: list[Image.Image],
    request: GenerateRequest,
    out: Path,
    *,
    steps: int,
    t5_length: int,
    model: str,
    hashes: FileHashes | None = None,
) -> list[str]:
    """The save stage: each image of the batch as a PNG carrying its parameters and the whole request (with the
    steps and T5 length the job resolved, and its place in the batch)."""
    paths = []
    inputs = input_records(request, hashes)
    for i, image in enumerate(images):
        record = request.to_dict() | {"batch_index": i, "steps": steps, "t5_max_length": t5_length}
        if inputs:
            record["inputs"] = inputs
        text = parameters_text(request, steps=steps, model=model, batch_index=i, hashes=hashes)
        paths.append(str(save_png(image, out, text, record)))
    return paths
