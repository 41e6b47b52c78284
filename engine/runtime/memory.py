"""Where each weight lives: the VRAM budget, resident blocks, and blocks streamed from host memory ahead of use.

Every model's weights stay where they were loaded (host memory, in their stored dtype; pinned when streaming to a
GPU). For the model that runs, the manager stages device copies through `ops.Staged`: the blocks that fit the
budget once (resident), the others just before they run, the next one copying on a side stream while the
current one computes, dropped after. Only the storage dtype crosses the bus, nothing is copied back, and the
model code knows none of this: `ops.fetch` reads the staged copy when there is one.
"""

from __future__ import annotations

import ctypes
import math
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from engine.runtime import ops
from engine.runtime.placement import LOOKAHEAD, Plan, make_plan, may_pin, vram_budget

GB = 1024**3


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks a model is streamed by (what is left of it is small and stays resident): those it
    declares (`streamable_blocks`, our own models), else the encoder layers of transformers' T5 and CLIP."""
    declared = getattr(model, "streamable_blocks", None)
    if declared is not None:
        return list(declared())
    for path in ("encoder.block", "encoder.layers"):  # T5, CLIP
        try:
            return list(model.get_submodule(path))
        except AttributeError:
            continue
    return []


def cast_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if ops.is_cast_layer(m)]


def stored_bytes(layers: list[nn.Module]) -> int:
    total = 0
    for layer in layers:
        for t in (layer.weight, layer.bias, layer.scale_weight):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


@dataclass
class Stats:
    """What the streaming did during the last forward passes (reset per job)."""

    bytes_streamed: int = 0
    passes: int = 0
    budget_lowered: int = 0


