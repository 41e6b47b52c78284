"""LoRA files applied at the weight chokepoint: W + Σ strength·scale·up@down, computed where the layer runs.

Readers for the layouts people share for FLUX, all mapped onto the transformer's own (BFL) layer names:

- kohya / sd-scripts: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `.lora_up.weight`, `.alpha`
  (also kohya-style names of diffusers modules: `lora_transformer_transformer_blocks_0_attn_to_q...`);
- diffusers / PEFT: `transformer.transformer_blocks.0.attn.to_q.lora_A.weight` / `lora_B` (with or without the
  `transformer.` prefix; alpha from `.alpha` keys or diffusers' `lora_adapter_metadata`);
- XLabs: `double_blocks.0.processor.qkv_lora1.down.weight` / `.up.weight`;
- BFL / ComfyUI: `diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight` (or `lora_A`/`lora_B`);
- CLIP-L: `lora_te1_text_model_encoder_layers_0_self_attn_q_proj...`, `text_encoder.text_model....lora_A...`.

A LoRA on a part of a fused layer (diffusers' to_q / to_k / to_v / add_*_proj / proj_mlp, XLabs' single-block
qkv, the final modulation whose halves diffusers swaps) patches only its rows. Nothing is merged into the stored
weights: each job replaces the patches, so removing a LoRA gives the base weights back exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from engine.contract.errors import UserError
from engine.contract.request import LoraSpec
from engine.paths import confined
from engine.runtime import ops

LORA_SUFFIXES = (".safetensors", ".sft")

# Tensor-name endings of a LoRA pair, longest first (".lora.down.weight" before ".down.weight").
_PARTS = sorted(
    {
        ".lora_down.weight": "down",
        ".lora_up.weight": "up",
        ".lora_A.weight": "down",
        ".lora_B.weight": "up",
        ".lora_A.default.weight": "down",
        ".lora_B.default.weight": "up",
        ".lora.down.weight": "down",
        ".lora.up.weight": "up",
        ".down.weight": "down",
        ".up.weight": "up",
        ".alpha": "alpha",
    }.items(),
    key=lambda item: -len(item[0]),
)

# Dotted prefixes that wrap the model's own names in the files (stripped repeatedly, in any order).
_TRANSFORMER_PREFIXES = (
    "model.diffusion_model.",
    "diffusion_model.",
    "base_model.model.",
    "transformer.",
    "unet.",
)
_CLIP_PREFIXES = (
    "text_encoders.clip_l.transformer.",
    "text_encoder.",
    "clip_l.",
    "te1.",
    "base_model.model.",
)
_CLIP_KOHYA = ("lora_te1_", "lora_te_")
_T5_MARKERS = ("lora_te2_", "text_encoder_2.", "text_encoders.t5xxl.", "t5xxl.", "te2.")
_MAX_CACHED_FILES = 16


# ---- a LoRA file, read once per path and modification time ----


@dataclass
class _Pair:
    """One layer's down (rank × in) and up (out × rank) matrices and its alpha/rank scale."""

    key: str  # the layer's name in the file, without the pair's endings
    names: list[str]  # the file's tensor names, for messages
    down: torch.Tensor
    up: torch.Tensor
    scale: float
    _on: dict = field(default_factory=dict, repr=False)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def tensors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) on `device` in `dtype`, copied there once and kept while this LoRA is in use."""
        key = (device, dtype)
        cached = self._on.get(key)
        if cached is None:
            cached = (self.up.to(device=device, dtype=dtype), self.down.to(device=device, dtype=dtype))
            self._on[key] = cached
        return cached


@dataclass
class LoraFile:
    path: Path
    name: str  # the file name without its extension: A1111's `<lora:name:...>`
    pairs: dict[str, _Pair]
    unsupported: list[str]  # tensor names of kinds not applied (DoRA, LoHa/LoKr, biases, lone halves)
    mtime_ns: int
    size: int

    def release(self) -> None:
        """Drop the device copies (the file is no longer asked for)."""
        for pair in self.pairs.values():
            pair._on.clear()


_FILES: OrderedDict[str, LoraFile] = OrderedDict()


def load_lora(path: str | Path) -> LoraFile:
    """The LoRA at `path`, read once: the same object while the file's modification time and size stay."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"The LoRA {path} does not exist: check the path given to --lora.")
    if not p.is_file():
        raise UserError(f"The LoRA {path} is a folder: give the .safetensors file inside it to --lora.")
    stat = p.stat()
    key = str(p.resolve())
    cached = _FILES.get(key)
    if cached is not None and (cached.mtime_ns, cached.size) == (stat.st_mtime_ns, stat.st_size):
        _FILES.move_to_end(key)
        return cached
    loaded = _read(p, stat.st_mtime_ns, stat.st_size)
    _FILES[key] = loaded
    _FILES.move_to_end(key)
    while len(_FILES) > _MAX_CACHED_FILES:
        _FILES.popitem(last=False)[1].release()
    return loaded


