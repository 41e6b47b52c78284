"""The models a generation uses, per role, kept between jobs while RAM allows; the memory manager that places
their weights; the tokenizers; the preview projection. A stage asks for a model with `use` and gets it loaded and
active on the device: which other models that evicts is this module's business, never the pipeline's."""

from __future__ import annotations

import gc
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from engine.formats.lora import LoraLibrary
from engine.formats.weights import Component
from engine.generation.preview import fit_projection
from engine.models.build import build_model
from engine.models.qwen3_encoder import load_qwen3_tokenizer, qwen3_tokenizer_identity
from engine.models.text_encoders import load_clip_tokenizer, load_t5_tokenizer, tokenizer_identity
from engine.runtime import ops
from engine.runtime.memory import GB, MemoryManager, auto_budget
from engine.runtime.placement import activation_excess

RAM_SHARE = 0.6  # of the machine's RAM that loaded models may take before older ones are let go
EVICTION_ORDER = (
    "siglip",
    "redux",
    "t5",
    "clip",
    "text_encoder",
    "vae",
    "transformer",
)  # the embedding cache stands in for the encoders


def _total_ram() -> int:
    import psutil

    return psutil.virtual_memory().total


@dataclass(frozen=True)
class ModelKey:
    """A loaded model's identity: its file (path, modification time), where in it, and how it computes."""

    path: str
    prefix: str
    mtime: float
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, component: Component, dtype: torch.dtype, device: torch.device) -> ModelKey:
        path = component.file.path
        return cls(str(path.resolve()), component.prefix, path.stat().st_mtime, dtype, device)


@dataclass
class _Loaded:
    key: ModelKey
    model: nn.Module
    nbytes: int  # what it holds in RAM: the file's bytes for it, or its expanded fp32 copy


