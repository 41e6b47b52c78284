"""`python -m bootstrap env`: the Python environment FluxDeck runs in, built from requirements.txt.

Decisions are plain functions (which Python, which torch index, what to install) so they are tested on any OS;
`build_environment` carries them out through a Runner. Standard library only: this runs before anything is
installed.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.parse import urlsplit

from bootstrap.errors import BootstrapError
from bootstrap.hardware import GpuInfo, Platform, detect_gpu

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_DIR = "python_embeded"  # the folder name ComfyUI's portable build made familiar
VENV_DIR = ".venv"
STAMP_NAME = "fluxdeck-env.json"
TORCH_INDEX = "https://download.pytorch.org/whl"
# CUDA builds of the pinned torch, newest first, with the driver CUDA version each needs (nvidia-smi's
# "CUDA Version"). Keep in step with the torch pin in requirements.txt.
CUDA_WHEELS = (("cu130", (13, 0)), ("cu128", (12, 8)), ("cu126", (12, 6)))
PYPI_HOSTS = ("pypi.org", "files.pythonhosted.org")
GET_PIP_URL = "https://bootstrap.pypa.io/get-pip.py"
DRIVER_PAGE = "https://www.nvidia.com/drivers"


# ---- which Python ----


@dataclass(frozen=True)
class PythonChoice:
    kind: str  # "embedded" (Windows portable) or "venv"
    env_dir: Path  # the folder it lives in (on this machine's file system)
    python: str  # its interpreter, spelled for the target OS

    @property
    def venv(self) -> bool:
        return self.kind == "venv"


def choose_python(root: Path, plat: Platform, embedded_present: bool) -> PythonChoice:
    """Windows: python_embeded/ when the bundle has it, else a venv; elsewhere: a venv from this Python."""
    spelled = PureWindowsPath(str(root)) if plat.windows else PurePosixPath(str(root))
    if plat.windows and embedded_present:
        return PythonChoice("embedded", root / EMBEDDED_DIR, str(spelled / EMBEDDED_DIR / "python.exe"))
    inner = ("Scripts", "python.exe") if plat.windows else ("bin", "python")
    return PythonChoice("venv", root / VENV_DIR, str(spelled.joinpath(VENV_DIR, *inner)))


def patch_pth(text: str) -> str:
    """The embeddable Python's pythonXY._pth: enable `import site` (site-packages, pip) and add the project root."""
    lines = text.splitlines()
    out = []
    for line in lines:
        if line.strip().lstrip("#").strip() == "import site":
            continue
        out.append(line)
    if ".." not in (line.strip() for line in out):
        out.append("..")
    out.append("import site")
    return "\n".join(out) + "\n"


# ---- which torch ----


@dataclass(frozen=True)
class TorchChoice:
    index_url: str | None  # None: PyPI
    variant: str  # "cuda", "cpu" or "default" (whatever PyPI has for this OS)
    tag: str | None  # "cu128", "cpu"
    reason: str

    @property
    def host(self) -> str | None:
        return urlsplit(self.index_url).hostname if self.index_url else None


def cuda_tag(driver_cuda: tuple[int, int] | None) -> str | None:
    """The newest CUDA build of torch the driver can run (None: the driver is too old, or unknown)."""
    if driver_cuda is None:
        return CUDA_WHEELS[-1][0]  # nvidia-smi did not say: the oldest build needs the least driver
    for tag, needs in CUDA_WHEELS:
        if driver_cuda >= needs:
            return tag
    return None