def _read(path: Path, mtime_ns: int, size: int) -> LoraFile:
    from engine.formats.weights import SafetensorsFile, describe

    file = SafetensorsFile(path)
    names = file.names()
    if not any(name.endswith(part) for name in names for part, _ in _PARTS):
        raise UserError(f"{path} is not a LoRA: it looks like {describe(file)}; give a LoRA file to --lora.")
    foreign = _foreign_architecture(names)
    if foreign:
        raise UserError(f"{path} is a LoRA for {foreign}, not for FLUX: remove it or use a FLUX LoRA.")
    # copies, not views of the mapped file: a long-lived engine must not hold the file open (on Windows that
    # would stop people from replacing or deleting it)
    tensors = {name: t.clone() for name, t in file.load(names).items()}
    alphas = _metadata_alphas(file.metadata, path)
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unsupported: list[str] = []
    for name, tensor in tensors.items():
        for ending, part in _PARTS:
            if name.endswith(ending):
                groups.setdefault(name[: -len(ending)], {})[part] = (name, tensor)
                break
        else:
            unsupported.append(name)
    pairs = {}
    for key, parts in groups.items():
        down, up = _matrix(parts.get("down")), _matrix(parts.get("up"))
        if down is None or up is None or up.shape[1] != down.shape[0]:
            unsupported += [name for name, _ in parts.values()]
            continue
        rank = down.shape[0]
        if rank == 0:
            raise UserError(f"{path} has a LoRA layer of rank 0 ({key}): the file is broken; get it again.")
        if "alpha" in parts:
            alpha = parts["alpha"][1]
            if alpha.numel() != 1:
                raise UserError(
                    f"{path} has an alpha of {alpha.numel()} values for {key} (one number expected): "
                    "the file is broken; get it again."
                )
            scale = float(alpha.float().reshape(-1)[0]) / rank
        else:
            scale = alphas(key, rank)
        if not math.isfinite(scale):
            raise UserError(f"{path} has an alpha that is not a finite number ({key}): the file is broken.")
        if not (_finite(down) and _finite(up)):
            raise UserError(
                f"{path} holds NaN or infinite values ({key}): the file is broken; get it again or remove it."
            )
        pairs[key] = _Pair(key, [name for name, _ in parts.values()], down, up, scale)
    if not pairs:
        raise UserError(
            f"{path} holds no LoRA up/down pairs FluxDeck can apply (e.g. {', '.join(unsupported[:3])}): "
            "use a plain LoRA (not LoHa, LoKr or DoRA)."
        )
    return LoraFile(path, lora_name(path), pairs, unsupported, mtime_ns, size)


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.float() if t.element_size() == 1 else t).all())


def _matrix(part: tuple[str, torch.Tensor] | None) -> torch.Tensor | None:
    """A 2-D matrix; 1×1 convolution kernels (rank, in, 1, 1) are matrices too."""
    if part is None:
        return None
    t = part[1]
    if t.ndim == 4 and t.shape[2:] == (1, 1):
        t = t.reshape(t.shape[0], t.shape[1])
    return t if t.ndim == 2 and t.is_floating_point() else None


