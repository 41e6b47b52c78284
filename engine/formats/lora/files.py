"""Reading a LoRA file: its tensor names grouped into up/down pairs with their alpha/rank scale, checked; and
`LoraFiles`, the files one owner has read, kept while their modification time and size stay."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.contract import layout
from engine.contract.errors import UserError
from engine.formats.lora.layouts import IMG_IN_NAMES, TRANSFORMER_PREFIXES, strip
from engine.formats.safetensors_file import SafetensorsFile
from engine.formats.weights import describe, find_components

LORA_SUFFIXES = layout.LORA_SUFFIXES

# A whole transformer given to --lora, by its img_in's input features
TRANSFORMER_KINDS = {384: "the FLUX.1 Fill transformer", 128: "a FLUX.1 Canny/Depth [dev] transformer"}

# BFL's control LoRAs carry the QK norms' scales whole: they replace the base model's (ComfyUI's "set" patch)
NORM_SCALE_ENDING = "_norm.scale"

# Tensor-name endings of a LoRA pair, longest first (".lora.down.weight" before ".down.weight").
PAIR_ENDINGS = sorted(
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
        ".lora_B.bias": "bias",  # BFL's LinearLora (the Canny/Depth control LoRAs): up has a bias
        ".alpha": "alpha",
    }.items(),
    key=lambda item: -len(item[0]),
)


def lora_name(path: str | Path) -> str:
    """The name A1111 uses in `<lora:name:strength>` and `Lora hashes`: the file name without extension."""
    name = Path(path).name
    for suffix in LORA_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


@dataclass
class LoraPair:
    """One layer's down (rank × in) and up (out × rank) matrices and its alpha/rank scale."""

    key: str  # the layer's name in the file, without the pair's endings
    names: list[str]  # the file's tensor names, for messages
    down: torch.Tensor
    up: torch.Tensor
    scale: float
    bias: torch.Tensor | None = None  # up's bias (BFL's LinearLora), added to the layer's bias
    _on: dict = field(default_factory=dict, repr=False)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def bias_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The bias on `device` in `dtype`, copied there once (only for a pair that has one)."""
        key = ("bias", device, dtype)
        cached = self._on.get(key)
        if cached is None:
            cached = self._on[key] = self.bias.to(device=device, dtype=dtype)
        return cached

    def tensors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) on `device` in `dtype`, copied there once and kept while this LoRA is in use."""
        key = (device, dtype)
        cached = self._on.get(key)
        if cached is None:
            cached = (self.up.to(device=device, dtype=dtype), self.down.to(device=device, dtype=dtype))
            self._on[key] = cached
        return cached


@dataclass
class LoraWeights:
    """The pairs of one LoRA file, as read (not to be confused with the launcher's `LoraFile`, a file listed in
    the loras folder)."""

    path: Path
    name: str  # the file name without its extension: A1111's `<lora:name:...>`
    pairs: dict[str, LoraPair]
    unsupported: list[str]  # tensor names of kinds not applied (DoRA, LoHa/LoKr, biases, lone halves)
    mtime_ns: int
    size: int
    # norm scales that replace the model's (BFL control LoRAs): the norm's name in the file → its scale
    norm_scales: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def img_in_width(self) -> int | None:
        """The input features the file's `img_in` pair takes (None: it has none). A Canny/Depth control LoRA
        takes 128, widening a plain transformer's 64 (`engine.generation.edits`)."""
        for key, pair in self.pairs.items():
            if strip(key, TRANSFORMER_PREFIXES) in IMG_IN_NAMES:
                return int(pair.down.shape[1])
        return None

    def release(self) -> None:
        """Drop the device copies (the file is no longer asked for)."""
        for pair in self.pairs.values():
            pair._on.clear()


class LoraFiles:
    """The LoRA files an owner (an engine) has read: each read once, the same object while the file's
    modification time and size stay; beyond `capacity` files the least recently asked for is dropped."""

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self._files: OrderedDict[str, LoraWeights] = OrderedDict()

    def load(self, path: str | Path) -> LoraWeights:
        p = Path(path)
        if not p.exists():
            raise UserError(f"The LoRA {path} does not exist: check the path given to --lora.")
        if not p.is_file():
            raise UserError(f"The LoRA {path} is a folder: give the .safetensors file inside it to --lora.")
        stat = p.stat()
        key = str(p.resolve())
        cached = self._files.get(key)
        if cached is not None and (cached.mtime_ns, cached.size) == (stat.st_mtime_ns, stat.st_size):
            self._files.move_to_end(key)
            return cached
        loaded = read_lora(p, stat.st_mtime_ns, stat.st_size)
        self._files[key] = loaded
        self._files.move_to_end(key)
        while len(self._files) > self.capacity:
            self._files.popitem(last=False)[1].release()
        return loaded

    def release_unused(self, used: Iterable[LoraWeights]) -> None:
        """Drop the device copies of every file not in `used`."""
        keep = {id(lora) for lora in used}
        for lora in self._files.values():
            if id(lora) not in keep:
                lora.release()


def read_lora(path: Path, mtime_ns: int, size: int) -> LoraWeights:
    """The file's pairs, checked (ranks, alphas, finite values), as copies: nothing keeps the file open."""
    file = SafetensorsFile(path)
    names = file.names()
    if not any(name.endswith(ending) for name in names for ending, _ in PAIR_ENDINGS):
        transformer = find_components(file).get("transformer")
        width = (transformer.shapes().get("img_in.weight") or (0, 0))[-1] if transformer is not None else 0
        kind = TRANSFORMER_KINDS.get(width)
        if kind is not None:
            raise UserError(
                f"{path} is {kind}, not a LoRA: give it as the transformer (--transformer, or diffusion_models/ "
                "in the models folder) instead of --lora."
            )
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
    norm_scales: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(NORM_SCALE_ENDING) and tensor.ndim == 1 and tensor.is_floating_point():
            if not _finite(tensor):
                raise UserError(
                    f"{path} holds NaN or infinite values ({name}): the file is broken; get it again."
                )
            norm_scales[name.removesuffix(".scale")] = tensor
            continue
        for ending, part in PAIR_ENDINGS:
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
        scale = _scale(path, key, parts, down.shape[0], alphas)
        bias = parts["bias"][1] if "bias" in parts else None
        if bias is not None and (
            bias.ndim != 1 or bias.shape[0] != up.shape[0] or not bias.is_floating_point()
        ):
            raise UserError(
                f"{path} has a {key}.lora_B.bias of shape {tuple(bias.shape)} for an up of {up.shape[0]} rows: "
                "the file is broken; get it again."
            )
        if not (_finite(down) and _finite(up) and (bias is None or _finite(bias))):
            raise UserError(
                f"{path} holds NaN or infinite values ({key}): the file is broken; get it again or remove it."
            )
        pairs[key] = LoraPair(key, [name for name, _ in parts.values()], down, up, scale, bias)
    if not pairs:
        raise UserError(
            f"{path} holds no LoRA up/down pairs FluxDeck can apply (e.g. {', '.join(unsupported[:3])}): "
            "use a plain LoRA (not LoHa, LoKr or DoRA)."
        )
    return LoraWeights(path, lora_name(path), pairs, unsupported, mtime_ns, size, norm_scales)


def _scale(path: Path, key: str, parts: dict, rank: int, alphas) -> float:
    """alpha / rank, from the pair's `.alpha` tensor or else the file's metadata."""
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
    return scale


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
