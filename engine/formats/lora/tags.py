"""A1111's `<lora:name:strength>` prompt tags: found in one linear pass, taken out of the prompt, and their names
resolved inside the loras folder only (a tag can arrive from someone else's PNG)."""

from __future__ import annotations

import re
from pathlib import Path

from engine.contract.errors import UserError
from engine.contract.request import LoraSpec
from engine.formats.lora.files import LORA_SUFFIXES, lora_name
from engine.paths import confined

_TAG_START = re.compile(re.escape("<lora:"), re.IGNORECASE)


def _tags(prompt: str) -> list[tuple[int, int, str, str]]:
    """(start, end, name, strength text) of each `<lora:name[:strength[:anything]]>` tag, in one pass: every
    tag start reuses the `>` found for the one before it while that one lies ahead, so a prompt full of
    unclosed tags costs time in proportion to its length, not its square."""
    tags = []
    close = -1
    taken = 0  # tags do not overlap: the next starts after the last one's `>`
    for match in _TAG_START.finditer(prompt):
        start = match.start()
        if start < taken:
            continue
        if close < match.end():
            close = prompt.find(">", match.end())
            if close < 0:
                break  # no `>` from here on: no more tags
        name, _, rest = prompt[match.end() : close].partition(":")
        if not name:
            continue
        tags.append((start, close + 1, name, rest.partition(":")[0]))
        taken = close + 1
    return tags


def prompt_loras(prompt: str, loras_dir: str | Path | None) -> tuple[str, list[LoraSpec]]:
    """Take A1111's `<lora:name>` / `<lora:name:0.8>` tags out of a prompt: (the prompt without them, the LoRAs
    they name, found as name.safetensors in `loras_dir` or a folder below it, never outside it)."""
    specs = []
    pieces = []
    last = 0
    for start, end, raw_name, raw_strength in _tags(prompt):
        tag, name, strength = prompt[start:end], raw_name.strip(), raw_strength.strip()
        try:
            value = float(strength) if strength else 1.0
        except ValueError:
            raise UserError(
                f"{tag[:80]} in the prompt has no number for its strength: write e.g. <lora:{name[:40]}:0.8>."
            ) from None
        specs.append(LoraSpec(str(_find_lora(name, loras_dir, tag[:80])), value))
        pieces.append(prompt[last:start])
        last = end
    if not specs:
        return prompt, []
    pieces.append(prompt[last:])
    cleaned = re.sub(r"[ \t]{2,}", " ", "".join(pieces)).strip()
    cleaned = re.sub(r"\s+,", ",", cleaned).strip(" ,")
    return cleaned, specs


def _find_lora(name: str, loras_dir: str | Path | None, tag: str) -> Path:
    if loras_dir is None or not Path(loras_dir).is_dir():
        raise UserError(
            f"{tag} in the prompt needs a loras folder: use --models-dir with a loras/ folder, or --lora FILE."
        )
    folder = Path(loras_dir)
    for suffix in ("", *LORA_SUFFIXES):
        direct = confined(folder, f"{name}{suffix}", f"{tag} in the prompt")
        if direct.is_file():
            return direct
    wanted = name.lower()
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in LORA_SUFFIXES and path.is_file() and lora_name(path).lower() == wanted:
            return confined(folder, str(path.relative_to(folder)), f"{tag} in the prompt")
    raise UserError(
        f"{tag} in the prompt names no LoRA in {folder}: put {name}.safetensors there or fix the name."
    )
