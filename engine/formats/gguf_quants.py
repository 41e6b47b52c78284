"""Dequantization of GGUF (ggml) tensors in torch, bit-exact with ``gguf.quants.dequantize``.

Every function works on a whole tensor at once (vectorized over blocks) and on any device, so a quantized
weight can be moved to the GPU as raw bytes and expanded there, layer by layer, at compute time.
The arithmetic runs in float32 in the same order as ggml (e.g. ``(d * scale) * q - dmin * m``) so the
float32 result equals the gguf package's numpy result bit for bit; other dtypes are a final cast.

Block layouts (little-endian, ``d``/``m``/``dmin`` are fp16; ``QK_K`` = 256):
  Q8_0  d, qs[32] int8                             x = d * q
  Q4_0  d, qs[16] nibbles                          x = d * (q - 8)
  Q4_1  d, m, qs[16] nibbles                       x = d * q + m
  Q5_0  d, qh[4] high bits, qs[16] nibbles         x = d * (q - 16)
  Q5_1  d, m, qh[4], qs[16]                        x = d * q + m
  Q2_K  scales[16] (4-bit scale | 4-bit min), qs[64] 2-bit, d, dmin
  Q3_K  hmask[32], qs[64] 2-bit, scales[12] (16 packed 6-bit), d
  Q4_K  d, dmin, scales[12] (8 packed 6-bit scales + 8 mins), qs[128] nibbles
  Q5_K  d, dmin, scales[12], qh[32], qs[128]
  Q6_K  ql[128] nibbles, qh[64] 2-bit, scales[16] int8, d
"""

from __future__ import annotations

import math
from collections.abc import Callable

import gguf
import torch

QType = gguf.GGMLQuantizationType

# Types whose raw bytes are plain floats: dequantizing is a reinterpretation.
FLOAT_TYPES: dict[QType, torch.dtype] = {
    QType.F32: torch.float32,
    QType.F16: torch.float16,
    QType.BF16: torch.bfloat16,
}


def block_layout(qtype: QType | int) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml type."""
    return gguf.GGML_QUANT_SIZES[QType(qtype)]


def raw_nbytes(qtype: QType | int, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of `shape` takes when stored as `qtype`."""
    block_size, type_size = block_layout(qtype)
    numel = math.prod(shape)
    if numel % block_size:
        raise ValueError(f"{QType(qtype).name} needs a multiple of {block_size} elements, got shape {shape}")
    return numel // block_size * type_size


# ---- bit-level helpers (uint8 in, uint8 / float32 out) -------------------------------------------------


def _split(blocks: torch.Tensor, *sizes: int) -> list[torch.Tensor]:
    """Cut (n_blocks, type_size) bytes into column groups of the given widths (the rest is the last group)."""
    return list(torch.split(blocks, [*sizes, blocks.shape[1] - sum(sizes)], dim=1))


def _f16(field: torch.Tensor) -> torch.Tensor:
    """A (n, 2) byte field holding one fp16 per block -> (n, 1) float32."""
    return field.contiguous().view(torch.float16).float()


def _bits(data: torch.Tensor, group: int, bits: int) -> torch.Tensor:
    """Unpack `bits`-wide fields of (n, k) bytes: each run of `group` bytes yields its lowest fields for all
    bytes first, then the next ones, ... (the ggml order). Returns (n, k * 8 // bits) uint8."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=data.device).view(1, 1, -1, 1)
    fields = (data.reshape(data.shape[0], -1, 1, group) >> shifts) & ((1 << bits) - 1)
    return fields.reshape(data.shape[0], -1)


def _k_scales_mins(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins, each (n, 8, 1) float32.
    Bytes 0-3 hold scales 0-3 (+ 2 high bits of scales 4-7), bytes 4-7 mins 0-3 (+ high bits of mins 4-7),
    bytes 8-11 the low nibbles of scales 4-7 (low half) and mins 4-7 (high half)."""
    sc, mn, lo = scales.reshape(-1, 3, 4).unbind(1)
    scale = torch.cat([sc & 0x3F, (lo & 0x0F) | ((sc >> 2) & 0x30)], dim=1)
    mins = torch.cat([mn & 0x3F, (lo >> 4) | ((mn >> 2) & 0x30)], dim=1)
    return scale.float().unsqueeze(-1), mins.float().unsqueeze(-1)


def _scaled(d: torch.Tensor, sub_scales: torch.Tensor) -> torch.Tensor:
    """fp16 super-block factor (n, 2 bytes) times per-sub-block integers (n, k, 1) -> (n, k, 1) float32."""
    return _f16(d).unsqueeze(-1) * sub_scales


# ---- one function per type family: (n_blocks, type_size) uint8 -> (n_blocks, block_size) float32 -------


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d, qs = _split(blocks, 2)
    return qs.contiguous().view(torch.int8).float() * _f16(d)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d, qs = _split(blocks, 2)
    return _f16(d) * (_bits(qs, 16, 4).float() - 8)


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m, qs = _split(blocks, 2, 2)
    return _f16(d) * _bits(qs, 16, 4).float() + _f16(m)