def choose_torch(plat: Platform, gpu: GpuInfo | None, device: str) -> TorchChoice:
    """device: "auto", "gpu" or "cpu". Windows + NVIDIA: PyTorch's CUDA index; Linux without a GPU: its CPU index
    (PyPI's Linux torch carries gigabytes of CUDA libraries); otherwise PyPI."""
    want_gpu = device == "gpu" or (device == "auto" and gpu is not None)
    if want_gpu and gpu is None and plat.system != "Darwin":
        want_gpu = False  # run_gpu on a machine without an NVIDIA GPU: the CPU build, and the verdict says so
    if want_gpu and gpu is not None and plat.windows:
        tag = cuda_tag(gpu.cuda)
        if tag is None:
            version = ".".join(map(str, gpu.cuda or ()))
            oldest = ".".join(map(str, CUDA_WHEELS[-1][1]))
            if device == "gpu":
                raise BootstrapError(
                    f"The NVIDIA driver runs CUDA {version} but torch needs {oldest} or newer: update the driver "
                    f"from {DRIVER_PAGE} and run this again, or use run_cpu."
                )
            return TorchChoice(
                None,
                "default",
                None,
                f"the NVIDIA driver (CUDA {version}) is too old for torch's CUDA builds: CPU torch from PyPI",
            )
        return TorchChoice(
            f"{TORCH_INDEX}/{tag}", "cuda", tag, f"{gpu.name}: torch's {tag} build from the PyTorch index"
        )
    if want_gpu and gpu is not None:
        return TorchChoice(
            None, "default", None, f"{gpu.name}: PyPI's torch, which is built with CUDA on Linux"
        )
    if plat.system == "Linux":
        return TorchChoice(
            f"{TORCH_INDEX}/cpu",
            "cpu",
            "cpu",
            "no GPU wanted: torch's CPU build (no CUDA libraries to download)",
        )
    return TorchChoice(
        None,
        "default",
        None,
        "torch from PyPI" + (" (Apple GPU through MPS)" if plat.system == "Darwin" else ""),
    )


# ---- what to install ----


@dataclass(frozen=True)
class Requirement:
    name: str  # normalised (PEP 503)
    spec: str  # as pip takes it, e.g. "torch==2.13.0"
    pin: str | None  # the exact version of a "==" pin


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirements(text: str) -> list[Requirement]:
    out = []
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#") or line.startswith("-"):
            continue
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*(.*)$", line)
        if not match:
            raise BootstrapError(f"requirements.txt has a line the bootstrap cannot read: {raw.strip()!r}.")
        rest = match.group(3).strip()
        pin = rest[2:].split(";")[0].strip() if rest.startswith("==") else None
        out.append(Requirement(normalise(match.group(1)), line, pin))
    return out


def public_version(version: str) -> str:
    return version.split("+", 1)[0]


def local_label(version: str) -> str:
    return version.partition("+")[2]


@dataclass
class InstallPlan:
    torch: Requirement | None = None  # torch, from the chosen index
    others: list[Requirement] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.torch is None and not self.others


def _satisfied(req: Requirement, installed: dict[str, str]) -> bool:
    version = installed.get(req.name)
    return version is not None and (req.pin is None or public_version(version) == public_version(req.pin))


def plan_install(reqs: list[Requirement], installed: dict[str, str], choice: TorchChoice) -> InstallPlan:
    """Only the difference: missing packages, other pins; torch also when a CUDA build is wanted and it is not one."""
    installed = {normalise(k): v for k, v in installed.items()}
    plan = InstallPlan()
    for req in reqs:
        if req.name == "torch":
            wrong_build = choice.variant == "cuda" and not local_label(installed.get("torch", "")).startswith(
                "cu"
            )
            if wrong_build or not _satisfied(req, installed):
                plan.torch = req
        elif not _satisfied(req, installed):
            plan.others.append(req)
    return plan


def pip_commands(python: str, plan: InstallPlan, choice: TorchChoice) -> list[list[str]]:
    base = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    commands = []
    if plan.torch is not None:
        spec = plan.torch.spec
        if choice.variant == "cuda" and plan.torch.pin:
            spec = f"torch=={public_version(plan.torch.pin)}+{choice.tag}"  # exact: a CPU build of the same version must not count
        index = ["--index-url", choice.index_url] if choice.index_url else []
        commands.append(base + [spec] + index)
    if plan.others:
        commands.append(base + [r.spec for r in plan.others])
    return commands


def hosts_needed(plan: InstallPlan, choice: TorchChoice, pip_index: str | None = None) -> list[str]:
    pypi = (urlsplit(pip_index).hostname,) if pip_index else PYPI_HOSTS
    hosts: list[str] = []
    if plan.torch is not None:
        hosts += [choice.host] if choice.host else list(pypi)
    if plan.others:
        hosts += list(pypi)
    return [h for i, h in enumerate(hosts) if h and h not in hosts[:i]]


# ---- whether the GPU is usable ----


@dataclass(frozen=True)
class TorchProbe:
    version: str
    cuda: str | None  # torch.version.cuda: None for a CPU-only build
    available: bool  # torch.cuda.is_available()
    device_name: str | None = None


PROBE_CODE = (
    "import json, torch; ok = torch.cuda.is_available(); print(json.dumps({'version': torch.__version__, "
    "'cuda': torch.version.cuda, 'available': ok, 'device_name': torch.cuda.get_device_name(0) if ok else None}))"
)


