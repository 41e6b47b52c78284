"""The wizard: recommendations per machine, reuse of ComfyUI/Forge folders, the token only when needed, config.toml."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bootstrap import wizard
from bootstrap.errors import BootstrapError
from bootstrap.hardware import GpuInfo, SystemInfo
from bootstrap.manifest import load_manifest
from bootstrap.reuse import classify, find_existing
from tests.bootstrap_hubserver import FakeHub, HubFile

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

MANIFEST = load_manifest()


def NOT_MEASURED(say):  # noqa: N802 - the wizard's speed source: no figures, so no file is written
    return None


def machine(vram_gb: float | None, ram_gb: float, disk_gb: float = 500) -> SystemInfo:
    gpu = GpuInfo("RTX", int(vram_gb * 1024)) if vram_gb is not None else None
    return SystemInfo(gpu, ram_gb, disk_gb)


def make_comfyui(root: Path, files: dict[str, bytes]) -> Path:
    models = root / "ComfyUI" / "models"
    for sub in ("checkpoints", "unet", "clip", "vae", "loras"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (models / rel).write_bytes(data)
    return models


def test_comfyui_and_forge_folders_are_recognised(tmp_path):
    comfy = make_comfyui(tmp_path / "c", {"clip/clip_l.safetensors": b"x" * 10})
    forge = tmp_path / "forge" / "webui" / "models"
    for sub in ("Stable-diffusion", "VAE", "text_encoder", "Lora"):
        (forge / sub).mkdir(parents=True)
    assert classify(tmp_path / "c").kind == "ComfyUI" and classify(tmp_path / "c").path == comfy.resolve()
    assert classify(tmp_path / "forge").kind == "Forge"
    assert classify(tmp_path) is None
    found = find_existing([tmp_path / "c", tmp_path / "forge", tmp_path / "nothing"])
    assert [f.kind for f in found] == ["ComfyUI", "Forge"]
    assert found[1].config_folders()["vae"] == [str((forge / "VAE").resolve())]
    clip = MANIFEST.files["clip_l"]
    assert found[0].find(clip) is None  # same name, wrong size: not the manifest's file


class ScriptedIO:
    def __init__(self, answers: list[str], token: str | None = None) -> None:
        self.answers = answers
        self.token = token
        self.lines: list[str] = []
        self.questions: list[str] = []

    def say(self, text: str) -> None:
        self.lines.append(text)

    def ask(self, question: str, default: str = "") -> str:
        self.questions.append(question)
        return self.answers.pop(0) or default

    def secret(self, question: str) -> str:
        if self.token is None:
            raise AssertionError("the wizard asked for a token although no gated file was chosen")
        self.questions.append(question)
        return self.token


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        monkeypatch.delenv("HF_TOKEN_PATH", raising=False)
        yield hub


def small_manifest(tmp_path: Path, hub: FakeHub) -> Path:
    clip = hub.add(HubFile("enc/clip", "clip_l.safetensors", b"c" * 5000))
    dev = hub.add(HubFile("bfl/dev", "flux1-dev.safetensors", b"d" * 7000, gated=True))
    schnell = hub.add(HubFile("org/schnell", "flux1-schnell.safetensors", b"s" * 6000))
    text = ""
    for name, f, folder in (
        ("clip_l", clip, "text_encoders"),
        ("flux1-dev", dev, "diffusion_models"),
        ("flux1-schnell", schnell, "checkpoints"),
    ):
        text += (
            f'[[file]]\nname = "{name}"\nrepo = "{f.repo}"\npath = "{f.path}"\nsize = {len(f.data)}\n'
            f'sha256 = "{f.sha256}"\nfolder = "{folder}"\ngated = {str(f.gated).lower()}\n\n'
        )
    text += (
        '[[preset]]\nname = "schnell"\ntitle = "[schnell] all-in-one"\nfiles = ["flux1-schnell"]\n'
        "disk_gb = 0.1\nrank = 2\nsteps = 4\n\n"
        '[[preset]]\nname = "dev"\ntitle = "[dev] split"\nfiles = ["flux1-dev", "clip_l"]\n'
        "disk_gb = 0.1\nrank = 1\nsteps = 28\n"
    )
    path = tmp_path / "manifest.toml"
    path.write_text(text)
    return path


def test_wizard_reuses_comfyui_asks_for_the_token_and_writes_the_config(tmp_path, fake_hub):
    manifest = small_manifest(tmp_path, fake_hub)
    comfy = make_comfyui(tmp_path / "apps", {"clip/clip_l.safetensors": b"c" * 5000})
    config = tmp_path / "config.toml"
    config.write_text('output_dir = "pictures"\n[keys]\ngenerate = "ctrl+g"\n')
    io = ScriptedIO(
        ["1", "", "n", "y"], token=fake_hub.token
    )  # reuse #1, the recommended preset, don't save, go
    rc = wizard.run_wizard(
        io,
        models_dir=tmp_path / "models",
        manifest_path=manifest,
        config_path=config,
        detect=lambda path: machine(12, 32),
        places=[tmp_path / "apps"],
        speed=NOT_MEASURED,
    )
    assert rc == 0, io.lines
    assert any("dev (recommended)" in line for line in io.lines)
    assert any(
        f"clip_l: reusing {comfy.resolve() / 'clip' / 'clip_l.safetensors'}" == line for line in io.lines
    )
    assert (tmp_path / "models" / "diffusion_models" / "flux1-dev.safetensors").read_bytes() == b"d" * 7000
    assert not (tmp_path / "models" / "text_encoders").exists()  # reused, not copied
    assert fake_hub.requests("hub")[0].headers["Authorization"] == f"Bearer {fake_hub.token}"
    saved = tomllib.loads(config.read_text())
    assert saved["models_dir"] == "models" and saved["extra_model_paths"] == [str(comfy.resolve())]
    assert saved["device"] == "cuda" and saved["preset"] == "dev"
    assert saved["output_dir"] == "pictures" and saved["keys"] == {"generate": "ctrl+g"}  # other keys survive
    assert not (tmp_path / "hf" / "token").exists()


def test_no_token_is_asked_for_an_ungated_preset(tmp_path, fake_hub):
    manifest = small_manifest(tmp_path, fake_hub)
    io = ScriptedIO(["", "schnell", "y"], token=None)  # no folder to reuse, pick by name
    rc = wizard.run_wizard(
        io,
        models_dir=tmp_path / "models",
        manifest_path=manifest,
        config_path=tmp_path / "config.toml",
        detect=lambda path: machine(None, 32),
        places=[],
        speed=NOT_MEASURED,
    )
    assert rc == 0
    assert (tmp_path / "models" / "checkpoints" / "flux1-schnell.safetensors").is_file()
    assert tomllib.loads((tmp_path / "config.toml").read_text())["device"] == "cpu"


def test_gated_choice_without_a_token_stops_before_any_download(tmp_path, fake_hub):
    manifest = small_manifest(tmp_path, fake_hub)
    io = ScriptedIO(["", "dev"], token="")
    with pytest.raises(BootstrapError, match="No token was given"):
        wizard.run_wizard(
            io,
            tmp_path / "models",
            manifest,
            tmp_path / "config.toml",
            detect=lambda p: machine(12, 32),
            places=[],
            speed=NOT_MEASURED,
        )
    assert any(f"{fake_hub.endpoint}/bfl/dev" in line and "accept the licence" in line for line in io.lines)
    assert fake_hub.log == [] and not (tmp_path / "models").exists()


def test_a_reused_forge_folder_is_a_model_path_for_the_engine_and_the_tui(tmp_path):
    forge = tmp_path / "forge" / "webui" / "models"
    for sub in ("Stable-diffusion", "VAE", "text_encoder"):
        (forge / sub).mkdir(parents=True)
    reuse = classify(tmp_path / "forge")
    preset = next(iter(MANIFEST.presets.values()))
    values = wizard.config_values(tmp_path / "models", reuse, machine(8, 32), preset, tmp_path)
    assert values["extra_model_paths"] == [str(reuse.path)]
    assert values["extra_model_folders"]["vae"] == [str((forge / "VAE").resolve())]


@pytest.mark.skipif(os.name == "nt", reason="POSIX modes; on Windows the file takes its folder's access list")
def test_the_saved_token_is_private_and_written_whole(tmp_path, fake_hub):
    manifest = small_manifest(tmp_path, fake_hub)
    token_path = tmp_path / "hf" / "token"
    old_umask = os.umask(0o022)
    try:
        io = ScriptedIO(["", "dev", "y", "y"], token=fake_hub.token)  # no reuse, dev (gated), save, download
        rc = wizard.run_wizard(
            io,
            tmp_path / "models",
            manifest,
            tmp_path / "config.toml",
            detect=lambda p: machine(12, 32),
            places=[],
            speed=NOT_MEASURED,
        )
    finally:
        os.umask(old_umask)
    assert rc == 0, io.lines
    assert token_path.read_text() == f"{fake_hub.token}\n"
    assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
    assert sorted(p.name for p in token_path.parent.iterdir()) == ["token"]  # no temporary file left
    token_path.chmod(0o644)  # a world-readable file from before is replaced by a private one
    wizard.save_token(token_path, "hf_other")
    assert stat.S_IMODE(token_path.stat().st_mode) == 0o600 and token_path.read_text() == "hf_other\n"


def test_a_token_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    token_path = tmp_path / "hf" / "token"
    token_path.parent.mkdir()
    token_path.write_text("hf_old\n")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(BootstrapError, match="Could not save the token .*No space left.*set HF_TOKEN"):
        wizard.save_token(token_path, "hf_new")
    assert token_path.read_text() == "hf_old\n"
    assert [p.name for p in token_path.parent.iterdir()] == ["token"]