class _Copier:
    """Copies a block's stored tensors to the device: async from pinned memory on a side stream on CUDA,
    a plain copy elsewhere (on the CPU the copy stands in for the transfer, so the CPU tests run this path)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _copy(self, t: torch.Tensor | None, resident: bool) -> torch.Tensor | None:
        if t is None:
            return None
        if self.device.type == "cpu":
            return t if resident else t.clone()  # resident on the CPU: used in place
        return t.to(self.device, non_blocking=True)

    def stage(self, layers: list[nn.Module], resident: bool = False) -> tuple[list[ops.Staged], object]:
        def copies() -> list[ops.Staged]:
            return [
                ops.Staged(*(self._copy(t, resident) for t in (m.weight, m.bias, m.scale_weight)))
                for m in layers
            ]

        if self.stream is None:
            return copies(), None
        with torch.cuda.stream(self.stream):
            staged = copies()
            event = torch.cuda.Event()
            event.record(self.stream)
        return staged, event

    def ready(self, staged: list[ops.Staged], event) -> None:
        """Make the compute stream wait for the copies, and tell the allocator it uses them."""
        if event is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for s in staged:
            for t in (s.weight, s.bias, s.scale_weight):
                if t is not None:
                    t.record_stream(current)


@dataclass
class _Managed:
    model: nn.Module
    blocks: list[list[nn.Module]]  # cast layers per block
    rest: list[nn.Module]  # cast layers outside the blocks
    block_bytes: list[int]
    rest_bytes: int
    plan: Plan | None = None  # set while the model is active on the device
    in_flight: dict[int, tuple[list[ops.Staged], object]] = field(default_factory=dict)
    hooks: list = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)  # this model's share


class MemoryManager:
    """One per engine. `budget_bytes`: weights allowed on the device (None: no limit)."""

    def __init__(self, device: torch.device, budget_bytes: int | None = None):
        self.device = device
        self.budget = budget_bytes
        self.stats = Stats()
        self._copier = _Copier(device)
        self._models: dict[int, _Managed] = {}
        self._active: list[int] = []  # activation order, oldest first
        self._shares: dict[int, float] = {}  # models that run together: their part of the budget (else all)

    # ---- registration ----

    def manage(self, model: nn.Module) -> nn.Module:
        """Take charge of a model: small non-cast tensors move to the device now; weights stay where they are."""
        blocks = blocks_of(model)
        block_layers = [cast_layers(b) for b in blocks]
        in_blocks = {id(m) for layers in block_layers for m in layers}
        rest = [m for m in cast_layers(model) if id(m) not in in_blocks]
        managed = _Managed(
            model, block_layers, rest, [stored_bytes(b) for b in block_layers], stored_bytes(rest)
        )
        _move_small_tensors(model, self.device)
        for i, block in enumerate(blocks):
            managed.hooks.append(block.register_forward_pre_hook(self._before(managed, i)))
            managed.hooks.append(block.register_forward_hook(self._after(managed, i)))
        self._models[id(model)] = managed
        return model

    def share_budget(self, models: list[nn.Module]) -> None:
        """Models that run together every step (a transformer and its ControlNets) plan within parts of the
        one budget, in proportion to their weights, so that activating one never evicts another; an empty
        list gives every model the whole budget again. A model whose part changes is planned again."""
        sizes = {id(m): self._models[id(m)].rest_bytes + sum(self._models[id(m)].block_bytes) for m in models}
        total = sum(sizes.values())
        shares = {i: size / total for i, size in sizes.items()} if len(sizes) > 1 and total else {}
        for i, managed in self._models.items():
            if shares.get(i, 1.0) != self._shares.get(i, 1.0):
                self._release(managed)
                if i in self._active:
                    self._active.remove(i)
        self._shares = shares

    def _budget_of(self, managed: _Managed) -> int | None:
        share = self._shares.get(id(managed.model), 1.0)
        return None if self.budget is None else int(self.budget * share)

    def forget(self, model: nn.Module) -> None:
        self._shares.pop(id(model), None)
        managed = self._models.pop(id(model), None)
        if managed is None:
            return
        self._release(managed)
        for hook in managed.hooks:
            hook.remove()
        if id(model) in self._active:
            self._active.remove(id(model))

    # ---- activation: which model's weights are on the device ----

    def activate(self, model: nn.Module) -> Plan:
        """Stage `model`'s resident weights, evicting the least recently used models if the budget needs it."""
        managed = self._models[id(model)]
        while managed.plan is None:
            managed.plan = make_plan(managed.block_bytes, managed.rest_bytes, self._budget_of(managed))
            self._evict_for(managed)
            try:
                self._stage_resident(managed)
            except torch.OutOfMemoryError:  # the budget was too hopeful: keep half as many blocks, try again
                kept = len(managed.plan.resident)
                if not kept:
                    raise
                self._release(managed)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.budget = self._whole_budget(managed, _budget_keeping(managed, kept // 2))
                self.stats.budget_lowered += 1
        if id(model) in self._active:
            self._active.remove(id(model))
        self._active.append(id(model))
        return managed.plan

    def stats_of(self, model: nn.Module) -> Stats:
        return self._models[id(model)].stats

    def reset_stats(self) -> None:
        self.stats = Stats()
        for managed in self._models.values():
            managed.stats = Stats()

    def set_budget(self, budget_bytes: int | None) -> None:
        """A new budget: every model is planned again when it next runs."""
        self.budget = budget_bytes
        for managed in self._models.values():
            self._release(managed)
        self._active.clear()

    def lower_budget(self, model: nn.Module) -> int:
        """After an out-of-memory: keep half as many blocks resident (and at least one fewer); returns the new
        budget in bytes."""
        managed = self._models[id(model)]
        plan = managed.plan or make_plan(managed.block_bytes, managed.rest_bytes, self._budget_of(managed))
        keep = max(0, min(len(plan.resident) // 2, len(plan.resident) - 1))
        self.budget = self._whole_budget(managed, _budget_keeping(managed, keep))
        self._release(managed)
        for other in list(self._active):
            if other != id(model):
                self._release(self._models[other])
                self._active.remove(other)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.stats.budget_lowered += 1
        self.activate(model)
        return self.budget

    def _whole_budget(self, managed: _Managed, own: int) -> int:
        """The budget that gives this model `own` bytes through its share."""
        return math.ceil(own / self._shares.get(id(managed.model), 1.0))

    def _evict_for(self, managed: _Managed) -> None:
        if self.budget is None:
            return
        others = [i for i in self._active if i != id(managed.model)]
        for other_id in others:
            used = sum(self._models[i].plan.resident_bytes for i in self._active
                       if i != id(managed.model) and self._models[i].plan)  # fmt: skip
            if used + managed.plan.resident_bytes <= self.budget:
                break
            self._release(self._models[other_id])
            self._active.remove(other_id)

    def _stage_resident(self, managed: _Managed) -> None:
        layers = list(managed.rest)
        for i in sorted(managed.plan.resident):
            layers += managed.blocks[i]
        streamed = [m for i, b in enumerate(managed.blocks) if i not in managed.plan.resident for m in b]
        if self.device.type == "cuda" and streamed and _ram_allows_pinning(stored_bytes(streamed)):
            _pin(streamed)
        staged, event = self._copier.stage(layers, resident=True)
        self._copier.ready(staged, event)
        for layer, s in zip(layers, staged, strict=True):
            layer.staged = s

    def _release(self, managed: _Managed) -> None:
        for layer in managed.rest + [m for block in managed.blocks for m in block]:
            layer.staged = None
        managed.in_flight.clear()
        managed.plan = None

    # ---- streaming hooks ----

    def _streamed_after(self, managed: _Managed, index: int) -> list[int]:
        return [i for i in range(index + 1, len(managed.blocks)) if i not in managed.plan.resident][
            :LOOKAHEAD
        ]

    def _issue(self, managed: _Managed, index: int) -> None:
        if index not in managed.in_flight:
            managed.in_flight[index] = self._copier.stage(managed.blocks[index])
            self.stats.bytes_streamed += managed.block_bytes[index]
            managed.stats.bytes_streamed += managed.block_bytes[index]

    def _before(self, managed: _Managed, index: int):
        def hook(_module, _args):
            if managed.plan is None:
                self.activate(managed.model)
            if index == 0:
                self.stats.passes += 1
                managed.stats.passes += 1
            if index not in managed.plan.resident:
                self._issue(managed, index)
                staged, event = managed.in_flight[index]
                self._copier.ready(staged, event)
                for layer, s in zip(managed.blocks[index], staged, strict=True):
                    layer.staged = s
            for ahead in self._streamed_after(managed, index):
                self._issue(managed, ahead)

        return hook

    def _after(self, managed: _Managed, index: int):
        def hook(_module, _args, _output):
            if managed.plan is not None and index not in managed.plan.resident:
                managed.in_flight.pop(index, None)
                for layer in managed.blocks[index]:
                    layer.staged = None

        return hook


def _budget_keeping(managed: _Managed, blocks: int) -> int:
    """A budget under which `make_plan` keeps at most `blocks` of this model's blocks resident (and streams
    at least one)."""
    largest = max(managed.block_bytes, default=0)
    everything = managed.rest_bytes + sum(managed.block_bytes)
    return min(managed.rest_bytes + (LOOKAHEAD + 1 + blocks) * largest, everything - 1)


def _move_small_tensors(model: nn.Module, device: torch.device) -> None:
    """Norm scales and the like (everything outside the cast layers' weights) live on the compute device."""
    for module in model.modules():
        if ops.is_cast_layer(module):
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device != device:
                setattr(module, name, nn.Parameter(param.detach().to(device), requires_grad=False))
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.device != device:
                setattr(module, name, buf.to(device))


def _pin(layers: list[nn.Module]) -> None:
    """Page-locked host copies, so copies to the GPU run asynchronously at the bus's speed."""
    for layer in layers:
        for name in ("weight", "bias"):
            t = getattr(layer, name)
            if t is not None and not t.is_pinned():
                setattr(layer, name, nn.Parameter(t.detach().pin_memory(), requires_grad=False))
        if layer.scale_weight is not None:
            layer.scale_weight = layer.scale_weight.pin_memory()


def _ram_allows_pinning(nbytes: int) -> bool:
    import psutil

    return may_pin(psutil.virtual_memory().available, nbytes)


def tune_host_allocator() -> None:
    """glibc keeps freed blocks below its dynamic mmap threshold (up to 32 MB) in the heap, where fragmentation
    holds them: each layer's cast weight would leave its footprint in RSS. A fixed 2 MB threshold returns
    large buffers to the OS as soon as they are freed. (Windows and macOS allocators need no help here.)"""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 2 * 1024 * 1024)
    libc.mallopt(m_trim_threshold, 2 * 1024 * 1024)


def auto_budget(device: torch.device) -> int | None:
    """Free VRAM less a reserve for activations and the autoencoder; None on the CPU (no limit)."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return vram_budget(free, total)