def _metadata_alphas(metadata: dict[str, str], path: Path):
    """alpha/rank from diffusers' `lora_adapter_metadata` (PEFT's lora_alpha, alpha_pattern, use_rslora), per
    component ("transformer.lora_alpha") or global; without it alpha is the rank (scale 1). Values of the wrong
    kind (a text alpha, a list for alpha_pattern) are refused here, in one sentence, before any layer is read."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except (TypeError, json.JSONDecodeError, RecursionError):
        config = {}
    if not isinstance(config, dict):
        config = {}

    def bad(field_name: str, value) -> UserError:
        return UserError(
            f"{path} has a {field_name} of {str(value)[:40]!r} in its metadata, which is not "
            f"{'an object of numbers' if 'pattern' in field_name else 'a number'}: the file is broken; get it again."
        )

    def number(field_name: str, value) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise bad(field_name, value)
        return float(value)

    for field_name, value in config.items():
        if field_name.endswith("lora_alpha") and value is not None:
            number(field_name, value)
        elif field_name.endswith("alpha_pattern") and value is not None:
            if not isinstance(value, dict):
                raise bad(field_name, value)
            for item in value.values():
                number(field_name, item)

    def scale(key: str, rank: int) -> float:
        component, _, module = key.partition(".")
        if component not in ("transformer", "text_encoder"):
            component, module = "", key

        def get(field_name: str, default=None):
            return config.get(f"{component}.{field_name}", config.get(field_name, default))

        alpha = get("lora_alpha")
        for pattern, value in (get("alpha_pattern") or {}).items():
            if module == pattern or module.endswith("." + pattern):
                alpha = value
        if alpha is None:
            return 1.0
        return float(alpha) / (math.sqrt(rank) if get("use_rslora", False) else rank)

    return scale


def _foreign_architecture(names: list[str]) -> str | None:
    """What another model family's LoRA is, by its tensor names (None: nothing says it is not FLUX)."""
    if any("joint_blocks" in n for n in names):
        return "Stable Diffusion 3"
    unet = ("input_blocks", "output_blocks", "middle_block", "down_blocks", "up_blocks", "mid_block")
    if any(part in n for n in names for part in unet):
        second_encoder = any(n.startswith(("lora_te2_", "text_encoder_2.", "te2.")) for n in names)
        if second_encoder or any("conditioner.embedders.1" in n for n in names):
            return "SDXL"
        return "Stable Diffusion 1.x/2.x"
    return None


# ---- where each pair goes in our models ----


@dataclass(frozen=True)
class _Target:
    layer: str  # the module name in our model
    rows: tuple[int, int] | None = None  # the rows of a fused layer it covers (None: all)
    up_rows: tuple[int, int] | None = None  # the rows of the LoRA's up it takes (None: all)


