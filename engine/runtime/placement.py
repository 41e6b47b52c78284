"""Where weights go, as rules that need no torch: the VRAM budget left after a reserve, which blocks stay
resident, when streamed blocks may be pinned, and the RAM a set of models needs on the CPU or beside a GPU.

The memory manager applies these rules to the models it loads; the wizard and the models screen apply the same
rules to the files a preset would download (their bytes spread over the architecture's blocks), so a verdict is
the engine's own placement predicted, never a figure set by hand. The two constants measured on the engine
(`RSS_PER_LARGEST`, `RUNTIME_RAM`) are pinned by tests/test_memory_rss.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GB = 1024**3
LOOKAHEAD = 2  # streamed blocks copied ahead of the one that runs
VRAM_RESERVE = 1.5 * GB  # kept free for activations and the autoencoder: at least this …
VRAM_RESERVE_SHARE = 0.12  # … or this share of the card, whichever is larger
VRAM_IN_USE = 0.4 * GB  # what a display and the CUDA context hold before FluxDeck starts (predictions only)
PIN_FACTOR, PIN_SLACK = 1.5, 2 * GB  # streamed blocks are pinned only when RAM keeps this much room
# Peak RSS of a CPU generation over the largest component's stored bytes: models are memory-mapped, kept in
# their stored dtype and released per stage; what is added is the compute-dtype copy of the layer that runs,
# the activations and the allocator's slack. Measured 1.17-1.21 (tests/test_memory_rss.py holds it within 0.1).
RSS_PER_LARGEST = 1.2
RUNTIME_RAM = 1.0 * GB  # Python, torch, tokenizers and the TUI's engine process before any weight
ACTIVATIONS_IN_RESERVE = 1.0 * GB  # of the reserve, what activations may take before the budget gives way


def spread(count: int, keep: int) -> list[int]:
    """`keep` of `count` indices, evenly spread, so streamed copies overlap the compute of resident blocks."""
    if keep <= 0:
        return []
    if keep >= count:
        return list(range(count))
    return sorted({math.floor(i * count / keep) for i in range(keep)})


@dataclass
class Plan:
    resident: set[int]  # block indices kept on the device
    resident_bytes: int  # every resident byte: kept blocks and the non-block rest
    streamed_bytes: int  # bytes crossing the bus per forward pass


def make_plan(block_bytes: list[int], rest_bytes: int, budget: int | None) -> Plan:
    """The most blocks that fit `budget` (None: all), with room kept for the streamed blocks in flight."""
    count, total = len(block_bytes), sum(block_bytes)
    if budget is None or rest_bytes + total <= budget:
        return Plan(set(range(count)), rest_bytes + total, 0)
    largest = max(block_bytes, default=0)
    room = budget - rest_bytes - (LOOKAHEAD + 1) * largest
    keep = min(count, max(0, room // max(1, largest)))
    resident = set(spread(count, keep))
    streamed = sum(b for i, b in enumerate(block_bytes) if i not in resident)
    return Plan(resident, rest_bytes + total - streamed, streamed)


def activation_bytes(tokens: int, hidden: int, mlp: int, dtype_bytes: int, rows: int = 1) -> int:
    """The largest live activations of a FLUX block over `tokens` tokens in `rows` batch rows: its input and
    output, its qkv and its MLP's hidden state at once (attention runs in memory-efficient kernels that hold no
    tokens² scores). A 1024² FLUX.1 step in bf16: 0.24 GB; Kontext's reference doubles the image tokens."""
    return rows * tokens * (5 * hidden + mlp) * dtype_bytes


def activation_excess(activations: int) -> int:
    """What a job's activations need beyond the reserve's share for them: taken from the weights' budget."""
    return max(0, activations - int(ACTIVATIONS_IN_RESERVE))


def vram_budget(free: int, total: int, activations: int = 0) -> int:
    """Weight bytes allowed on a card with `free` of `total` bytes free: the rest is the reserve for activations
    and the autoencoder, grown when a job's sequence needs more (`activations`: `activation_bytes`)."""
    reserve = int(max(VRAM_RESERVE, VRAM_RESERVE_SHARE * total)) + activation_excess(activations)
    return max(0, free - reserve)


def may_pin(available: int, nbytes: int) -> bool:
    """Page-locked memory cannot be paged out: pin only with room to spare, else stream from pageable memory."""
    return available > PIN_FACTOR * nbytes + PIN_SLACK


@dataclass(frozen=True)
class ModelBytes:
    """One model as the memory manager sees it: its blocks' stored bytes and the rest's."""

    name: str  # "transformer", "t5", …
    block_bytes: tuple[int, ...]
    rest_bytes: int

    @property
    def total(self) -> int:
        return sum(self.block_bytes) + self.rest_bytes


@dataclass(frozen=True)
class Placement:
    """What running these models one stage at a time takes on a machine."""

    gpu: bool
    plans: dict[str, Plan]  # per model, on a GPU (empty on the CPU)
    ram_needed: int  # to run without re-reading weights from disk
    ram_well: int  # to run at full speed (on a GPU: streamed blocks pinned)
    largest: str  # the model whose stage sets the peak

    def streamed_bytes(self, name: str) -> int:
        plan = self.plans.get(name)
        return plan.streamed_bytes if plan else 0


def place(models: list[ModelBytes], vram_total: int | None, activations: int = 0) -> Placement:
    """The placement of `models` (run one after another, each released before the next, as the engine's stages
    do) on the CPU (`vram_total` None) or beside a card of `vram_total` bytes, and the RAM that takes.

    On the CPU the peak is the largest model's stage: its stored bytes × RSS_PER_LARGEST. Beside a GPU each
    model gets the budget `vram_budget` leaves on a card holding VRAM_IN_USE already; what does not fit streams
    from RAM every step, so its bytes must stay in RAM (pinned when `may_pin` allows, for full speed)."""
    largest = max(models, key=lambda m: m.total)
    if vram_total is None:
        peak = int(RSS_PER_LARGEST * largest.total) + activations + int(RUNTIME_RAM)
        return Placement(False, {}, peak, peak, largest.name)
    budget = vram_budget(max(0, vram_total - int(VRAM_IN_USE)), vram_total, activations)
    plans = {m.name: make_plan(list(m.block_bytes), m.rest_bytes, budget) for m in models}
    streamed = max(plan.streamed_bytes for plan in plans.values())
    heaviest = max(models, key=lambda m: plans[m.name].streamed_bytes)
    needed = streamed + int(RUNTIME_RAM)
    well = int(PIN_FACTOR * streamed + PIN_SLACK) + int(RUNTIME_RAM) if streamed else needed
    return Placement(True, plans, needed, well, heaviest.name)
