"""Bad input gets exit code 2 and one plain sentence on stderr: no traceback, no file written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import main

ROOT = Path(__file__).resolve().parents[1]
SIZE = ["--width", "64", "--height", "64", "--steps", "1"]


def run_cli(capsys, *args: str) -> str:
    code = main(["generate", "--prompt", "a cat", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def split(tiny, **override) -> list[str]:
    files = {"transformer": tiny.paths["transformer"], "clip": tiny.paths["clip"], "t5": tiny.paths["t5"],
             "vae": tiny.paths["vae"]} | override  # fmt: skip
    args = []
    for role, path in files.items():
        args += [f"--{role}", str(path)]
    return args + ["--clip-tokenizer", str(tiny.clip_tokenizer), "--t5-tokenizer", str(tiny.t5_tokenizer)]


def test_missing_file(dev_set, tmp_path, capsys):
    line = run_cli(
        capsys, *split(dev_set, t5=tmp_path / "nope.safetensors"), *SIZE, "--out", str(tmp_path / "o.png")
    )
    assert "nope.safetensors does not exist" in line
    assert not (tmp_path / "o.png").exists()


def test_truncated_file(dev_set, tmp_path, capsys):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(dev_set.paths["transformer"].read_bytes()[:-1000])
    line = run_cli(capsys, *split(dev_set, transformer=cut), *SIZE, "--out", str(tmp_path / "o.png"))
    assert "truncated" in line and "download it again" in line


def test_not_a_safetensors_file(dev_set, tmp_path, capsys):
    html = tmp_path / "model.safetensors"
    html.write_text("<!DOCTYPE html><html><body>Access denied</body></html>" * 20)
    line = run_cli(capsys, *split(dev_set, vae=html), *SIZE, "--out", str(tmp_path / "o.png"))
    assert "not a safetensors file" in line


def test_vae_given_as_transformer(dev_set, tmp_path, capsys):
    line = run_cli(
        capsys, *split(dev_set, transformer=dev_set.paths["vae"]), *SIZE, "--out", str(tmp_path / "o.png")
    )
    assert "looks like a FLUX autoencoder (VAE), not a FLUX transformer" in line


def test_t5_given_as_clip(dev_set, tmp_path, capsys):
    line = run_cli(capsys, *split(dev_set, clip=dev_set.paths["t5"]), *SIZE, "--out", str(tmp_path / "o.png"))
    assert "looks like a T5-XXL text encoder, not a CLIP-L text encoder" in line


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--width", "100", "--height", "64"], "--width 100 is not a multiple of 16"),
        (["--width", "64", "--height", "72"], "--height 72 is not a multiple of 16"),
        (["--width", "64", "--height", "64", "--steps", "0"], "--steps 0 is out of range"),
        (["--width", "64", "--height", "64", "--denoise", "1.5"], "--denoise 1.5 is out of range"),
        (["--width", "64", "--height", "64", "--shift", "banana"], "--shift 'banana' is not valid"),
        (["--width", "64", "--height", "64", "--seed", "-3"], "--seed -3 is out of range"),
    ],
)
def test_impossible_numbers(dev_set, tmp_path, capsys, flags, expected):
    line = run_cli(capsys, "--models-dir", str(dev_set.models_dir), *flags, "--out", str(tmp_path / "o.png"))
    assert expected in line


def test_empty_models_folder(tmp_path, capsys):
    (tmp_path / "models" / "diffusion_models").mkdir(parents=True)
    line = run_cli(capsys, "--models-dir", str(tmp_path / "models"), *SIZE, "--out", str(tmp_path / "o.png"))
    assert "holds no FLUX model files" in line


def test_models_folder_missing_a_role(dev_set, tmp_path, capsys):
    models = tmp_path / "models"
    (models / "diffusion_models").mkdir(parents=True)
    (models / "diffusion_models" / "f.safetensors").write_bytes(dev_set.paths["transformer"].read_bytes())
    line = run_cli(capsys, "--models-dir", str(models), *SIZE, "--out", str(tmp_path / "o.png"))
    assert "lacks a CLIP-L text encoder (--clip), a T5-XXL text encoder (--t5) and a FLUX autoencoder" in line


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else False, reason="root can write anywhere")
def test_unwritable_output_folder(dev_set, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    line = run_cli(capsys, "--models-dir", str(dev_set.models_dir), *SIZE, "--out", str(locked / "o.png"))
    assert "Cannot write" in line


def test_output_under_a_file(dev_set, tmp_path, capsys):
    """An --out whose folder is a file cannot be written, whoever runs it (root included)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    line = run_cli(capsys, "--models-dir", str(dev_set.models_dir), *SIZE, "--out", str(blocker / "o.png"))
    assert "Cannot write" in line and "choose another --out" in line


def test_no_model_given(tmp_path, capsys):
    line = run_cli(capsys, *SIZE, "--out", str(tmp_path / "o.png"))
    assert "Say where the model is" in line


def test_real_process_exit_code_and_stderr(dev_set, tmp_path):
    """The same through a real `python -m engine` process: exit code 2, one sentence, nothing else."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "generate",
            "--prompt",
            "x",
            *split(dev_set, vae=dev_set.paths["clip"]),
            *SIZE,
            "--out",
            str(tmp_path / "o.png"),
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --vae {dev_set.paths['clip']} looks like a CLIP-L text encoder, not a FLUX autoencoder (VAE): "
        "give the right file for --vae."
    ]
    assert not (tmp_path / "o.png").exists()


def test_compute_dtype_by_gpu_generation():
    import torch

    from engine.runtime.devices import compute_dtype_for

    assert compute_dtype_for((6, 1)) == torch.float32  # GTX 1070: no bf16, fp16 at 1/64 rate
    assert compute_dtype_for((7, 5)) == torch.float16  # RTX 20xx
    assert compute_dtype_for((8, 6)) == torch.bfloat16  # RTX 30xx
    assert compute_dtype_for((9, 0)) == torch.bfloat16


def test_bad_flags_are_one_sentence_too(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "x", "--width", "wide", "--out", "x.png"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: argument --width: invalid int value: 'wide': see python -m engine generate --help."
    ]


def test_lora_flag_strengths_and_windows_paths():
    from engine.contract.request import LoraSpec

    parse_lora = LoraSpec.parse
    assert parse_lora("style.safetensors") == LoraSpec("style.safetensors", 1.0)
    assert parse_lora("style.safetensors:0.7") == LoraSpec("style.safetensors", 0.7)
    assert parse_lora("style.safetensors:-1.5") == LoraSpec("style.safetensors", -1.5)
    assert parse_lora(r"C:\loras\style.safetensors") == LoraSpec(r"C:\loras\style.safetensors", 1.0)
    assert parse_lora(r"C:\loras\style.safetensors:0.8") == LoraSpec(r"C:\loras\style.safetensors", 0.8)
