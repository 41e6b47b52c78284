"""The environment builder's decisions (which Python, which torch index, what to install), Windows included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bootstrap import environment as env
from bootstrap.errors import BootstrapError
from bootstrap.hardware import GpuInfo, Platform, parse_cuda_version, parse_gpu_query

ROOT = Path(__file__).resolve().parent.parent
WINDOWS = Platform("Windows", "AMD64")
LINUX = Platform("Linux", "x86_64")
MAC = Platform("Darwin", "arm64")
RTX = GpuInfo("NVIDIA GeForce RTX 3060", 12288, (12, 8), (8, 6), "572.83")
REQS = "# comment\ntorch==2.13.0\nsafetensors==0.8.0\nnumpy==2.4.6  # inline\nPillow==13.0.0\n"


def test_windows_uses_the_embedded_python_when_the_bundle_has_it():
    choice = env.choose_python(Path("C:/FluxDeck"), WINDOWS, embedded_present=True)
    assert choice.kind == "embedded" and choice.python == r"C:\FluxDeck\python_embeded\python.exe"


def test_otherwise_a_venv_spelled_for_the_os():
    assert (
        env.choose_python(Path("C:/FluxDeck"), WINDOWS, False).python
        == r"C:\FluxDeck\.venv\Scripts\python.exe"
    )
    assert env.choose_python(Path("/opt/fd"), LINUX, False).python == "/opt/fd/.venv/bin/python"
    assert env.choose_python(Path("/opt/fd"), LINUX, True).kind == "venv"  # python_embeded is Windows-only


def test_the_embedded_pth_gets_site_and_the_project_root():
    shipped = "python311.zip\n.\n\n# Uncomment to run site.main() automatically\n#import site\n"
    patched = env.patch_pth(shipped)
    assert patched.splitlines() == [
        "python311.zip",
        ".",
        "",
        "# Uncomment to run site.main() automatically",
        "..",
        "import site",
    ]
    assert env.patch_pth(patched) == patched


def test_torch_index_by_platform_and_gpu():
    win_gpu = env.choose_torch(WINDOWS, RTX, "auto")
    assert (win_gpu.index_url, win_gpu.variant) == ("https://download.pytorch.org/whl/cu126", "cuda")
    assert env.choose_torch(WINDOWS, GpuInfo("RTX 5090", 32768, (13, 0)), "gpu").tag == "cu130"
    assert env.choose_torch(WINDOWS, RTX, "cpu").index_url is None  # PyPI's Windows torch is the CPU build
    assert env.choose_torch(WINDOWS, None, "auto").index_url is None
    # Linux follows the same rules: PyPI's Linux torch is one CUDA build, without kernels for every card
    assert env.choose_torch(LINUX, RTX, "auto").index_url == "https://download.pytorch.org/whl/cu126"
    assert env.choose_torch(LINUX, None, "auto").index_url == "https://download.pytorch.org/whl/cpu"
    assert env.choose_torch(LINUX, RTX, "cpu").tag == "cpu"
    assert env.choose_torch(MAC, None, "auto").index_url is None


def test_old_drivers_and_missing_gpus_are_one_sentence():
    old = GpuInfo("GTX 1060", 6144, (11, 4), (6, 1), "472.12")
    with pytest.raises(BootstrapError, match="runs CUDA 11.4 but torch needs 12.0 or newer"):
        env.choose_torch(WINDOWS, old, "gpu")
    assert env.choose_torch(WINDOWS, old, "auto").variant == "default"
    assert (
        env.choose_torch(WINDOWS, None, "gpu").variant == "default"
    )  # run_gpu without a GPU: CPU torch, said
    assert env.choose_torch(LINUX, None, "gpu").tag == "cpu"


def test_the_project_requirements_parse():
    reqs = env.parse_requirements((ROOT / "requirements.txt").read_text())
    names = [r.name for r in reqs]
    assert "torch" in names and "requests" in names and "py7zr" in names
    assert all(r.pin for r in reqs)


def test_plan_installs_only_the_difference():
    reqs = env.parse_requirements(REQS)
    cuda = env.choose_torch(WINDOWS, RTX, "auto")
    everything = {"torch": "2.13.0+cu126", "safetensors": "0.8.0", "numpy": "2.4.6", "pillow": "13.0.0"}
    assert env.plan_install(reqs, everything, cuda).empty
    plan = env.plan_install(reqs, {**everything, "numpy": "2.4.5", "Pillow": "13.0.0"}, cuda)
    assert plan.torch is None and [r.spec for r in plan.others] == ["numpy==2.4.6"]
    # a CPU-only torch on an NVIDIA Windows machine is replaced by the CUDA build, pinned with its local label
    plan = env.plan_install(reqs, {**everything, "torch": "2.13.0+cpu"}, cuda)
    assert plan.torch is not None and not plan.others
    (command,) = env.pip_commands(r"C:\fd\python_embeded\python.exe", plan, cuda)
    assert command[0] == r"C:\fd\python_embeded\python.exe" and command[1:4] == ["-m", "pip", "install"]
    assert command[-3:] == ["torch==2.13.0+cu126", "--index-url", "https://download.pytorch.org/whl/cu126"]
    # for the CPU any build of the pinned version will do; for a GPU only the build planned for the card
    assert env.plan_install(
        reqs, {**everything, "torch": "2.13.0"}, env.choose_torch(LINUX, None, "cpu")
    ).empty
    assert env.plan_install(
        reqs, {**everything, "torch": "2.13.0"}, env.choose_torch(LINUX, RTX, "auto")
    ).torch


def test_hosts_to_reach_follow_the_plan():
    reqs = env.parse_requirements(REQS)
    cuda = env.choose_torch(WINDOWS, RTX, "auto")
    assert env.hosts_needed(env.plan_install(reqs, {}, cuda), cuda) == [
        "download.pytorch.org",
        "pypi.org",
        "files.pythonhosted.org",
    ]
    only_numpy = env.plan_install(
        reqs, {"torch": "2.13.0+cu126", "safetensors": "0.8.0", "pillow": "13.0.0"}, cuda
    )
    assert env.hosts_needed(only_numpy, cuda, pip_index="https://mirror.example/simple") == ["mirror.example"]


def test_gpu_verdicts():
    cpu_torch = env.TorchProbe("2.13.0+cpu", None, False)
    device, text = env.gpu_verdict(cpu_torch, RTX, "auto")
    assert device == "cpu" and "CPU-only build" in text and "python -m bootstrap env --gpu" in text
    device, text = env.gpu_verdict(env.TorchProbe("2.13.0+cu126", "12.6", True, "RTX 3060"), RTX, "auto")
    assert device == "cuda" and text.startswith("The GPU is usable: RTX 3060")
    _, text = env.gpu_verdict(env.TorchProbe("2.13.0+cu130", "13.0", False), RTX, "auto")
    assert "update the NVIDIA driver" in text
    assert env.gpu_verdict(cpu_torch, None, "auto")[1].startswith("No NVIDIA GPU was found")


def test_nvidia_smi_parsing():
    assert parse_gpu_query("NVIDIA GeForce RTX 3060, 12288\nTesla T4, 15360\n") == [
        ("NVIDIA GeForce RTX 3060", 12288),
        ("Tesla T4", 15360),
    ]
    assert parse_cuda_version("| NVIDIA-SMI 560.94   Driver Version: 560.94   CUDA Version: 12.6     |") == (
        12,
        6,
    )


class FakeRunner(env.Runner):
    """Plays the environment's Python: knows what is installed, what pip installs, what torch reports."""

    def __init__(self, installed: dict[str, str], probe: dict, selftest_rc: int = 0) -> None:
        self.installed = dict(installed)
        self.probe = probe
        self.selftest_rc = selftest_rc
        self.commands: list[list[str]] = []

    def run(self, argv, cwd=None, capture=False):
        self.commands.append(list(argv))
        out, rc = "", 0
        if argv[1:3] == ["-m", "venv"]:
            Path(argv[3]).mkdir(parents=True)
            (Path(argv[3]) / "pyvenv.cfg").write_text("home = /usr\n")
        elif argv[1:] == ["-c", env.INSTALLED_CODE]:
            out = json.dumps(self.installed)
        elif argv[1:] == ["-c", env.PROBE_CODE]:
            out = json.dumps(self.probe)
        elif argv[1:5] == ["-m", "pip", "install", "--help"]:
            out = ""  # a pip without --progress-bar raw
        elif argv[1:4] == ["-m", "pip", "install"]:
            for spec in argv[6:]:
                if spec.startswith("-"):
                    break
                name, _, version = spec.partition("==")
                self.installed[name] = version
        elif argv[1:4] == ["-m", "engine", "selftest"]:
            rc = self.selftest_rc
        elif argv[1:] == ["-m", "pip", "--version"]:
            rc = 0
        return subprocess.CompletedProcess(argv, rc, out, "")

    def stream(self, argv, on_line, cwd=None):
        done = self.run(argv, cwd, capture=True)
        for line in done.stdout.splitlines():
            on_line(line)
        return done.returncode

    def pip_installs(self) -> list[list[str]]:
        return [c for c in self.commands if c[1:4] == ["-m", "pip", "install"] and "--help" not in c]