def _diffusers_names(p) -> dict[str, list[_Target]]:
    """diffusers' FluxTransformer2DModel module names → our layers (and rows of fused ones)."""
    h, m = p.hidden_size, p.mlp_hidden
    out: dict[str, list[_Target]] = {}

    def put(theirs: str, ours: str, rows=None, up_rows=None) -> None:
        out.setdefault(theirs, []).append(_Target(ours, rows, up_rows))

    put("x_embedder", "img_in")
    put("context_embedder", "txt_in")
    for ours, theirs in (
        ("time_in", "timestep_embedder"),
        ("vector_in", "text_embedder"),
        ("guidance_in", "guidance_embedder"),
    ):
        put(f"time_text_embed.{theirs}.linear_1", f"{ours}.in_layer")
        put(f"time_text_embed.{theirs}.linear_2", f"{ours}.out_layer")
    for i in range(p.depth):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for j, x in enumerate("qkv"):
            put(f"{d}.attn.to_{x}", f"{b}.img_attn.qkv", (j * h, (j + 1) * h))
            put(f"{d}.attn.add_{x}_proj", f"{b}.txt_attn.qkv", (j * h, (j + 1) * h))
        put(f"{d}.attn.to_out.0", f"{b}.img_attn.proj")
        put(f"{d}.attn.to_add_out", f"{b}.txt_attn.proj")
        put(f"{d}.ff.net.0.proj", f"{b}.img_mlp.0")
        put(f"{d}.ff.net.2", f"{b}.img_mlp.2")
        put(f"{d}.ff_context.net.0.proj", f"{b}.txt_mlp.0")
        put(f"{d}.ff_context.net.2", f"{b}.txt_mlp.2")
        put(f"{d}.norm1.linear", f"{b}.img_mod.lin")
        put(f"{d}.norm1_context.linear", f"{b}.txt_mod.lin")
    for i in range(p.depth_single):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for j, x in enumerate("qkv"):
            put(f"{d}.attn.to_{x}", f"{b}.linear1", (j * h, (j + 1) * h))
        put(f"{d}.proj_mlp", f"{b}.linear1", (3 * h, 3 * h + m))
        put(f"{d}.proj_out", f"{b}.linear2")
        put(f"{d}.norm.linear", f"{b}.modulation.lin")
    # diffusers' final modulation is (scale, shift), BFL's (shift, scale): each half of up goes to the other half
    put("norm_out.linear", "final_layer.adaLN_modulation.1", (0, h), (h, 2 * h))
    put("norm_out.linear", "final_layer.adaLN_modulation.1", (h, 2 * h), (0, h))
    put("proj_out", "final_layer.linear")
    return out


def _xlabs_names(p) -> dict[str, list[_Target]]:
    """XLabs' attention-processor LoRAs: lora1 on the image stream, lora2 on the text stream."""
    out = {}
    for i in range(p.depth):
        b = f"double_blocks.{i}"
        for n, stream in (("1", "img"), ("2", "txt")):
            out[f"{b}.processor.qkv_lora{n}"] = [_Target(f"{b}.{stream}_attn.qkv")]
            out[f"{b}.processor.proj_lora{n}"] = [_Target(f"{b}.{stream}_attn.proj")]
    for i in range(p.depth_single):
        b = f"single_blocks.{i}"
        out[f"{b}.processor.qkv_lora"] = [_Target(f"{b}.linear1", (0, 3 * p.hidden_size))]
        out[f"{b}.processor.proj_lora"] = [_Target(f"{b}.linear2")]
    return out


def _linears(model: nn.Module, strip: str = "") -> dict[str, nn.Module]:
    return {
        name.removeprefix(strip): m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and ops.is_cast_layer(m)
    }


def _underscored(name: str) -> str:
    return name.replace(".", "_")


def _transformer_index(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, list[_Target]]]:
    """Our layers by name, and every name a file may use for them."""
    layers = _linears(model)
    index: dict[str, list[_Target]] = {}
    for name in layers:
        index[name] = [_Target(name)]
        index["lora_unet_" + _underscored(name)] = [_Target(name)]
    params = getattr(model, "params", None)
    if params is not None:
        for theirs, targets in _diffusers_names(params).items():
            index[theirs] = targets
            index["lora_transformer_" + _underscored(theirs)] = targets
            index["lora_unet_" + _underscored(theirs)] = targets
        index.update(_xlabs_names(params))
    return layers, index


def _clip_index(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, list[_Target]]]:
    layers = _linears(model, strip="text_model.")
    index: dict[str, list[_Target]] = {}
    for name in layers:
        for key in (name, "text_model." + name):
            index[key] = [_Target(name)]
        for prefix in _CLIP_KOHYA:
            index[prefix + "text_model_" + _underscored(name)] = [_Target(name)]
    return layers, index


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    while True:
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        else:
            return key


def _is_clip_key(key: str) -> bool:
    return key.startswith(_CLIP_KOHYA) or _strip(key, _CLIP_PREFIXES).startswith("text_model.")


# ---- patches ----