@dataclass
class ModelCache:
    """keep: "auto" keeps models between stages and jobs while RAM holds them (older ones go when a new one
    would not fit), "never" lets a stage's models go when the stage is done, "always" keeps everything.
    A model used in the current job stays until `release` says its stage is done."""

    keep: str = "auto"
    memory: MemoryManager | None = None
    loads: Counter[str] = field(default_factory=Counter)  # loads per role: what tests and benchmarks read
    loras: LoraLibrary = field(default_factory=LoraLibrary)  # the LoRA files read, patched onto these models
    _loaded: dict[str, _Loaded] = field(default_factory=dict)
    _in_use: set[str] = field(default_factory=set)
    _tokenizers: dict[tuple[str, str], object] = field(default_factory=dict)
    _projections: dict[ModelKey, torch.Tensor] = field(default_factory=dict)
    _auto_budget: int | None = None
    _activation_cut: int = 0  # taken from this job's automatic budget for its activations
    _budget_was_auto: bool = True

    # ---- what is loaded ----

    @property
    def roles(self) -> list[str]:
        return sorted(self._loaded)

    def loaded(self, role: str) -> nn.Module | None:
        entry = self._loaded.get(role)
        return entry.model if entry else None

    def key(self, role: str) -> ModelKey | None:
        entry = self._loaded.get(role)
        return entry.key if entry else None

    # ---- a job ----

    def start_job(self, device: torch.device, budget_gb: float | None, activations: int = 0) -> MemoryManager:
        """The manager for `device`, its budget set for this job. The automatic budget is measured once, before
        this cache holds any VRAM (measured later, our own weights would shrink it job after job), follows any
        out-of-memory cut, and gives way to a long sequence's activations (`activations`: placement's
        `activation_bytes` for this job) for this job only."""
        self._in_use.clear()
        if self.memory is None or self.memory.device != device:
            for role in list(self._loaded):
                self._drop(role)
            self._auto_budget = auto_budget(device)
            self.memory = MemoryManager(device, self._auto_budget)
        elif self._budget_was_auto and self.memory.budget is not None:
            # an out-of-memory retry may have lowered it; the last job's cut for its activations is given back
            self._auto_budget = self.memory.budget + self._activation_cut
        self._budget_was_auto = budget_gb is None
        budget = self._auto_budget if budget_gb is None else int(budget_gb * GB)
        self._activation_cut = 0
        if budget_gb is None and budget is not None:
            self._activation_cut = min(budget, activation_excess(activations))
            budget -= self._activation_cut
        if self.memory.budget != budget:
            self.memory.set_budget(budget)
        self.memory.reset_stats()
        self.memory.share_budget([])  # a job with ControlNets shares it again (engine/generation/control.py)
        return self.memory

    def use(self, component: Component, dtype: torch.dtype, device: torch.device) -> nn.Module:
        """The model for `component`, loaded (or kept from before) and active on the device."""
        key = ModelKey.of(component, dtype, device)
        entry = self._loaded.get(component.role)
        if entry is None or entry.key != key:
            entry = self._load(component, key)
        self._in_use.add(component.role)
        self.memory.activate(entry.model)
        return entry.model

    def release(self, roles: tuple[str, ...]) -> None:
        """A stage is done with these models: keep="never" lets them go now (their memory-mapped pages with
        them); otherwise a later load may let them go when RAM is short."""
        self._in_use.difference_update(roles)
        if self.keep != "never":
            return
        for role in roles:
            self._drop(role)
        gc.collect()

    # ---- loading and the RAM policy ----

    def _load(self, component: Component, key: ModelKey) -> _Loaded:
        self._drop(component.role)
        self._make_room_for(component)
        model = build_model(component, key.dtype)
        nbytes = component.nbytes
        if self._expands(component, model, key.dtype, key.device):
            nbytes = ops.expand(model, key.dtype)
        entry = _Loaded(key, self.memory.manage(model), nbytes)
        self._loaded[component.role] = entry
        self.loads[component.role] += 1
        return entry

    def _held_bytes(self, besides: str) -> int:
        return sum(entry.nbytes for role, entry in self._loaded.items() if role != besides)

    def _expands(
        self, component: Component, model: nn.Module, dtype: torch.dtype, device: torch.device
    ) -> bool:
        """fp32 compute on the CPU from a narrower file (bf16, fp8, GGUF): expand the transformer's weights once
        instead of at every layer call of every step, while RAM holds the fp32 copy beside the other loaded
        models (the keep policy's share); with keep="never", or RAM short, it stays per call."""
        if component.role != "transformer" or device.type != "cpu" or dtype != torch.float32:
            return False
        if self.keep == "never" or not ops.needs_expanding(model, dtype):  # not ops...: an fp32 file
            return False
        return self._held_bytes(component.role) + ops.expanded_bytes(model, dtype) <= RAM_SHARE * _total_ram()

    def _make_room_for(self, component: Component) -> None:
        """keep="auto": before a model loads, others go while RAM cannot hold them all, in EVICTION_ORDER (the
        transformer last, so a seed hunt keeps it); never one the current job still uses."""
        if self.keep != "auto":
            return
        room = RAM_SHARE * _total_ram()
        controlnets = sorted(role for role in self._loaded if role.startswith("controlnet"))
        for role in (*controlnets, *EVICTION_ORDER):
            if component.nbytes + self._held_bytes(component.role) <= room:
                return
            if role != component.role and role in self._loaded and role not in self._in_use:
                self._drop(role)
                gc.collect()

    def _drop(self, role: str) -> None:
        entry = self._loaded.pop(role, None)
        if entry is not None and self.memory is not None:
            self.memory.forget(entry.model)

    # ---- what goes with the models ----

    def tokenizer(self, kind: str, folder: Path | None):
        key = (
            kind,
            qwen3_tokenizer_identity(folder) if kind == "qwen3" else tokenizer_identity(kind, folder),
        )  # a tokenizer replaced in its folder is read again
        if key not in self._tokenizers:
            loaders = {"clip": load_clip_tokenizer, "t5": load_t5_tokenizer, "qwen3": load_qwen3_tokenizer}
            loader = loaders[kind]
            self._tokenizers[key] = loader(folder)
        return self._tokenizers[key]

    def preview_projection(self, vae: Component, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The latent → RGB map for this autoencoder's previews, fitted once per autoencoder file."""
        key = ModelKey.of(vae, dtype, device)
        if key not in self._projections:
            self._projections[key] = fit_projection(self.use(vae, dtype, device), device, dtype)
        return self._projections[key]
