"""Which torch build each NVIDIA card and driver gets, through `python -m bootstrap env --dry-run` and a fake
nvidia-smi on PATH (the table is in docs/bootstrap.md too); the GPU verdict; the checks before pip runs."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bootstrap import cli, preflight
from bootstrap import environment as env
from bootstrap.hardware import GpuInfo, Platform, compute_from_name, detect_gpu, run_quietly

ROOT = Path(__file__).resolve().parent.parent
WINDOWS = Platform("Windows", "AMD64")

# What real drivers answer: the driver version and the newest CUDA it runs ("CUDA Version" of plain nvidia-smi).
DRIVERS = {
    "470.256": "11.4",  # R470: Kepler's last driver, which does not know the compute_cap field
    "552.22": "12.4",
    "560.94": "12.6",
    "566.36": "12.7",
    "572.83": "12.8",
    "576.88": "12.9",
    "580.97": "13.0",
    "581.57": "13.0",
}
CARDS = {
    "GTX 780": ("NVIDIA GeForce GTX 780", 3072, "3.5"),
    "GTX 970": ("NVIDIA GeForce GTX 970", 4096, "5.2"),
    "GTX 1070": ("NVIDIA GeForce GTX 1070", 8192, "6.1"),
    "Titan V": ("NVIDIA TITAN V", 12288, "7.0"),
    "RTX 2060": ("NVIDIA GeForce RTX 2060", 6144, "7.5"),
    "RTX 3060": ("NVIDIA GeForce RTX 3060", 12288, "8.6"),
    "RTX 4070": ("NVIDIA GeForce RTX 4070", 12282, "8.9"),
    "RTX 5080": ("NVIDIA GeForce RTX 5080", 16303, "12.0"),
}
UPDATE_580 = "update the driver to 580 or newer"
# card, driver -> the torch build planned, or the sentence `--gpu` ends with (exit 2)
TABLE = [
    ("GTX 970", "552.22", "cu126"),
    ("GTX 970", "581.57", "cu126"),  # cu130 has no kernels below 7.5
    ("GTX 1070", "552.22", "cu126"),
    ("GTX 1070", "572.83", "cu126"),
    ("GTX 1070", "580.97", "cu126"),
    ("GTX 1070", "581.57", "cu126"),
    ("Titan V", "566.36", "cu126"),
    ("Titan V", "581.57", "cu126"),
    ("RTX 2060", "552.22", "cu126"),
    ("RTX 2060", "581.57", "cu130"),
    ("RTX 3060", "560.94", "cu126"),
    ("RTX 3060", "576.88", "cu126"),
    ("RTX 3060", "580.97", "cu130"),
    ("RTX 4070", "566.36", "cu126"),
    ("RTX 4070", "581.57", "cu130"),
    ("RTX 5080", "572.83", UPDATE_580),
    ("RTX 5080", "576.88", UPDATE_580),
    ("RTX 5080", "580.97", "cu130"),
    ("RTX 5080", "581.57", "cu130"),
    ("GTX 780", "470.256", "cpu"),  # compute 3.5 (from the name: R470 refuses compute_cap): the CPU build
    ("GTX 1070", "470.256", "update the driver"),  # CUDA 11.4 runs no CUDA build of torch 2.13
]


def fake_nvidia_smi(folder: Path, card: str, driver: str, compute_field: str | None = None) -> Path:
    """An nvidia-smi that answers like `driver` on `card`; R470 refuses compute_cap with exit 2, as it does."""
    name, mib, compute = CARDS[card]
    compute = compute_field if compute_field is not None else compute
    refuses = driver.startswith("470")
    refusal = "echo 'Field \"compute_cap\" is not a valid field to query.' >&2; exit 2"
    answer = refusal if refuses else f'echo "{name}, {mib}, {compute}, {driver}"'
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text(
        f"""#!/bin/sh
case "$1" in
  --query-gpu=*compute_cap*) {answer} ;;
  --query-gpu=name,memory.total,driver_version) echo "{name}, {mib}, {driver}" ;;
  --query-gpu=*) echo "{name}, {mib}" ;;
  "") echo "| NVIDIA-SMI {driver}   Driver Version: {driver}   CUDA Version: {DRIVERS[driver]}     |" ;;
  *) exit 2 ;;
