"""`LoraLibrary`: the LoRA files one engine has read, and putting a job's LoRAs on its models."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from engine.contract.errors import UserError
from engine.contract.request import LoraSpec
from engine.formats.lora import patch
from engine.formats.lora.files import LoraFiles, LoraWeights
from engine.formats.lora.flux2_layouts import TEXT_ENCODER_MARKERS
from engine.formats.lora.layer_index import index
from engine.formats.lora.layouts import part_of
from engine.formats.lora.matching import no_fit, notes_for, resolve

PARTS = ("transformer", "clip")


class LoraLibrary:
    """Owns the files read (`LoraFiles`: by path, modification time and size) and applies them, so asking for the
    same LoRAs again costs a dictionary look-up and a pass over the layers, and their device copies are reused."""

    def __init__(self, files: LoraFiles | None = None):
        self.files = files if files is not None else LoraFiles()

    def load(self, path: str | Path) -> LoraWeights:
        return self.files.load(path)

    def apply(
        self,
        transformer: nn.Module | None,
        clip: nn.Module | None,
        loras: list[LoraSpec],
        parts: tuple[str, ...] = PARTS,
    ) -> list[str]:
        """Replace the LoRA patches on these models with `loras` (an empty list clears them); returns notes for
        the user.

        `parts` says which models this call is for: by default both, and then a CLIP-L part with `clip` None is
        reported as not applied. A pipeline that patches CLIP-L before encoding and the transformer later calls
        this twice, with parts=("clip",) and parts=("transformer",): each call is silent about the other's part."""
        if "transformer" in parts:
            patch.clear(transformer)
        if "clip" in parts:
            patch.clear(clip)
        files = [self.files.load(spec.path) for spec in loras]
        self.files.release_unused(files)
        indexes = {
            "transformer": index(transformer, "transformer") if transformer is not None else None,
            "clip": index(clip, "clip") if clip is not None else None,
        }
        per_layer: dict[int, tuple[nn.Module, list[patch.Term]]] = {}
        norms: list = []
        notes = []
        for spec, lora in zip(loras, files):
            resolved = resolve(lora, indexes, parts)
            if not (resolved.applied or resolved.clip_absent or resolved.t5 or resolved.elsewhere):
                raise UserError(no_fit(lora, resolved))
            for layer, target, pair in resolved.terms:
                if spec.strength == 0:
                    continue
                term = patch.Term(pair, spec.strength * pair.scale, target.rows, target.up_rows)
                per_layer.setdefault(id(layer), (layer, []))[1].append(term)
            if spec.strength != 0:
                norms += resolved.norms
            notes += notes_for(lora, spec, resolved, parts)
        patch.install(per_layer)
        patch.install_norms(norms)
        return notes

    def clip_key(self, loras: list[LoraSpec]) -> str:
        """What the CLIP-L LoRAs of a job are (file identity and strength), for the text-embedding cache's key;
        "" when no LoRA has a CLIP-L part."""
        keys = []
        for spec in loras:
            lora = self.files.load(spec.path)
            if spec.strength != 0 and any(part_of(k) == "clip" for k in lora.pairs):
                keys.append(f"{lora.path.resolve()}:{lora.mtime_ns}:{lora.size}:{spec.strength!r}")
        return "|".join(keys)


def unknown_keys(transformer, lora: LoraWeights) -> tuple[list[str], list[str]]:
    """(tensor names of this LoRA that fit no layer of this FLUX.2 transformer, those of a text-encoder part)."""
    idx = index(transformer, "transformer")
    resolved = resolve(lora, {"transformer": idx, "clip": None}, ("transformer",))
    misfit = [line.partition(":")[0] for line in resolved.misfit]
    unknown = [n for n in resolved.unmatched + misfit if not n.startswith(TEXT_ENCODER_MARKERS)]
    return unknown, [k for k in lora.pairs if k.startswith(TEXT_ENCODER_MARKERS)]