@dataclass(frozen=True)
class _Term:
    pair: _Pair
    scale: float  # strength × alpha / rank
    rows: tuple[int, int] | None
    up_rows: tuple[int, int] | None


class LoraPatch:
    """A layer's LoRA deltas, added to the weight `ops.fetch` hands over (compute dtype, compute device).
    The stored weight is never written: the result is a new tensor."""

    __slots__ = ("terms",)

    def __init__(self, terms: list[_Term]):
        self.terms = tuple(terms)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        out = None
        for term in self.terms:
            up, down = term.pair.tensors(weight.device, weight.dtype)
            if term.up_rows is not None:
                up = up[term.up_rows[0] : term.up_rows[1]]
            if out is None and term.rows is None:
                out = torch.addmm(weight, up, down, alpha=term.scale)
                continue
            if out is None:
                out = weight.clone()
            target = out if term.rows is None else out[term.rows[0] : term.rows[1]]
            target.addmm_(up, down, alpha=term.scale)
        return weight if out is None else out


def _clear(model: nn.Module | None) -> None:
    if model is None:
        return
    for module in model.modules():
        if ops.is_cast_layer(module) and module.patches:
            module.patches = tuple(p for p in module.patches if not isinstance(p, LoraPatch))


PARTS = ("transformer", "clip")


@dataclass
class _Resolved:
    terms: list[tuple[nn.Module, _Target, _Pair]] = field(default_factory=list)
    counts: dict[str, set[str]] = field(default_factory=lambda: {"transformer": set(), "clip": set()})
    unmatched: list[str] = field(default_factory=list)  # tensor names
    misfit: list[str] = field(default_factory=list)  # "name: LoRA in→out, layer in→out"
    clip_absent: int = 0  # CLIP-L pairs while CLIP-L is not loaded
    t5: int = 0  # T5 pairs (not applied)
    elsewhere: int = 0  # pairs of a part another call applies


def _resolve(
    lora: LoraFile, transformer: nn.Module | None, clip: nn.Module | None, parts: tuple[str, ...]
) -> _Resolved:
    indexes = {
        "transformer": _transformer_index(transformer) if transformer is not None else ({}, {}),
        "clip": _clip_index(clip) if clip is not None else ({}, {}),
    }
    out = _Resolved()
    for key, pair in lora.pairs.items():
        if key.startswith(_T5_MARKERS):
            out.t5 += 1
            continue
        part = "clip" if _is_clip_key(key) else "transformer"
        if part not in parts:
            out.elsewhere += 1
            continue
        if part == "clip" and clip is None:
            out.clip_absent += 1
            continue
        layers, index = indexes[part]
        targets = index.get(_strip(key, _CLIP_PREFIXES if part == "clip" else _TRANSFORMER_PREFIXES))
        if not targets or any(t.layer not in layers for t in targets):
            out.unmatched += pair.names
            continue
        problem = _misfit(pair, targets, layers)
        if problem:
            out.misfit.append(f"{key}: {problem}")
            continue
        for target in targets:
            out.terms.append((layers[target.layer], target, pair))
            out.counts[part].add(target.layer)
    return out


def _misfit(pair: _Pair, targets: list[_Target], layers: dict[str, nn.Module]) -> str | None:
    """Why this pair does not fit these layers (None: it fits)."""
    up_rows = 0
    for t in targets:
        layer = layers[t.layer]
        rows = t.rows or (0, layer.out_features)
        taken = t.up_rows or (0, rows[1] - rows[0])
        if rows[1] > layer.out_features or pair.down.shape[1] != layer.in_features:
            return f"LoRA {pair.down.shape[1]}→{pair.up.shape[0]}, layer {layer.in_features}→{layer.out_features}"
        up_rows = max(up_rows, taken[1])
    if pair.up.shape[0] != up_rows:
        layer = layers[targets[0].layer]
        return f"LoRA {pair.down.shape[1]}→{pair.up.shape[0]}, layer {layer.in_features}→{up_rows}"
    return None


