"""`python -m bootstrap env`: the Python environment FluxDeck runs in, built from requirements.txt.

Decisions are plain functions (which Python, which torch index, what to install) so they are tested on any OS;
`build_environment` carries them out through a Runner. Standard library only: this runs before anything is
installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TextIO
from urllib.parse import urlsplit

from bootstrap.errors import BootstrapError
from bootstrap.hardware import GpuInfo, Platform, detect_gpu
from bootstrap.pip_output import BuildLog, PipWatcher, lines_that_matter, progress_bar_choice
from bootstrap.preflight import (
    folder_writable,
    long_path_problem,
    windows_long_paths_enabled,
    writable_problem,
)
from bootstrap.progress import TerminalProgress, human_duration
from bootstrap.untrusted import printable

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_DIR = "python_embeded"  # the folder name ComfyUI's portable build made familiar
VENV_DIR = ".venv"
STAMP_NAME = "fluxdeck-env.json"
LOG_PATH = Path("logs") / "environment.log"  # under the project root: pip's whole output, the selftest's too
TORCH_INDEX = "https://download.pytorch.org/whl"
# The CUDA builds of the pinned torch (2.13.0 ships exactly these two; 2.15 drops cu126, which Maxwell, Pascal
# and Volta need: keep the pin where cu126 exists). Each: the driver CUDA it needs (nvidia-smi's "CUDA Version";
# a CUDA 12 build runs on any CUDA 12 driver by CUDA's minor-version compatibility) and the compute capabilities
# it has kernels for (cu130 starts at Turing, 7.5; cu126 ends before Blackwell).
CU130 = "cu130"
CU126 = "cu126"
CUDA_NEEDS = {CU130: (13, 0), CU126: (12, 0)}
CUDA_KERNELS = {CU130: ((7, 5), (13, 0)), CU126: ((5, 0), (10, 0))}  # [low, high) compute capability
MIN_COMPUTE = (5, 0)
DRIVER_FOR_CU130 = "580"
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
    tag: str | None  # "cu130", "cu126", "cpu"
    reason: str

    @property
    def host(self) -> str | None:
        return urlsplit(self.index_url).hostname if self.index_url else None


def _dotted(version: tuple[int, ...] | None) -> str:
    return ".".join(map(str, version)) if version else "unknown"


def _has_kernels(tag: str, compute: tuple[int, int]) -> bool:
    low, high = CUDA_KERNELS[tag]
    return low <= compute < high


def cuda_build(gpu: GpuInfo) -> tuple[str | None, str]:
    """(the CUDA build of torch for this card and driver, or None; why, in words). Never a build without
    kernels for the card: cu130 needs compute 7.5+, cu126 ends before Blackwell and needs a CUDA 12 driver."""
    compute, driver_cuda = gpu.compute, gpu.cuda
    driver = f"driver {gpu.driver}" if gpu.driver else "driver"
    runs_13 = driver_cuda is not None and driver_cuda >= CUDA_NEEDS[CU130]
    runs_12 = driver_cuda is not None and driver_cuda >= CUDA_NEEDS[CU126]
    if compute is None:  # neither nvidia-smi nor the name told: the driver decides
        if runs_13:
            return CU130, f"{gpu.name} ({driver}, CUDA {_dotted(driver_cuda)}): torch's {CU130} build"
        if runs_12 or driver_cuda is None:
            return CU126, f"{gpu.name} ({driver}): torch's {CU126} build"
    elif compute < MIN_COMPUTE:
        return None, (
            f"the {gpu.name} (compute capability {gpu.compute_text}) is older than any CUDA build of torch "
            f"supports (5.0 or newer), so FluxDeck runs on the CPU"
        )
    elif runs_13 and _has_kernels(CU130, compute):
        return (
            CU130,
            f"{gpu.name} (compute {gpu.compute_text}, CUDA {_dotted(driver_cuda)}): torch's {CU130} build",
        )
    elif (runs_12 or driver_cuda is None) and _has_kernels(CU126, compute):
        why = "has no kernels below 7.5" if runs_13 else "needs driver 580"
        return CU126, (
            f"{gpu.name} (compute {gpu.compute_text}, CUDA {_dotted(driver_cuda)}): torch's {CU126} build "
            f"({CU130} {why})"
        )
    elif runs_12 or driver_cuda is None:  # Blackwell on a CUDA 12 driver: only cu130 has its kernels
        return None, (
            f"the {gpu.name} needs torch's {CU130} build, which this {driver} (CUDA {_dotted(driver_cuda)}) "
            f"cannot run: update the driver to {DRIVER_FOR_CU130} or newer from {DRIVER_PAGE} and run this again"
        )
    return None, (
        f"the NVIDIA {driver} runs CUDA {_dotted(driver_cuda)} but torch needs 12.0 or newer: update the driver "
        f"from {DRIVER_PAGE} (580 or newer) and run this again"
    )


def choose_torch(plat: Platform, gpu: GpuInfo | None, device: str) -> TorchChoice:
    """device: "auto", "gpu" or "cpu". An NVIDIA GPU (Windows or Linux): the PyTorch index's build for its compute
    capability and driver (cu130 or cu126); no GPU, or --cpu: the CPU build (PyTorch's CPU index on Linux, whose
    PyPI torch carries gigabytes of CUDA libraries; PyPI's torch elsewhere, the CPU build on Windows)."""
    want_gpu = device == "gpu" or (device == "auto" and gpu is not None)
    if want_gpu and gpu is not None and plat.system != "Darwin":
        tag, why = cuda_build(gpu)
        if tag is not None:
            return TorchChoice(f"{TORCH_INDEX}/{tag}", "cuda", tag, why)
        too_old = gpu.compute is not None and gpu.compute < MIN_COMPUTE
        if device == "gpu" and not too_old:
            raise BootstrapError(f"{why[0].upper()}{why[1:]}, or use run_cpu.")
        return _cpu_choice(plat, why[0].upper() + why[1:])
    if device != "cpu" and plat.system == "Darwin":
        return TorchChoice(None, "default", None, "torch from PyPI (Apple GPU through MPS)")
    why = "no GPU wanted" if device == "cpu" else "no NVIDIA GPU found"
    return _cpu_choice(plat, why)


def _cpu_choice(plat: Platform, why: str) -> TorchChoice:
    if plat.system == "Linux":
        return TorchChoice(
            f"{TORCH_INDEX}/cpu", "cpu", "cpu", f"{why}: torch's CPU build (no CUDA libraries to download)"
        )
    return TorchChoice(None, "default", "cpu" if plat.windows else None, f"{why}: torch from PyPI (CPU)")


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
            # a CPU build, or a CUDA build without kernels for this card (cu130 on a Pascal), is replaced
            wrong_build = choice.variant == "cuda" and local_label(installed.get("torch", "")) != choice.tag
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
    kernel_error: str | None = None  # a real kernel run on the GPU failed: the first line of why


# is_available() says yes to a card torch has no kernels for: a real kernel runs too.
PROBE_CODE = """import json, torch
ok = torch.cuda.is_available()
name = torch.cuda.get_device_name(0) if ok else None
error = None
if ok:
    try:
        float((torch.arange(64, device="cuda", dtype=torch.float32) * 2).sum().item())
    except Exception as exc:
        error = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
print(json.dumps({"version": torch.__version__, "cuda": torch.version.cuda, "available": ok,
                  "device_name": name, "kernel_error": error}))
"""


def gpu_verdict(
    probe: TorchProbe, gpu: GpuInfo | None, device: str, torch: TorchChoice | None = None
) -> tuple[str, str]:
    """(device for the selftest, one sentence on whether the GPU is usable and what to do if not)."""
    if device == "cpu":
        return "cpu", f"Running on the CPU as asked (torch {probe.version})."
    if probe.available and probe.kernel_error:
        card = probe.device_name or (gpu.name if gpu else "GPU")
        compute = f" (compute capability {gpu.compute_text})" if gpu else ""
        if "no kernel image" in probe.kernel_error.lower():
            return "cpu", (
                f"The GPU is not usable: torch {probe.version} has no kernels for the {card}{compute}; run "
                "`python -m bootstrap env --gpu` (run_gpu does) to install the build that has them, and update the "
                f"NVIDIA driver from {DRIVER_PAGE} if this stays."
            )
        return "cpu", (
            f"The GPU is not usable: a test computation on the {card} failed ({probe.kernel_error}); update the "
            f"NVIDIA driver from {DRIVER_PAGE} and run this again."
        )
    if probe.available:
        return (
            "cuda",
            f"The GPU is usable: {probe.device_name} with torch {probe.version} (CUDA {probe.cuda}).",
        )
    if torch is not None and torch.variant != "cuda" and gpu is not None:
        return (
            "cpu",
            f"Running on the CPU: {torch.reason[0].lower()}{torch.reason[1:]} (torch {probe.version}).",
        )
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

    def stream(self, argv: list[str], on_line: Callable[[str], None], cwd: Path | None = None) -> int:
        """Runs argv with its stdout and stderr, merged, handed over line by line as they come; the exit code.
        Python children write unbuffered UTF-8 (whatever the console's code page), and read nothing."""
        child_env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        try:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=child_env,
            )
        except OSError as exc:
            on_line(f"could not start {argv[0]}: {exc}")
            return 127
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                on_line(raw.decode("utf-8", "replace").rstrip("\r\n"))
            return proc.wait()
        except BaseException:
            # Ctrl+C reached pip too (the whole console gets it): a moment to clean up, then make sure it is gone
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        finally:
            proc.stdout.close()


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
    writable: Callable[[Path], bool] = folder_writable
    long_paths: Callable[[], bool] = windows_long_paths_enabled
    stream: TextIO | None = None  # where the redrawn status line and the bars go (default: stdout, as `say`)
    log: BuildLog = field(init=False)
    bar: TerminalProgress = field(init=False)
    _python_said: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.log = BuildLog(self.options.root / LOG_PATH)
        # in a log or a pipe a big download is a line per quarter, not one per percent
        self.bar = TerminalProgress(stream=self.stream or sys.stdout, log_every=30.0, log_percent=25)

    @property
    def requirements_file(self) -> Path:
        return self.options.requirements or self.options.root / "requirements.txt"

    def _live(self, text: str) -> None:
        """What a step is doing while it runs: on a terminal only (a log or a pipe gets the step's result)."""
        if self.bar.stream.isatty():
            self.bar.status(text)

    def step(self, text: str) -> None:
        """One of the build's lines (the status line being redrawn, if any, gives way)."""
        self.bar.clear()
        self.say(text)

    def choice(self) -> PythonChoice:
        embedded = (self.options.root / EMBEDDED_DIR / "python.exe").is_file()
        return choose_python(self.options.root, self.plat, embedded)

    def dry_run(self, local: bool = True) -> int:
        """Print what build() would do; change nothing. local: the plan is for this machine (its environment's
        packages are read when it exists); otherwise (--target the other OS) everything is planned."""
        py = self.choice()
        reqs = parse_requirements(self.requirements_file.read_text(encoding="utf-8"))
        torch = choose_torch(self.plat, self.gpu, self.options.device)
        exists = local and Path(py.python).is_file()
        installed = self._installed(py) if exists else {}
        plan = plan_install(reqs, installed, torch)
        for line in describe_plan(py, torch, self.gpu, plan, exists, self.options):
            self.say(line)
        return 0

    def build(self) -> int:
        try:
            return self._build()
        except BaseException as exc:
            self.bar.clear()
            self.log.note(f"stopped: {type(exc).__name__}: {exc}")
            raise

    def _build(self) -> int:
        py = self.choice()
        text = self.requirements_file.read_text(encoding="utf-8")
        reqs = parse_requirements(text)
        torch = choose_torch(self.plat, self.gpu, self.options.device)
        stamp_key = {
            "requirements": hashlib.sha256(text.encode()).hexdigest(),
            "torch": torch.index_url,
            "device": self.options.device,
        }
        stamp = self._read_stamp(py)
        if not stamp:
            self._preflight(py)  # a new environment: before the first file is written
        self._ensure_interpreter(py)
        installed = self._installed(py)
        plan = plan_install(reqs, installed, torch)
        if (
            plan.empty
            and stamp.get("key") == stamp_key
            and (stamp.get("selftest") or not self.options.selftest)
        ):
            self.say(f"The environment in {py.env_dir} is ready. {stamp.get('verdict', '')}".strip())
            return 0
        if not self._python_said:
            self.step(f"Python: {py.python} ({'virtual environment' if py.venv else 'embedded'}).")
        if not plan.empty:
            self._preflight(py)
            self._install(py, plan, torch)
        else:
            self.step(f"Packages: all {len(reqs)} in place.")
        verdict, passed = self._prove(py, self.options.device, torch)
        self._write_stamp(py, {"key": stamp_key, "selftest": passed, "verdict": verdict})
        return 0

    def _preflight(self, py: PythonChoice) -> None:
        """A folder that cannot be written, or a path too long for torch's wheel: one sentence before pip."""
        problem = writable_problem(self.options.root, self.writable(py.env_dir))
        if problem is None and self.plat.windows:
            folder = PureWindowsPath(py.python).parent  # python_embeded\, or .venv\Scripts\
            env_dir = folder.parent if py.venv else folder  # where Lib\site-packages\ is
            problem = long_path_problem(str(env_dir), self.long_paths())
        if problem:
            raise BootstrapError(problem)

    def _ensure_interpreter(self, py: PythonChoice) -> None:
        if py.venv:
            if not (py.env_dir / "pyvenv.cfg").is_file():
                self._live(f"Python: creating a virtual environment in {py.env_dir}")
                argv = [self.options.base_python, "-m", "venv", str(py.env_dir)]
                if self._logged(argv) != 0:
                    raise self._failed(
                        f"Python could not create a virtual environment in {py.env_dir}", "Python"
                    )
                self.step(f"Python: {py.python} (a new virtual environment from {self.options.base_python}).")
                self._python_said = True
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
        self._live("Python: installing pip into the embedded Python (get-pip.py)")
        get_pip = py.env_dir / "get-pip.py"
        (self.fetch_url or _download_to)(GET_PIP_URL, get_pip)
        if self._logged([py.python, str(get_pip), "--no-warn-script-location"]) != 0:
            raise self._failed("get-pip.py could not install pip into the embedded Python", "get-pip.py")
        self.step(f"Python: {py.python} (embedded; pip installed).")
        self._python_said = True

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
        if plan.torch is not None:
            where = f"{torch.tag or 'default'} build from {torch.host or 'PyPI'}"
            self.step(f"torch: the {where} ({torch.reason}).")
        else:
            self.step("torch: the build in place is the one wanted.")
        flags = self._pip_progress_flags(py)
        planned = ([plan.torch] if plan.torch else []) + plan.others
        watcher = PipWatcher([r.name for r in planned], self.bar)
        for command, reqs in zip(pip_commands(py.python, plan, torch), _command_groups(plan), strict=True):
            command = command[:6] + flags + command[6:]
            if self._logged(command, watcher.feed) != 0:
                raise self._failed(
                    f"pip could not install {', '.join(r.spec for r in reqs)}",
                    "pip",
                    "; the packages already there were kept",
                )
        self.step(watcher.summary())

    def _pip_progress_flags(self, py: PythonChoice) -> list[str]:
        """`--progress-bar raw` (byte counts for the bar) where this pip has it (24.1+), else `off`."""
        done = self.runner.run([py.python, "-m", "pip", "install", "--help"], capture=True)
        choice = progress_bar_choice(done.stdout or "") if done.returncode == 0 else None
        return ["--progress-bar", choice] if choice else []

    def _logged(
        self, argv: list[str], on_line: Callable[[str], None] | None = None, cwd: Path | None = None
    ) -> int:
        """Runs argv with its output going to the log (and to on_line), not to the terminal."""
        self.log.begin(argv)

        def take(line: str) -> None:
            self.log.line(line)
            if on_line is not None:
                on_line(line)

        try:
            code = self.runner.stream(argv, take, cwd)
        except BaseException:
            self.log.close()
            raise
        self.log.end(code)
        return code

    def _failed(self, what: str, who: str, after: str = "") -> BootstrapError:
        """The lines that matter of the command that just failed, then one sentence naming the log."""
        self.bar.clear()
        lines = lines_that_matter(list(self.log.tail))
        if lines:
            self.say(f"What {who} said last:")
            for line in lines:  # pip draws boxes (×, ╰─>) that a redirected Windows stdout cannot encode
                self.say("  " + _encodable(printable(line)))
        shown = f"what {who} said last is above, " if lines else ""
        return BootstrapError(f"{what} ({shown}{self.log.where()}){after}.")

    def _prove(self, py: PythonChoice, device: str, torch: TorchChoice) -> tuple[str, bool]:
        done = self.runner.run([py.python, "-c", PROBE_CODE], capture=True)
        self.log.begin([py.python, "-c", "<the GPU probe>"])
        for line in (done.stdout or "").splitlines() + (done.stderr or "").splitlines():
            self.log.line(line)
        self.log.end(done.returncode)
        if done.returncode != 0:
            raise self._failed(f"torch does not import in {py.env_dir}", "Python")
        probe = TorchProbe(**json.loads(done.stdout.strip().splitlines()[-1]))
        selftest_device, verdict = gpu_verdict(probe, self.gpu, device, torch)
        if device == "gpu" and torch.variant == "cuda" and selftest_device != "cuda":
            raise BootstrapError(verdict)  # an NVIDIA GPU that torch cannot use: the sentence says the fix
        self.step(verdict)
        if not self.options.selftest:
            return verdict, False
        self._live(f"Selftest: a tiny model end to end on {selftest_device}")
        start = time.monotonic()
        argv = [py.python, "-m", "engine", "selftest", "--device", selftest_device]
        if self._logged(argv, cwd=self.options.root) != 0:
            raise self._failed(f"The engine's selftest failed on {selftest_device}", "the selftest")
        self.step(f"Selftest: passed on {selftest_device} in {human_duration(time.monotonic() - start)}.")
        return verdict, True

    def _read_stamp(self, py: PythonChoice) -> dict:
        try:
            return json.loads((py.env_dir / STAMP_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def _write_stamp(self, py: PythonChoice, data: dict) -> None:
        (py.env_dir / STAMP_NAME).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _encodable(text: str) -> str:
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        return text.encode(encoding, "replace").decode(encoding)
    except LookupError:
        return text


def _command_groups(plan: InstallPlan) -> list[list[Requirement]]:
    """The requirements of each of pip_commands' commands, in the same order."""
    groups = [[plan.torch]] if plan.torch is not None else []
    return groups + ([plan.others] if plan.others else [])


def describe_plan(
    py: PythonChoice,
    torch: TorchChoice,
    gpu: GpuInfo | None,
    plan: InstallPlan,
    exists: bool,
    options: EnvOptions,
) -> list[str]:
    """The dry run's lines: interpreter, GPU, torch build and index, what pip would install, the proof."""
    where = (
        "exists"
        if exists
        else (f"to be created from {options.base_python}" if py.venv else "from the bundle")
    )
    if gpu is None:
        card = "none found (nvidia-smi did not answer)" if options.device != "cpu" else "not asked (--cpu)"
    else:
        card = (
            f"{gpu.name}, {gpu.vram_gb:.0f} GB, compute capability {gpu.compute_text}, driver "
            f"{gpu.driver or 'unknown'} (CUDA {_dotted(gpu.cuda)})"
        )
    lines = [
        "Plan (--dry-run: nothing is changed):",
        f"  interpreter: {py.python} ({py.kind}, {where})",
        f"  GPU: {card}",
        f"  torch build: {torch.tag or 'default'} from {torch.index_url or 'PyPI'}",
        f"  why: {torch.reason}",
    ]
    commands = pip_commands(py.python, plan, torch)
    if not commands:
        lines.append("  install: nothing, every pinned package is there")
    for command in commands:
        lines.append("  install: " + " ".join(command[6:]))
    if options.selftest:
        lines.append(
            f"  then: {py.python} -m engine selftest --device {'cuda' if torch.variant == 'cuda' else 'cpu'}"
        )
    return lines


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


TARGETS = {"windows": Platform("Windows", "AMD64"), "linux": Platform("Linux", "x86_64")}


def build_environment(options: EnvOptions, dry_run: bool = False, target: str | None = None) -> int:
    here = Platform.current()
    plat = TARGETS[target] if target else here
    gpu = detect_gpu() if options.device != "cpu" else None
    builder = EnvironmentBuilder(options, plat, gpu)
    if dry_run:
        return builder.dry_run(local=plat.system == here.system)
    return builder.build()