def gpu_verdict(probe: TorchProbe, gpu: GpuInfo | None, device: str) -> tuple[str, str]:
    """(device for the selftest, one sentence on whether the GPU is usable and what to do if not)."""
    if probe.available and device != "cpu":
        return (
            "cuda",
            f"The GPU is usable: {probe.device_name} with torch {probe.version} (CUDA {probe.cuda}).",
        )
    if device == "cpu":
        return "cpu", f"Running on the CPU as asked (torch {probe.version})."
    if gpu is not None and probe.cuda is None:
        return "cpu", (
            f"The GPU is not usable: torch {probe.version} is a CPU-only build although an NVIDIA GPU ({gpu.name}) is present; "
            "run `python -m bootstrap env --gpu` (run_gpu does) to install torch's CUDA build."
        )
    if gpu is not None:
        return "cpu", (
            f"The GPU is not usable: torch {probe.version} is built for CUDA {probe.cuda} but the {gpu.name}'s driver "
            f"cannot run it; update the NVIDIA driver from {DRIVER_PAGE} and run this again."
        )
    return "cpu", (
        f"No NVIDIA GPU was found (nvidia-smi did not answer): FluxDeck runs on the CPU (torch {probe.version}), "
        f"minutes per image; with an NVIDIA card, install its driver from {DRIVER_PAGE} and run this again."
    )


# ---- carrying it out ----


@dataclass
class EnvOptions:
    device: str = "auto"  # "auto", "gpu", "cpu"
    selftest: bool = True
    root: Path = PROJECT_ROOT
    requirements: Path | None = None
    base_python: str = sys.executable  # what a venv is made from


class Runner:
    """Runs commands; tests substitute one that records them."""

    def run(
        self, argv: list[str], cwd: Path | None = None, capture: bool = False
    ) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(argv, cwd=cwd, capture_output=capture, text=True)
        except OSError as exc:
            return subprocess.CompletedProcess(argv, 127, "", str(exc))


def reach(host: str, timeout: float = 10.0) -> str | None:
    """None when the host answers HTTPS at all (any status, through any proxy); else why not."""
    try:
        urllib.request.urlopen(
            urllib.request.Request(f"https://{host}/", method="HEAD"), timeout=timeout
        ).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))
    return None


INSTALLED_CODE = (
    "import importlib.metadata as m, json; "
    "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions() if d.metadata['Name']}))"
)


