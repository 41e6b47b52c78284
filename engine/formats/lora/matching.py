"""Which pairs of a LoRA file go to which layers of the models at hand, and what the user is told about the
rest (pairs of another part, of no layer, of another size; kinds not applied)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from engine.contract.request import LoraSpec
from engine.formats.lora.files import LoraPair, LoraWeights
from engine.formats.lora.layouts import LayerIndex, Target, part_of, strip


@dataclass
class Resolved:
    terms: list[tuple[nn.Module, Target, LoraPair]] = field(default_factory=list)
    counts: dict[str, set[str]] = field(default_factory=lambda: {"transformer": set(), "clip": set()})
    unmatched: list[str] = field(default_factory=list)  # tensor names
    misfit: list[str] = field(default_factory=list)  # "name: LoRA in→out, layer in→out"
    norms: list[tuple[nn.Module, torch.Tensor]] = field(default_factory=list)  # norm scales that replace
    clip_absent: int = 0  # CLIP-L pairs while CLIP-L is not loaded
    t5: int = 0  # T5 pairs (not applied)
    elsewhere: int = 0  # pairs of a part another call applies

    @property
    def applied(self) -> int:
        return sum(len(c) for c in self.counts.values()) + len(self.norms)


def resolve(lora: LoraWeights, indexes: dict[str, LayerIndex | None], parts: tuple[str, ...]) -> Resolved:
    """Each pair's layers in `indexes` ("transformer"/"clip": the model's index, None when it is not loaded)."""
    out = Resolved()
    for key, pair in lora.pairs.items():
        part = part_of(key)
        if part == "t5":
            out.t5 += 1
            continue
        if part not in parts:
            out.elsewhere += 1
            continue
        index = indexes.get(part)
        if index is None:
            if part == "clip":
                out.clip_absent += 1
            else:
                out.unmatched += pair.names
            continue
        targets = index.targets(key)
        if targets is None:
            out.unmatched += pair.names
            continue
        problem = misfit(pair, targets, index.layers)
        if problem:
            out.misfit.append(f"{key}: {problem}")
            continue
        for target in targets:
            out.terms.append((index.layers[target.layer], target, pair))
            out.counts[part].add(target.layer)
    index = indexes.get("transformer")
    for key, scale in lora.norm_scales.items() if "transformer" in parts else ():
        norm = index.norms.get(strip(key, index.prefixes)) if index is not None else None
        if norm is None:
            out.unmatched.append(key + ".scale")
        elif tuple(norm.scale.shape) != tuple(scale.shape):
            out.misfit.append(f"{key}: LoRA scale of {scale.shape[0]}, norm of {norm.scale.shape[0]}")
        else:
            out.norms.append((norm, scale))
    return out


def widens(pair: LoraPair, target: Target, layer: nn.Module) -> bool:
    """A pair that gives `img_in` more input features than the model's (a Canny/Depth control LoRA: 64 → 128);
    the patch pads the weight with zero columns first, as BFL and ComfyUI do."""
    return target.layer == "img_in" and target.rows is None and pair.down.shape[1] > layer.in_features


def misfit(pair: LoraPair, targets: list[Target], layers: dict[str, nn.Module]) -> str | None:
    """Why this pair does not fit these layers (None: it fits)."""
    up_rows = 0
    for t in targets:
        layer = layers[t.layer]
        rows = t.rows or (0, layer.out_features)
        taken = t.up_rows or (0, rows[1] - rows[0])
        if rows[1] > layer.out_features or (
            pair.down.shape[1] != layer.in_features and not widens(pair, t, layer)
        ):
            return f"LoRA {pair.down.shape[1]}→{pair.up.shape[0]}, layer {layer.in_features}→{layer.out_features}"
        up_rows = max(up_rows, taken[1])
    if pair.up.shape[0] != up_rows:
        layer = layers[targets[0].layer]
        return f"LoRA {pair.down.shape[1]}→{pair.up.shape[0]}, layer {layer.in_features}→{up_rows}"
    return None


def examples(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def no_fit(lora: LoraWeights, resolved: Resolved) -> str:
    """The sentence for a LoRA none of whose pairs fits the model."""
    keys = list(lora.pairs)
    if any("transformer_blocks." in k for k in keys) and not any(
        "single_transformer_blocks" in k for k in keys
    ):
        return f"{lora.path} is a LoRA for Stable Diffusion 3, not for FLUX: remove it or use a FLUX LoRA."
    if resolved.misfit:
        return (
            f"{lora.path} is a LoRA for a FLUX model of another size: none of its layers fit this one "
            f"(e.g. {resolved.misfit[0]}); use a LoRA made for this model."
        )
    return (
        f"{lora.path} is not a LoRA for this FLUX model: none of its {len(keys)} layers match it "
        f"(e.g. {examples(keys)}); use a FLUX LoRA."
    )


def notes_for(lora: LoraWeights, spec: LoraSpec, r: Resolved, parts: tuple[str, ...]) -> list[str]:
    """What the user is told about one LoRA in one call."""
    applied = []
    if r.counts["transformer"]:
        applied.append(f"{len(r.counts['transformer'])} transformer layers")
    if r.norms:
        applied.append(f"{len(r.norms)} norm scales replaced")
    if r.counts["clip"]:
        applied.append(f"{len(r.counts['clip'])} CLIP-L layers")
    notes = []
    if applied or "transformer" in parts:
        notes.append(
            f"LoRA {lora.name} at strength {spec.strength:g}: " + (" and ".join(applied) or "no layers")
        )
    if r.unmatched:
        notes.append(
            f"LoRA {lora.name}: {len(r.unmatched)} tensors match no layer of this model and were not applied "
            f"(e.g. {examples(r.unmatched)})"
        )
    if r.misfit:
        notes.append(
            f"LoRA {lora.name}: {len(r.misfit)} layers have other sizes than this model's and were not applied "
            f"(e.g. {r.misfit[0]})"
        )
    if "transformer" in parts and lora.unsupported:  # said once per job: by the transformer's call
        notes.append(
            f"LoRA {lora.name}: {len(lora.unsupported)} tensors are of kinds FluxDeck does not apply "
            f"(DoRA, LoHa/LoKr, lone biases) and were left out (e.g. {examples(lora.unsupported)})"
        )
    if "transformer" in parts and r.t5:
        notes.append(
            f"LoRA {lora.name}: its T5 part ({r.t5} layers) was not applied: LoRAs apply to the transformer "
            "and CLIP-L only"
        )
    if r.clip_absent:
        notes.append(
            f"LoRA {lora.name}: its CLIP-L part ({r.clip_absent} layers) was not applied: CLIP-L is not "
            "loaded in this job"
        )
    return notes