def builder(
    tmp_path,
    plat,
    gpu,
    runner,
    device="auto",
    reachable=True,
    said=None,
    reqs=REQS,
    long_paths=True,
    writable=True,
):
    (tmp_path / "requirements.txt").write_text(reqs)
    options = env.EnvOptions(device=device, root=tmp_path, base_python="/usr/bin/python3")
    probe = (lambda host: None) if reachable else (lambda host: "Name or service not known")
    return env.EnvironmentBuilder(
        options,
        plat,
        gpu,
        runner,
        probe,
        say=(said if said is not None else []).append,
        writable=lambda folder: writable,
        long_paths=lambda: long_paths,
    )


@pytest.mark.parametrize(
    "long_paths, writable, sentence", [(False, True, "too long"), (True, False, "not writable")]
)
def test_a_long_path_or_a_read_only_folder_stops_before_anything_is_written(
    tmp_path, long_paths, writable, sentence
):
    runner = FakeRunner({}, CUDA_PROBE)
    root = tmp_path / ("a folder name far too long for Windows " * 2).strip()
    root.mkdir()
    with pytest.raises(BootstrapError, match=sentence):
        builder(root, WINDOWS, RTX, runner, long_paths=long_paths, writable=writable).build()
    assert runner.commands == [] and not (root / ".venv").exists() and not (root / "logs").exists()