def _q5_low_high(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1 quants 0..31: 32 low nibbles plus bit j of the little-endian 32-bit qh as bit 4 of quant j."""
    return (_bits(qs, 16, 4) | (_bits(qh, 1, 1) << 4)).float()


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d, qh, qs = _split(blocks, 2, 4)
    return _f16(d) * (_q5_low_high(qh, qs) - 16)


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m, qh, qs = _split(blocks, 2, 2, 4)
    return _f16(d) * _q5_low_high(qh, qs) + _f16(m)


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    scales, qs, d, dmin = _split(blocks, 16, 64, 2)
    scale = (_f16(d) * (scales & 0x0F).float()).unsqueeze(-1)
    mins = (_f16(dmin) * (scales >> 4).float()).unsqueeze(-1)
    q = _bits(qs, 32, 2).reshape(-1, 16, 16).float()
    return (scale * q - mins).reshape(blocks.shape[0], -1)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    hmask, qs, scales, d = _split(blocks, 32, 64, 12)
    # 16 signed 6-bit scales: low nibbles from bytes 0-7, high 2-bit pairs from bytes 8-11, offset 32.
    low, high = scales[:, :8], scales[:, 8:]
    scale = (_bits(low, 8, 4) | (_bits(high, 4, 2) << 4)).float() - 32
    scale = (_f16(d) * scale).unsqueeze(-1)
    # 2 low bits from qs, minus 4 where the hmask bit is *clear*.
    q = _bits(qs, 32, 2).float() - 4 * (1 - _bits(hmask, 32, 1)).float()
    return (scale * q.reshape(-1, 16, 16)).reshape(blocks.shape[0], -1)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    d, dmin, scales, qs = _split(blocks, 2, 2, 12)
    scale, mins = _k_scales_mins(scales)
    q = _bits(qs, 32, 4).reshape(-1, 8, 32).float()
    return (_scaled(d, scale) * q - _scaled(dmin, mins)).reshape(blocks.shape[0], -1)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    d, dmin, scales, qh, qs = _split(blocks, 2, 2, 12, 32)
    scale, mins = _k_scales_mins(scales)
    q = (_bits(qs, 32, 4) | (_bits(qh, 32, 1) << 4)).reshape(-1, 8, 32).float()
    return (_scaled(d, scale) * q - _scaled(dmin, mins)).reshape(blocks.shape[0], -1)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    ql, qh, scales, d = _split(blocks, 128, 64, 16)
    scale = (_f16(d) * scales.contiguous().view(torch.int8).float()).unsqueeze(-1)
    q = (_bits(ql, 64, 4) | (_bits(qh, 32, 2) << 4)).float() - 32
    return (scale * q.reshape(-1, 16, 16)).reshape(blocks.shape[0], -1)


BLOCK_DEQUANTIZERS: dict[QType, Callable[[torch.Tensor], torch.Tensor]] = {
    QType.Q8_0: _q8_0,
    QType.Q4_0: _q4_0,
    QType.Q4_1: _q4_1,
    QType.Q5_0: _q5_0,
    QType.Q5_1: _q5_1,
    QType.Q2_K: _q2_k,
    QType.Q3_K: _q3_k,
    QType.Q4_K: _q4_k,
    QType.Q5_K: _q5_k,
    QType.Q6_K: _q6_k,
}

SUPPORTED_TYPES: frozenset[QType] = frozenset(FLOAT_TYPES) | frozenset(BLOCK_DEQUANTIZERS)


def dequantize(
    raw: torch.Tensor, qtype: QType | int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Expand the raw bytes of a GGUF tensor (uint8, any shape, on any device) to a `shape` tensor of `dtype`.

    `shape` is the logical torch shape (the GGUF dims reversed). F32/F16/BF16 are reinterpreted without a
    copy when `dtype` matches, so the result may share memory with `raw`.
    """
    qtype = QType(qtype)
    if raw.dtype != torch.uint8:
        raise TypeError(f"raw GGUF bytes must be uint8, got {raw.dtype}")
    expected = raw_nbytes(qtype, tuple(shape))
    if raw.numel() != expected:
        raise ValueError(f"{qtype.name} {tuple(shape)} needs {expected} bytes, got {raw.numel()}")
    if qtype in FLOAT_TYPES:
        return raw.reshape(-1).view(FLOAT_TYPES[qtype]).reshape(shape).to(dtype)
    if qtype not in BLOCK_DEQUANTIZERS:
        raise NotImplementedError(f"GGUF type {qtype.name} is not supported")
    block_size, type_size = block_layout(qtype)
    blocks = raw.reshape(-1, type_size)
    expand = BLOCK_DEQUANTIZERS[qtype]
    out = torch.empty((blocks.shape[0], block_size), dtype=dtype, device=raw.device)
    step = max(1, _CHUNK_ELEMENTS[raw.device.type == "cuda"] // block_size)
    for start in range(0, blocks.shape[0], step):
        out[start : start + step] = expand(blocks[start : start + step])  # float32 → dtype as it lands
    return out.reshape(shape)


# Blocks expanded at a time: on the CPU a chunk's float32 temporaries stay in cache and their memory is reused
# (a whole 12B-block layer's would be hundreds of MB, freshly paged in on every call); on a GPU larger chunks
# keep the kernel launches few while still bounding the temporaries' VRAM.
_CHUNK_ELEMENTS = {False: 1 << 18, True: 1 << 23}