esac
"""
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return folder


def dry_run(bin_dir: Path | None, *flags: str) -> subprocess.CompletedProcess:
    path = f"{bin_dir}:/usr/bin:/bin" if bin_dir else "/usr/bin:/bin"
    return subprocess.run(
        [sys.executable, "-m", "bootstrap", "env", *flags, "--dry-run"],
        cwd=ROOT,
        env={**os.environ, "PATH": path},
        capture_output=True,
        text=True,
        timeout=60,
    )


def planned_build(out: str) -> str:
    (line,) = [line for line in out.splitlines() if line.strip().startswith("torch build:")]
    return line.split(":", 1)[1].split()[0]


@pytest.mark.parametrize("card, driver, expected", TABLE, ids=[f"{c}-{d}" for c, d, _ in TABLE])
def test_card_and_driver_table(tmp_path, card, driver, expected):
    done = dry_run(fake_nvidia_smi(tmp_path / "bin", card, driver), "--gpu", "--target", "windows")
    assert "Traceback" not in done.stderr
    if expected in ("cu126", "cu130", "cpu"):
        assert done.returncode == 0, done.stderr
        assert planned_build(done.stdout) == expected
        if expected != "cpu":
            assert f"https://download.pytorch.org/whl/{expected}" in done.stdout
            assert f"torch==2.13.0+{expected} --index-url" in done.stdout
            assert "--device cuda" in done.stdout
        else:
            assert "older than any CUDA build of torch supports" in done.stdout
    else:
        assert done.returncode == 2 and done.stdout == ""
        (sentence,) = done.stderr.strip().splitlines()
        assert expected in sentence and sentence.startswith("error: ")


def test_cpu_is_always_the_cpu_build(tmp_path):
    bin_dir = fake_nvidia_smi(tmp_path / "bin", "RTX 4070", "581.57")
    done = dry_run(bin_dir, "--cpu", "--target", "windows")
    assert done.returncode == 0 and planned_build(done.stdout) == "cpu"
    assert "download.pytorch.org/whl/cu" not in done.stdout and "--device cpu" in done.stdout


def test_linux_gpu_follows_the_same_rules(tmp_path):
    done = dry_run(fake_nvidia_smi(tmp_path / "bin", "GTX 1070", "581.57"), "--gpu", "--target", "linux")
    assert done.returncode == 0 and planned_build(done.stdout) == "cu126"
    assert "torch==2.13.0+cu126 --index-url https://download.pytorch.org/whl/cu126" in done.stdout


def test_no_nvidia_smi_plans_the_cpu_build(tmp_path):
    done = dry_run(None, "--gpu", "--target", "windows")
    assert done.returncode == 0 and planned_build(done.stdout) == "cpu"
    assert "none found" in done.stdout


def test_a_dry_run_changes_nothing(tmp_path):
    before = sorted(p.name for p in ROOT.iterdir())
    done = dry_run(fake_nvidia_smi(tmp_path / "bin", "RTX 3060", "581.57"), "--gpu", "--target", "windows")
    assert done.returncode == 0
    assert "interpreter:" in done.stdout and "Plan (--dry-run: nothing is changed)" in done.stdout
    assert sorted(p.name for p in ROOT.iterdir()) == before


def test_unreadable_compute_cap_falls_back_to_the_name(tmp_path):
    bin_dir = fake_nvidia_smi(tmp_path / "bin", "GTX 1070", "581.57", compute_field="[N/A]")
    done = dry_run(bin_dir, "--gpu", "--target", "windows")
    assert done.returncode == 0 and planned_build(done.stdout) == "cu126"
    assert "compute capability 6.1" in done.stdout


def test_a_failing_or_missing_nvidia_smi_is_no_gpu():
    assert detect_gpu(lambda argv: None) is None
    assert detect_gpu(lambda argv: "garbage without commas\n") is None
    assert run_quietly(["/nonexistent/nvidia-smi"]) is None


def test_names_give_the_family_when_the_driver_does_not():
    assert compute_from_name("NVIDIA GeForce GTX 1070") == (6, 1)
    assert compute_from_name("NVIDIA GeForce RTX 5080") == (12, 0)
    assert compute_from_name("NVIDIA GeForce GTX 970") == (5, 2)
    assert compute_from_name("NVIDIA TITAN V") == (7, 0)
    assert compute_from_name("Tesla K80") == (3, 5)
    assert compute_from_name("Some Future Card") is None


def test_no_dropped_cuda_build_anywhere_in_the_code():
    for folder in ("bootstrap", "engine", "launcher"):
        for path in (ROOT / folder).rglob("*.py"):
            assert "cu1" + "28" not in path.read_text(encoding="utf-8"), path


def test_a_cuda_build_without_kernels_for_the_card_is_replaced():
    pascal = GpuInfo("NVIDIA GeForce GTX 1070", 8192, (13, 0), (6, 1), "581.57")
    choice = env.choose_torch(WINDOWS, pascal, "gpu")
    reqs = env.parse_requirements("torch==2.13.0\n")
    assert env.plan_install(reqs, {"torch": "2.13.0+cu130"}, choice).torch is not None
    assert env.plan_install(reqs, {"torch": "2.13.0+cu126"}, choice).empty


def test_no_kernel_image_is_one_sentence_with_the_fix_never_usable():
    pascal = GpuInfo("NVIDIA GeForce GTX 1070", 8192, (13, 0), (6, 1), "581.57")
    probe = env.TorchProbe(
        "2.13.0+cu130",
        "13.0",
        True,
        "NVIDIA GeForce GTX 1070",
        "CUDA error: no kernel image is available for execution on the device",
    )
    device, sentence = env.gpu_verdict(probe, pascal, "gpu")
    assert device == "cpu" and "GPU is usable" not in sentence and "not usable" in sentence
    assert "python -m bootstrap env --gpu" in sentence and "compute capability 6.1" in sentence
    assert sentence.count(". ") == 0 and sentence.endswith(".")


def test_an_unsupported_python_is_refused_in_one_sentence(monkeypatch, capsys):
    assert preflight.python_problem((3, 10)) is not None and preflight.python_problem((3, 12)) is None
    monkeypatch.setattr(preflight, "PYTHONS", ((3, 99),))
    assert cli.main(["env", "--cpu", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot install FluxDeck's packages" in err[0] and "Python 3.12" in err[0]


def test_long_paths_and_unwritable_folders_are_refused_before_pip(tmp_path):
    assert preflight.long_path_problem(r"C:\FluxDeck\python_embeded", False) is None
    deep = "C:\\" + "x" * 60 + r"\python_embeded"
    assert "move the folder to C:\\FluxDeck, or enable long paths" in preflight.long_path_problem(deep, False)
    assert preflight.long_path_problem(deep, True) is None
    assert preflight.folder_writable(tmp_path)
    assert "is not writable" in preflight.writable_problem(tmp_path, False)
