"""GGUF support: torch dequantization bit-exact with gguf's numpy code, file round trips, T5 names."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from engine.formats.gguf_file import GGUFWeight, architecture, read_gguf, t5_gguf_to_hf_names, write_gguf
from engine.formats.gguf_quants import SUPPORTED_TYPES, block_layout, dequantize, raw_nbytes

T = gguf.GGMLQuantizationType
QUANT_TYPES = [T.Q8_0, T.Q5_0, T.Q5_1, T.Q4_0, T.Q4_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
FLOAT_TYPES = [T.F32, T.F16, T.BF16]
NUMPY_QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q5_0, T.Q5_1, T.Q4_0, T.Q4_1]
# Byte offsets of each block's fp16 scale fields (d, m, dmin): random bytes there could be NaN/inf.
FP16_FIELDS = {
    T.Q8_0: (0,),
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
}


def random_raw(qtype: T, n_elements: int, rng: np.random.Generator) -> np.ndarray:
    """Raw bytes (n_blocks, type_size) of a random tensor of `qtype`, all values finite."""
    if qtype in FLOAT_TYPES:
        values = rng.standard_normal(n_elements).astype(np.float32)
        if qtype == T.F16:
            return values.astype(np.float16).view(np.uint8).reshape(n_elements, 2)
        if qtype == T.BF16:
            return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n_elements, 2)
        return values.view(np.uint8).reshape(n_elements, 4)
    block_size, type_size = block_layout(qtype)
    blocks = rng.integers(0, 256, (n_elements // block_size, type_size), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        scale = rng.uniform(-0.05, 0.05, blocks.shape[0]).astype(np.float16)
        blocks[:, offset : offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks


def as_bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.int32)


def test_supported_types_are_the_promised_ones() -> None:
    assert set(SUPPORTED_TYPES) == set(QUANT_TYPES) | set(FLOAT_TYPES)
    assert set(FP16_FIELDS) == set(QUANT_TYPES)


@pytest.mark.parametrize("qtype", FLOAT_TYPES + QUANT_TYPES, ids=lambda t: t.name)
def test_dequantize_is_bit_exact_with_gguf(qtype: T) -> None:
    rng = np.random.default_rng(int(qtype))
    rows, cols = 6, 512
    raw = random_raw(qtype, rows * cols, rng).reshape(rows, -1)  # the byte shape gguf's reader hands out
    expected = gguf.quants.dequantize(raw, qtype).reshape(rows, cols)

    got = dequantize(torch.from_numpy(raw), qtype, (rows, cols), torch.float32)

    assert got.shape == (rows, cols) and got.dtype == torch.float32
    assert np.isfinite(expected).all()
    # Non-trivial data: a broken unpacking cannot hide behind zeros or a handful of repeated values.
    assert np.count_nonzero(expected) > expected.size // 2
    assert len(np.unique(expected)) > 64
    np.testing.assert_array_equal(as_bits(got.numpy()), as_bits(expected))


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_every_byte_of_a_block_matters(qtype: T) -> None:
    """Changing any single byte of a block changes the output (no field is ignored or read from elsewhere)."""
    rng = np.random.default_rng(100 + int(qtype))
    block_size, type_size = block_layout(qtype)
    block = random_raw(qtype, block_size, rng)
    base = dequantize(torch.from_numpy(block), qtype, (block_size,), torch.float32)
    variants = np.repeat(block, type_size, axis=0)
    fp16 = {offset + i for offset in FP16_FIELDS[qtype] for i in (0, 1)}
    for i in range(type_size):
        # flip low bits of quants/scales; flip a mantissa bit (not sign/exponent) of fp16 fields
        variants[i, i] ^= 0x01 if i in fp16 else 0x55
    outs = dequantize(torch.from_numpy(variants), qtype, (type_size, block_size), torch.float32)
    expected = gguf.quants.dequantize(variants, qtype).reshape(type_size, block_size)
    np.testing.assert_array_equal(as_bits(outs.numpy()), as_bits(expected))
    assert all(not torch.equal(outs[i], base) for i in range(type_size))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("qtype", [T.F32, T.BF16, T.Q8_0, T.Q4_K], ids=lambda t: t.name)
def test_other_dtypes_are_a_cast_of_float32(qtype: T, dtype: torch.dtype) -> None:
    raw = torch.from_numpy(random_raw(qtype, 1024, np.random.default_rng(7)))
    got = dequantize(raw, qtype, (4, 256), dtype)
    assert got.dtype == dtype
    assert torch.equal(got, dequantize(raw, qtype, (4, 256), torch.float32).to(dtype))


def test_float_types_are_reinterpreted_without_copy() -> None:
    raw = torch.from_numpy(random_raw(T.F16, 64, np.random.default_rng(1)))
    out = dequantize(raw, T.F16, (8, 8), torch.float16)
    assert out.data_ptr() == raw.data_ptr()


def test_dequantize_rejects_bad_input() -> None:
    raw = torch.zeros(34, dtype=torch.uint8)
    with pytest.raises(ValueError):
        dequantize(raw, T.Q8_0, (64,), torch.float32)  # 64 elements need 68 bytes
    with pytest.raises(ValueError):
        raw_nbytes(T.Q4_K, (3, 100))  # not a whole number of blocks
    with pytest.raises(TypeError):
        dequantize(raw.to(torch.int8), T.Q8_0, (32,), torch.float32)
    with pytest.raises(NotImplementedError):
        dequantize(torch.zeros(66, dtype=torch.uint8), T.IQ2_XXS, (256,), torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", FLOAT_TYPES + QUANT_TYPES, ids=lambda t: t.name)
def test_cuda_matches_cpu(qtype: T) -> None:
    raw = torch.from_numpy(random_raw(qtype, 4096, np.random.default_rng(3)))
    cpu = dequantize(raw, qtype, (16, 256), torch.float32)
    gpu = dequantize(raw.cuda(), qtype, (16, 256), torch.float32)
    assert gpu.is_cuda
    assert torch.equal(gpu.cpu().view(torch.int32), cpu.view(torch.int32))


# ---- files ---------------------------------------------------------------------------------------------


def flux_like_tensors(
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], dict[str, T], dict[str, tuple[int, ...]]]:
    """One tensor per supported type, BFL names; K-quants as raw blocks (numpy cannot quantize them).
    Returns the arrays to write, their qtypes and their logical shapes."""
    tensors: dict[str, np.ndarray] = {
        "img_in.bias": rng.standard_normal(8).astype(np.float32)
    }  # no qtype: F32
    qtypes: dict[str, T] = {}
    shapes: dict[str, tuple[int, ...]] = {"img_in.bias": (8,)}
    for i, qtype in enumerate(FLOAT_TYPES + QUANT_TYPES):
        name = f"double_blocks.{i}.img_attn.qkv.weight"
        shapes[name] = (3, 256 * (1 + i % 2))
        if qtype in NUMPY_QUANTIZABLE:
            tensors[name] = rng.standard_normal(shapes[name]).astype(np.float32)
        else:
            tensors[name] = random_raw(qtype, 3 * shapes[name][1], rng).reshape(3, -1)
        qtypes[name] = qtype
    return tensors, qtypes, shapes


def test_round_trip_through_a_gguf_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(42)
    tensors, qtypes, shapes = flux_like_tensors(rng)
    path = tmp_path / "tiny-flux.gguf"
    write_gguf(path, tensors, qtypes, arch="flux")

    weights, metadata = read_gguf(path)

    assert architecture(metadata) == "flux" and metadata["general.architecture"] == "flux"
    assert set(weights) == set(tensors)
    reader = gguf.GGUFReader(path)
    for stored in reader.tensors:
        weight = weights[stored.name]
        qtype = qtypes.get(stored.name, T.F32)
        source, shape = tensors[stored.name], shapes[stored.name]
        assert isinstance(weight, GGUFWeight)
        assert weight.qtype == qtype and weight.shape == shape
        assert weight.raw.dtype == torch.uint8 and weight.nbytes == raw_nbytes(qtype, shape) == stored.n_bytes
        expected = gguf.quants.dequantize(stored.data, qtype).reshape(shape)
        got = weight.dequantize(torch.float32)
        assert got.shape == shape
        np.testing.assert_array_equal(as_bits(got.numpy()), as_bits(expected))
        assert np.count_nonzero(expected) > 0
        if qtype in NUMPY_QUANTIZABLE and qtype != T.F32:  # quantization error is small
            np.testing.assert_allclose(expected, source, atol=0.3 * np.abs(source).max())


def test_float_weights_come_back_as_private_copies(tmp_path: Path) -> None:
    """The raw bytes view the read-only file mapping; what dequantize returns must be safe to write."""
    path = tmp_path / "f32.gguf"
    write_gguf(path, {"a.weight": np.ones((4, 8), np.float32)}, {}, arch="flux")
    weight = read_gguf(path)[0]["a.weight"]
    for out in (weight.dequantize(torch.float32), weight.dequantize(torch.float32, device="cpu")):
        assert out.data_ptr() != weight.raw.data_ptr()
        out.add_(1)  # would crash on the read-only mapping
        assert torch.equal(out, torch.full((4, 8), 2.0))
    assert torch.equal(weight.dequantize(), torch.ones(4, 8))


def test_orig_shape_metadata_restores_the_torch_shape(tmp_path: Path) -> None:
    path = tmp_path / "conv.gguf"
    data = np.arange(2 * 3 * 32, dtype=np.float32).reshape(6, 32)
    meta = {"comfy.gguf.orig_shape.conv.weight": [2, 3, 4, 8], "note": "hello", "answer": 42}
    write_gguf(path, {"conv.weight": data}, {"conv.weight": T.Q8_0}, arch="flux", metadata=meta)
    weights, metadata = read_gguf(path)
    assert weights["conv.weight"].shape == (2, 3, 4, 8)
    assert weights["conv.weight"].dequantize().shape == (2, 3, 4, 8)
    assert metadata["note"] == "hello" and metadata["answer"] == 42


# ---- T5 names ------------------------------------------------------------------------------------------


def t5_gguf_names(n_blocks: int) -> list[str]:
    """Every tensor name gguf defines for the T5 encoder architecture, for n_blocks blocks."""
    names = []
    for tensor in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.T5ENCODER]:
        template = gguf.TENSOR_NAMES[tensor]
        blocks = range(n_blocks) if "{bid}" in template else [0]
        names += [template.format(bid=b) + ".weight" for b in blocks]
    return names


def test_t5_names_cover_every_gguf_t5_encoder_tensor() -> None:
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, 3)
    names = t5_gguf_names(3)
    assert len(names) == 2 + 1 + 10 * 3
    hf_names = [t5_gguf_to_hf_names(name) for name in names]
    assert len(set(hf_names)) == len(names)
    for name, hf_name in zip(names, hf_names, strict=True):
        # gguf's own HF -> llama.cpp mapping takes our HF name back to the GGUF name
        assert name_map.get_name(hf_name, try_suffixes=(".weight",)) == name


def test_t5_names_examples() -> None:
    expected = {
        "token_embd.weight": "shared.weight",
        "enc.output_norm.weight": "encoder.final_layer_norm.weight",
        "enc.blk.0.attn_rel_b.weight": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "enc.blk.5.attn_norm.weight": "encoder.block.5.layer.0.layer_norm.weight",
        "enc.blk.5.attn_q.weight": "encoder.block.5.layer.0.SelfAttention.q.weight",
        "enc.blk.5.attn_k.weight": "encoder.block.5.layer.0.SelfAttention.k.weight",
        "enc.blk.5.attn_v.weight": "encoder.block.5.layer.0.SelfAttention.v.weight",
        "enc.blk.5.attn_o.weight": "encoder.block.5.layer.0.SelfAttention.o.weight",
        "enc.blk.23.ffn_norm.weight": "encoder.block.23.layer.1.layer_norm.weight",
        "enc.blk.23.ffn_gate.weight": "encoder.block.23.layer.1.DenseReluDense.wi_0.weight",
        "enc.blk.23.ffn_up.weight": "encoder.block.23.layer.1.DenseReluDense.wi_1.weight",
        "enc.blk.23.ffn_down.weight": "encoder.block.23.layer.1.DenseReluDense.wo.weight",
    }
    assert {name: t5_gguf_to_hf_names(name) for name in expected} == expected
    for bad in (
        "enc.blk.0.attn_qkv.weight",
        "blk.0.attn_q.weight",
        "token_embd",
        "double_blocks.0.img_mod.lin.weight",
    ):
        with pytest.raises(KeyError):
            t5_gguf_to_hf_names(bad)


def test_t5_file_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    names = t5_gguf_names(2)
    tensors = {name: rng.standard_normal((2, 64)).astype(np.float32) for name in names}
    qtypes = {name: T.Q8_0 for name in names if name.endswith(("attn_q.weight", "ffn_up.weight"))}
    path = tmp_path / "t5-tiny.gguf"
    write_gguf(path, tensors, qtypes, arch="t5encoder")
    weights, metadata = read_gguf(path)
    assert architecture(metadata) == "t5encoder"
    state = {t5_gguf_to_hf_names(name): weight.dequantize(torch.float32) for name, weight in weights.items()}
    assert "encoder.block.1.layer.1.DenseReluDense.wi_1.weight" in state and "shared.weight" in state
    assert torch.equal(
        state["encoder.final_layer_norm.weight"], torch.from_numpy(tensors["enc.output_norm.weight"])
    )
