"""The CPU's compute dtypes: bf16 for the transformer where the CPU has it natively, fp32 elsewhere and for the
text encoders and autoencoder; --dtype overrides; the timestep reaches the embedders in fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.contract.request import GenerateRequest, ModelFiles
from engine.generation.pipeline import Engine
from engine.runtime import devices
from engine.runtime.devices import Precision, cpu_compute_dtype, features_in_cpuinfo, pick_device
from tests.metrics import psnr

# Feature lists as these CPUs report them (abridged).
SAPPHIRE_RAPIDS = "fpu sse2 avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8"
ZEN4 = "fpu sse2 avx2 avx512f avx512bw avx512_vnni avx512_bf16"
SKYLAKE_X = "fpu sse2 avx2 avx512f avx512bw avx512cd avx512dq avx512vl"  # AVX-512, but no bf16
HASWELL = "fpu sse2 avx avx2 fma"
GRAVITON3 = (
    "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm sve i8mm bf16 svebf16"
)
GRAVITON2 = (
    "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
)


@pytest.mark.parametrize(
    ("features", "dtype"),
    [
        (SAPPHIRE_RAPIDS, torch.bfloat16),
        (ZEN4, torch.bfloat16),
        (GRAVITON3, torch.bfloat16),
        (SKYLAKE_X, torch.float32),
        (HASWELL, torch.float32),
        (GRAVITON2, torch.float32),
        ("", torch.float32),
    ],
    ids=["sapphire-rapids", "zen4", "graviton3", "skylake-x", "haswell", "graviton2", "nothing-known"],
)
def test_cpu_dtype_by_capability(features, dtype):
    assert cpu_compute_dtype(features.split()) == dtype
    device, precision = pick_device("cpu", "auto", features.split())
    assert device.type == "cpu"
    assert precision == Precision(dtype, torch.float32)


def test_dtype_flag_overrides_the_cpu(monkeypatch):
    for flag, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        for features in (SAPPHIRE_RAPIDS, HASWELL):
            assert pick_device("cpu", flag, features.split())[1] == Precision.every(dtype)


def test_cpuinfo_is_read_on_x86_and_arm():
    x86 = f"processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: {SAPPHIRE_RAPIDS}\n\nprocessor\t: 1\n"
    arm = f"processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: {GRAVITON3}\nCPU implementer\t: 0x41\n"
    assert {"avx512_bf16", "amx_bf16"} <= features_in_cpuinfo(x86)
    assert "bf16" in features_in_cpuinfo(arm)
    assert "bf16" not in features_in_cpuinfo(f"Features\t: {GRAVITON2}\n")


def run(tiny, out, **kw) -> tuple[Engine, np.ndarray]:
    engine = Engine()
    request = GenerateRequest(
        prompt="a photo of a cat", width=64, height=64, steps=3, seed=3, device="cpu",
        files=ModelFiles(models_dir=str(tiny.models_dir)), out=str(out), **kw,
    )  # fmt: skip
    return engine, np.asarray(Image.open(engine.generate(request)[0]))


@pytest.mark.parametrize("features", [SAPPHIRE_RAPIDS, HASWELL], ids=["bf16-cpu", "fp32-cpu"])
def test_the_engine_computes_as_the_cpu_allows(dev_set, tmp_path, monkeypatch, features):
    """The transformer in the CPU's dtype, the text encoders and autoencoder in fp32; bf16's image stays close
    to fp32's (the tiny model's error; real-width figures are in docs/benchmarks.md)."""
    monkeypatch.setattr(devices, "cpu_features", lambda: frozenset(features.split()))
    engine, auto = run(dev_set, tmp_path / "auto.png")
    expected = cpu_compute_dtype(features.split())
    dtypes = {role: engine.models.key(role).dtype for role in engine.models.roles}
    assert dtypes == {
        "transformer": expected,
        "clip": torch.float32,
        "t5": torch.float32,
        "vae": torch.float32,
    }
    _, fp32 = run(dev_set, tmp_path / "fp32.png", dtype="fp32")
    if expected == torch.float32:
        assert np.array_equal(auto, fp32)
    else:
        print(f"bf16 transformer vs fp32: {psnr(auto, fp32):.1f} dB")
        assert 30 < psnr(auto, fp32) < 80  # close, and not secretly fp32


def test_the_timestep_reaches_the_transformer_in_fp32(dev_set, tmp_path, monkeypatch):
    """bf16 would turn t = 0.7 into 0.69921875 before the sinusoidal embedding; ComfyUI passes fp32 too."""
    import engine.generation.model_cache as model_cache

    seen: list[torch.Tensor] = []
    build = model_cache.build_model

    def spying_build(component, dtype):
        model = build(component, dtype)
        if component.role == "transformer":
            model.register_forward_pre_hook(lambda _, args: seen.append(args[4].clone()))
        return model

    monkeypatch.setattr(model_cache, "build_model", spying_build)
    run(dev_set, tmp_path / "t.png", dtype="bf16", shift="none")
    assert [t.dtype for t in seen] == [torch.float32] * 3
    assert [float(t[0]) for t in seen] == pytest.approx([1.0, 2 / 3, 1 / 3], abs=1e-7)


@pytest.mark.parametrize("keep_models", ["auto", "never"])
def test_fp32_on_a_narrower_file_expands_once_when_ram_allows(dev_set, tmp_path, monkeypatch, keep_models):
    """Scaled fp8 computed in fp32 on the CPU: with RAM to spare the transformer's weights are expanded once
    (scale folded in), else (RAM short, or keep_models="never") per layer call as before; the same pixels."""
    import shutil

    from safetensors.torch import save_file

    import engine.generation.model_cache as model_cache
    from engine import fixtures
    from engine.generation.pipeline import EngineOptions

    models = tmp_path / "models"
    shutil.copytree(dev_set.models_dir, models)
    save_file(
        fixtures.to_fp8(dev_set.states.transformer, scaled=True),
        str(models / "diffusion_models" / "flux-tiny.safetensors"),
    )
    request = GenerateRequest(
        prompt="a photo of a cat", width=64, height=64, steps=3, seed=3, device="cpu", dtype="fp32",
        files=ModelFiles(models_dir=str(models)), out=str(tmp_path / "x.png"),
    )  # fmt: skip

    build = model_cache.build_model

    def generate(ram: int):
        built = []
        monkeypatch.setattr(model_cache, "_total_ram", lambda: ram)
        monkeypatch.setattr(model_cache, "build_model", lambda c, d: built.append(build(c, d)) or built[-1])
        image = np.asarray(Image.open(Engine(EngineOptions(keep_models=keep_models)).generate(request)[0]))
        transformer = next(m for m in built if hasattr(m, "double_blocks"))
        return image, transformer.double_blocks[0].img_attn.qkv

    roomy, qkv = generate(64 * 2**30)
    short, kept = generate(2**20)
    assert np.array_equal(roomy, short)
    assert kept.weight.dtype == torch.float8_e4m3fn and kept.scale_weight is not None
    if keep_models == "never":
        assert qkv.weight.dtype == torch.float8_e4m3fn  # RAM is short by the user's word: per call
    else:
        assert (qkv.weight.dtype, qkv.scale_weight) == (torch.float32, None)
