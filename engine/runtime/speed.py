"""This machine's sustained speed, measured in a few seconds (the selftest does it once and saves it): one FLUX
double-stream block of the real width run forward (its FLOPs per second: products, attention, norms and all),
matrix products in each compute dtype (for the text encoders and the autoencoder), the expansion of each stored
format to the compute dtype, and on a GPU the pinned host-to-device bandwidth. Time estimates divide a step's
FLOPs and bytes by these (docs/estimates.md)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from engine.atomic_write import write_atomic
from engine.formats.gguf_quants import QType, dequantize, raw_nbytes

# FLUX's own shapes: 1024 tokens through a 3072 → 3072 product; a double block at FLUX.1's width over 1024 image
# and 256 text tokens (512² with [schnell]'s T5 length); expansions of a 3072 → 12288 layer, a fresh output each
# time as in a forward pass.
TOKENS, WIDTH, MLP = 1024, 3072, 12288
BLOCK_TOKENS = (1024, 256)
DEFAULT_FILE = Path(__file__).resolve().parents[2] / "logs" / "speed.json"  # in the project folder
SECONDS = 0.4  # per measurement, after one warm-up call
FORMATS = ("bf16", "fp8", "Q8_0", "Q4_0", "Q4_K")  # stored formats that expand before the product


@dataclass
class Speed:
    device: str  # "cpu" or "cuda"
    compute_dtype: str  # what the engine computes in there: "bfloat16", "float16", "float32"
    flops: dict[str, float] = field(default_factory=dict)  # dtype → FLOP/s of a sustained matmul
    block_flops: float = 0.0  # FLOP/s of a whole FLUX block in the compute dtype (what a step runs at)
    expand: dict[str, float] = field(default_factory=dict)  # format → weights expanded per second
    h2d: float | None = None  # pinned host → device bytes per second (GPU)
    gpu: str | None = None

    @property
    def compute_flops(self) -> float:
        return self.flops[self.compute_dtype]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Speed:
        data = json.loads(text)
        speed = cls(**data)
        numbers = [speed.block_flops, *speed.flops.values(), *speed.expand.values()]
        numbers += [speed.h2d] if speed.h2d else []
        if speed.compute_dtype not in speed.flops or not all(
            isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in numbers
        ):
            raise ValueError("a speed file with missing or non-positive figures")
        return speed


def _rate(work: float, run: Callable[[], object], sync: Callable[[], None]) -> float:
    """`work` units per second of `run`, repeated for SECONDS after a warm-up."""
    run()
    sync()
    count, start = 0, time.perf_counter()
    while True:
        run()
        count += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= SECONDS:
            return work * count / elapsed


def _expand_case(fmt: str, dtype: torch.dtype, device: torch.device) -> Callable[[], object] | None:
    shape = (MLP, WIDTH)
    if fmt in ("bf16", "fp8"):
        stored = torch.bfloat16 if fmt == "bf16" else torch.float8_e4m3fn
        if stored == dtype:
            return None  # computes as stored: nothing to expand
        weight = torch.zeros(shape, dtype=stored, device=device)
        return lambda: weight.to(dtype)
    qtype = QType[fmt]
    raw = torch.zeros(raw_nbytes(qtype, shape), dtype=torch.uint8, device=device)  # zero scales: finite
    return lambda: dequantize(raw, qtype, shape, dtype)


def _block_rate(device: torch.device, dtype: torch.dtype, sync: Callable[[], None]) -> float:
    """FLOP/s of one FLUX.1 double-stream block (weights in the compute dtype), FLOPs as torch counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    from engine.models.flux1 import DoubleStreamBlock, FluxParams, position_embedding
    from engine.runtime import ops

    params = FluxParams(64, 4096, 768, WIDTH, MLP, 24, 1, 0, (16, 56, 56), True, True)
    n_img, n_txt = BLOCK_TOKENS
    with torch.device("meta"):
        block = DoubleStreamBlock(params)
    shapes = {k: v.shape for k, v in block.state_dict().items()}

    def inputs(where: str | torch.device):
        with torch.device(where):
            ids = torch.zeros(1, n_txt + n_img, 3)
            ids[0, n_txt:, 2] = torch.arange(n_img)
            pe = position_embedding(ids, params.axes_dim, params.theta)
            return (torch.randn(1, n_img, WIDTH, dtype=dtype), torch.randn(1, n_txt, WIDTH, dtype=dtype),
                    torch.randn(1, WIDTH, dtype=dtype), pe)  # fmt: skip

    with FlopCounterMode(display=False) as counter:
        block(*inputs("meta"))
    state = {
        k: torch.empty(shape, dtype=dtype, device=device).normal_(0, 0.02) for k, shape in shapes.items()
    }
    block = ops.load_into(block, state, {}, dtype)
    args = inputs(device)
    with torch.inference_mode():
        return _rate(counter.get_total_flops(), lambda: block(*args), sync)


def measure(device: torch.device, compute_dtype: torch.dtype) -> Speed:
    """A few seconds of products and expansions on `device` (the CPU's figures in every dtype it may use)."""
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    dtypes = [compute_dtype] if cuda else sorted({compute_dtype, torch.float32}, key=str)
    flops = {}
    for dtype in dtypes:
        a = torch.randn(TOKENS, WIDTH, device=device).to(dtype)
        b = torch.randn(WIDTH, WIDTH, device=device).to(dtype)
        flops[str(dtype).removeprefix("torch.")] = _rate(
            2 * TOKENS * WIDTH * WIDTH, lambda a=a, b=b: a @ b, sync
        )
    expand = {}
    for fmt in FORMATS:
        case = _expand_case(fmt, compute_dtype, device)
        if case is not None:
            expand[fmt] = _rate(MLP * WIDTH, case, sync)
    name = str(compute_dtype).removeprefix("torch.")
    speed = Speed("cuda" if cuda else "cpu", name, flops, _block_rate(device, compute_dtype, sync), expand)
    if cuda:
        host = torch.empty(256 * 2**20, dtype=torch.uint8).pin_memory()
        target = torch.empty_like(host, device=device)
        speed.h2d = _rate(host.numel(), lambda: target.copy_(host, non_blocking=True), sync)
        speed.gpu = torch.cuda.get_device_name(device)
    return speed


def summary(speed: Speed) -> str:
    """One line: the products per dtype, and the bus on a GPU."""
    where = speed.gpu or "the CPU"
    products = ", ".join(f"{flops / 1e9:.0f} GFLOP/s in {dtype}" for dtype, flops in speed.flops.items())
    products = f"a FLUX block at {speed.block_flops / 1e9:.0f} GFLOP/s (products {products})"
    bus = f", {speed.h2d / 1e9:.1f} GB/s to the GPU" if speed.h2d else ""
    return f"{products} on {where}{bus}"


def measure_here(device: str = "auto") -> Speed:
    """The figures for the device and transformer dtype a generation would pick (`--device`)."""
    from engine.runtime.devices import pick_device

    dev, precision = pick_device(device, "auto")
    return measure(dev, precision.transformer)


def save(speed: Speed, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = speed.to_json().encode("utf-8")
    write_atomic(path, lambda f: f.write(data), overwrite=True)


def load(path: Path) -> Speed | None:
    """The saved figures, or None when there are none (or they are damaged: measure again)."""
    try:
        return Speed.from_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError, KeyError):
        return None