def _examples(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def apply_loras(
    transformer: nn.Module | None,
    clip: nn.Module | None,
    loras: list[LoraSpec],
    parts: tuple[str, ...] = PARTS,
) -> list[str]:
    """Replace the LoRA patches on these models with `loras` (an empty list clears them); returns notes for the user.

    `parts` says which models this call is for: by default both, and then a CLIP-L part with `clip` None is
    reported as not applied. A pipeline that patches CLIP-L before encoding and the transformer later calls
    this twice, with parts=("clip",) and parts=("transformer",): each call is silent about the other's part.
    Files are read once (cached by path, modification time and size), so asking for the same LoRAs again costs
    a dictionary look-up and a pass over the layers."""
    if "transformer" in parts:
        _clear(transformer)
    if "clip" in parts:
        _clear(clip)
    files = [load_lora(spec.path) for spec in loras]
    _release_unused({id(f) for f in files})
    per_layer: dict[int, tuple[nn.Module, list[_Term]]] = {}
    notes = []
    for spec, lora in zip(loras, files):
        resolved = _resolve(lora, transformer, clip, parts)
        applied = sum(len(c) for c in resolved.counts.values())
        if not (applied or resolved.clip_absent or resolved.t5 or resolved.elsewhere):
            raise UserError(_no_fit(lora, resolved))
        for layer, target, pair in resolved.terms:
            if spec.strength == 0:
                continue
            term = _Term(pair, spec.strength * pair.scale, target.rows, target.up_rows)
            per_layer.setdefault(id(layer), (layer, []))[1].append(term)
        notes += _notes(lora, spec, resolved, parts)
    for layer, terms in per_layer.values():
        layer.patches = (*layer.patches, LoraPatch(terms))
    return notes


def clip_lora_key(loras: list[LoraSpec]) -> str:
    """What the CLIP-L LoRAs of a job are (file identity and strength), for the text-embedding cache's key;
    "" when no LoRA has a CLIP-L part."""
    keys = []
    for spec in loras:
        lora = load_lora(spec.path)
        if spec.strength != 0 and any(_is_clip_key(k) and not k.startswith(_T5_MARKERS) for k in lora.pairs):
            keys.append(f"{lora.path.resolve()}:{lora.mtime_ns}:{lora.size}:{spec.strength!r}")
    return "|".join(keys)


def _release_unused(used: set[int]) -> None:
    for lora in _FILES.values():
        if id(lora) not in used:
            lora.release()


def _no_fit(lora: LoraFile, resolved: _Resolved) -> str:
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
        f"(e.g. {_examples(keys)}); use a FLUX LoRA."
    )


def _notes(lora: LoraFile, spec: LoraSpec, r: _Resolved, parts: tuple[str, ...]) -> list[str]:
    applied = []
    if r.counts["transformer"]:
        applied.append(f"{len(r.counts['transformer'])} transformer layers")
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
            f"(e.g. {_examples(r.unmatched)})"
        )
    if r.misfit:
        notes.append(
            f"LoRA {lora.name}: {len(r.misfit)} layers have other sizes than this model's and were not applied "
            f"(e.g. {r.misfit[0]})"
        )
    if "transformer" in parts and lora.unsupported:  # said once per job: by the transformer's call
        notes.append(
            f"LoRA {lora.name}: {len(lora.unsupported)} tensors are of kinds FluxDeck does not apply "
            f"(DoRA, LoHa/LoKr, biases) and were left out (e.g. {_examples(lora.unsupported)})"
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


# ---- names, hashes and prompt tags (A1111 style) ----

_HASHES: dict[tuple[str, int, int], str] = {}


def lora_name(path: str | Path) -> str:
    """The name A1111 uses in `<lora:name:strength>` and `Lora hashes`: the file name without extension."""
    name = Path(path).name
    for suffix in LORA_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of the whole file (hex), computed once per path, modification time and size."""
    p = Path(path)
    stat = p.stat()
    key = (str(p.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


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