@dataclass
class EnvironmentBuilder:
    options: EnvOptions
    plat: Platform = field(default_factory=Platform.current)
    gpu: GpuInfo | None = None
    runner: Runner = field(default_factory=Runner)
    probe_host: Callable[[str], str | None] = reach
    fetch_url: Callable[[str, Path], None] | None = None
    say: Callable[[str], None] = print

    @property
    def requirements_file(self) -> Path:
        return self.options.requirements or self.options.root / "requirements.txt"

    def choice(self) -> PythonChoice:
        embedded = (self.options.root / EMBEDDED_DIR / "python.exe").is_file()
        return choose_python(self.options.root, self.plat, embedded)

    def build(self) -> int:
        py = self.choice()
        text = self.requirements_file.read_text(encoding="utf-8")
        reqs = parse_requirements(text)
        torch = choose_torch(self.plat, self.gpu, self.options.device)
        stamp_key = {
            "requirements": hashlib.sha256(text.encode()).hexdigest(),
            "torch": torch.index_url,
            "device": self.options.device,
        }
        self._ensure_interpreter(py)
        installed = self._installed(py)
        plan = plan_install(reqs, installed, torch)
        stamp = self._read_stamp(py)
        if (
            plan.empty
            and stamp.get("key") == stamp_key
            and (stamp.get("selftest") or not self.options.selftest)
        ):
            self.say(f"The environment in {py.env_dir} is ready. {stamp.get('verdict', '')}".strip())
            return 0
        if not plan.empty:
            self._install(py, plan, torch)
        verdict, passed = self._prove(py, self.options.device)
        self._write_stamp(py, {"key": stamp_key, "selftest": passed, "verdict": verdict})
        return 0

    def _ensure_interpreter(self, py: PythonChoice) -> None:
        if py.venv:
            if not (py.env_dir / "pyvenv.cfg").is_file():
                self.say(f"Creating a virtual environment in {py.env_dir} from {self.options.base_python}.")
                done = self.runner.run([self.options.base_python, "-m", "venv", str(py.env_dir)])
                if done.returncode != 0:
                    raise BootstrapError(
                        f"Python could not create a virtual environment in {py.env_dir}: see the message above."
                    )
            return
        for pth in sorted(py.env_dir.glob("python3*._pth")):
            patched = patch_pth(pth.read_text(encoding="utf-8"))
            if patched != pth.read_text(encoding="utf-8"):
                pth.write_text(patched, encoding="utf-8")
        if self.runner.run([py.python, "-m", "pip", "--version"], capture=True).returncode == 0:
            return
        problem = self.probe_host(urlsplit(GET_PIP_URL).hostname or "")
        if problem:
            raise BootstrapError(
                f"Could not reach {urlsplit(GET_PIP_URL).hostname} to install pip ({problem}): check the connection and run this again."
            )
        get_pip = py.env_dir / "get-pip.py"
        (self.fetch_url or _download_to)(GET_PIP_URL, get_pip)
        if self.runner.run([py.python, str(get_pip), "--no-warn-script-location"]).returncode != 0:
            raise BootstrapError(
                "get-pip.py could not install pip into the embedded Python: see the message above."
            )

    def _installed(self, py: PythonChoice) -> dict[str, str]:
        done = self.runner.run([py.python, "-c", INSTALLED_CODE], capture=True)
        if done.returncode != 0:
            raise BootstrapError(
                f"The environment's Python {py.python} does not start: delete {py.env_dir} and run this again."
            )
        return json.loads(done.stdout or "{}")

    def _install(self, py: PythonChoice, plan: InstallPlan, torch: TorchChoice) -> None:
        if plan.torch is not None and torch.variant == "cpu" and self.probe_host(torch.host or ""):
            # the small CPU build is only a nicety: PyPI's torch computes the same on the CPU
            torch = TorchChoice(
                None, "default", None, f"{torch.host} cannot be reached: torch from PyPI instead"
            )
        for host in hosts_needed(plan, torch):
            problem = self.probe_host(host)
            if problem:
                raise BootstrapError(
                    f"Could not reach {host} ({problem}): check the internet connection or proxy (HTTPS_PROXY) and "
                    "run this again; the environment was left as it was."
                )
        names = ([plan.torch.spec] if plan.torch else []) + [r.spec for r in plan.others]
        self.say(f"Installing {', '.join(names)} ({torch.reason}).")
        for command in pip_commands(py.python, plan, torch):
            if self.runner.run(command).returncode != 0:
                raise BootstrapError(
                    f"pip could not install {' '.join(c for c in command[6:] if not c.startswith('-'))}: see pip's message "
                    "above; the packages already there were kept."
                )

    def _prove(self, py: PythonChoice, device: str) -> tuple[str, bool]:
        done = self.runner.run([py.python, "-c", PROBE_CODE], capture=True)
        if done.returncode != 0:
            raise BootstrapError(
                f"torch does not import in {py.env_dir}: {(done.stderr or '').strip().splitlines()[-1:]}."
            )
        probe = TorchProbe(**json.loads(done.stdout.strip().splitlines()[-1]))
        selftest_device, verdict = gpu_verdict(probe, self.gpu, device)
        if device == "gpu" and self.gpu is not None and selftest_device != "cuda":
            raise BootstrapError(verdict)  # an NVIDIA GPU that torch cannot use: the sentence says the fix
        self.say(verdict)
        if not self.options.selftest:
            return verdict, False
        done = self.runner.run(
            [py.python, "-m", "engine", "selftest", "--device", selftest_device], cwd=self.options.root
        )
        if done.returncode != 0:
            raise BootstrapError(f"The engine's selftest failed on {selftest_device}: see its message above.")
        self.say(f"The engine's selftest passed on {selftest_device}.")
        return verdict, True

    def _read_stamp(self, py: PythonChoice) -> dict:
        try:
            return json.loads((py.env_dir / STAMP_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def _write_stamp(self, py: PythonChoice, data: dict) -> None:
        (py.env_dir / STAMP_NAME).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _download_to(url: str, path: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise BootstrapError(
            f"Could not download {url} ({getattr(exc, 'reason', exc)}): check the connection."
        ) from None
    path.write_bytes(data)


def environment_python(options: EnvOptions, plat: Platform | None = None) -> str:
    plat = plat or Platform.current()
    return choose_python(options.root, plat, (options.root / EMBEDDED_DIR / "python.exe").is_file()).python


def build_environment(options: EnvOptions) -> int:
    plat = Platform.current()
    gpu = detect_gpu() if options.device != "cpu" else None
    return EnvironmentBuilder(options, plat, gpu).build()