CUDA_PROBE = {"version": "2.13.0+cu126", "cuda": "12.6", "available": True, "device_name": "RTX 3060"}


def test_windows_portable_build_then_no_op_then_only_the_difference(tmp_path):
    embedded = tmp_path / "python_embeded"
    embedded.mkdir()
    (embedded / "python.exe").write_bytes(b"")
    (embedded / "python311._pth").write_text("python311.zip\n.\n#import site\n")
    runner = FakeRunner({}, CUDA_PROBE)
    said: list[str] = []
    assert builder(tmp_path, WINDOWS, RTX, runner, said=said).build() == 0
    python = str(env.PureWindowsPath(str(tmp_path)) / "python_embeded" / "python.exe")
    torch_cmd, rest_cmd = runner.pip_installs()
    assert torch_cmd[0] == python and torch_cmd[-3:] == [
        "torch==2.13.0+cu126",
        "--index-url",
        "https://download.pytorch.org/whl/cu126",
    ]
    assert rest_cmd[6:] == ["safetensors==0.8.0", "numpy==2.4.6", "Pillow==13.0.0"]
    assert [python, "-m", "engine", "selftest", "--device", "cuda"] in runner.commands
    assert "import site" in (embedded / "python311._pth").read_text().splitlines()
    assert any(s.startswith("The GPU is usable") for s in said)

    runner.commands.clear()
    assert builder(tmp_path, WINDOWS, RTX, runner).build() == 0
    assert runner.pip_installs() == [] and not any("selftest" in c for c in runner.commands)  # ready: a no-op

    runner.commands.clear()
    assert (
        builder(tmp_path, WINDOWS, RTX, runner, reqs=REQS.replace("numpy==2.4.6", "numpy==2.5.0")).build()
        == 0
    )
    assert [c[6:] for c in runner.pip_installs()] == [["numpy==2.5.0"]]


def test_unreachable_host_is_named_and_nothing_is_installed(tmp_path):
    runner = FakeRunner({"torch": "2.13.0+cpu"}, CUDA_PROBE)
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "pyvenv.cfg").write_text("")
    with pytest.raises(
        BootstrapError,
        match=r"Could not reach download\.pytorch\.org \(Name or service not known\).*left as it was",
    ):
        builder(tmp_path, WINDOWS, RTX, runner, reachable=False).build()
    assert runner.pip_installs() == []


def test_linux_venv_is_created_from_the_running_python(tmp_path):
    runner = FakeRunner({}, {"version": "2.13.0+cpu", "cuda": None, "available": False})
    assert builder(tmp_path, LINUX, None, runner, device="cpu").build() == 0
    assert runner.commands[0] == ["/usr/bin/python3", "-m", "venv", str(tmp_path / ".venv")]
    assert runner.pip_installs()[0][-3:] == [
        "torch==2.13.0",
        "--index-url",
        "https://download.pytorch.org/whl/cpu",
    ]
    assert [
        str(tmp_path / ".venv/bin/python"),
        "-m",
        "engine",
        "selftest",
        "--device",
        "cpu",
    ] in runner.commands


def test_gpu_insisted_on_but_unusable_fails_with_the_fix(tmp_path):
    runner = FakeRunner({}, {"version": "2.13.0", "cuda": None, "available": False})
    with pytest.raises(
        BootstrapError, match=r"CPU-only build although an NVIDIA GPU \(NVIDIA GeForce RTX 3060\) is present"
    ):
        builder(tmp_path, LINUX, RTX, runner, device="gpu").build()


def test_env_command_needs_only_the_standard_library():
    code = (
        "import sys, bootstrap.cli, bootstrap.environment, bootstrap.hardware;"
        "bad = [m for m in ('requests', 'psutil', 'py7zr', 'torch') if m in sys.modules]; print(bad)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_cpu_build_falls_back_to_pypi_when_the_pytorch_index_cannot_be_reached(tmp_path):
    runner = FakeRunner({}, {"version": "2.13.0", "cuda": None, "available": False})
    (tmp_path / "requirements.txt").write_text(REQS)
    options = env.EnvOptions(device="cpu", root=tmp_path, base_python="/usr/bin/python3")
    said = []

    def probe(host):
        return "Name or service not known" if host == "download.pytorch.org" else None

    assert env.EnvironmentBuilder(options, LINUX, None, runner, probe, say=said.append).build() == 0
    torch_install = runner.pip_installs()[0]
    assert "--index-url" not in torch_install and torch_install[-1] == "torch==2.13.0"
    assert any("download.pytorch.org cannot be reached: torch from PyPI instead" in line for line in said)


def test_the_long_path_check_measures_from_the_folder_that_holds_site_packages(tmp_path, monkeypatch):
    seen: list[str] = []
    monkeypatch.setattr(env, "long_path_problem", lambda env_dir, enabled: seen.append(env_dir))
    built = builder(tmp_path, WINDOWS, RTX, FakeRunner({}, CUDA_PROBE), long_paths=False)
    built._preflight(built.choice())  # a venv: .venv\Lib\site-packages, not .venv\Scripts
    (tmp_path / "python_embeded").mkdir()
    (tmp_path / "python_embeded" / "python.exe").write_bytes(b"")
    built._preflight(built.choice())
    spelled = str(env.PureWindowsPath(str(tmp_path)))
    assert seen == [spelled + "\\.venv", spelled + "\\python_embeded"]
