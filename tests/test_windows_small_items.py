"""Smaller Windows items: a hand-written Windows path in config.toml, an unwritable folder, the token advice, the
RAM figure for VAE tiling on every OS. Each refusal is one sentence, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bootstrap import cli
from bootstrap.config_file import ProjectConfig
from bootstrap.errors import BootstrapError
from bootstrap.hub import hub_error
from bootstrap.manifest import ModelFile

ROOT = Path(__file__).resolve().parent.parent
HAND_WRITTEN = 'models_dir = "D:\\ComfyUI\\models"\n'  # what a Windows user types: \C is no TOML escape


def test_a_windows_path_in_double_quotes_is_one_sentence_for_the_bootstrap(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(HAND_WRITTEN, encoding="utf-8")
    with pytest.raises(BootstrapError) as caught:
        ProjectConfig.load(config)
    text = str(caught.value)
    assert "single quotes" in text and "D:/ComfyUI/models" in text and "\n" not in text


def test_a_windows_path_in_double_quotes_is_one_sentence_for_the_tui(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(HAND_WRITTEN, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "launcher", "--check-models", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and "single quotes" in line


def test_a_folder_that_cannot_be_written_is_one_sentence(monkeypatch, capsys):
    def refuse(args):
        raise PermissionError(13, "Permission denied", r"C:\Program Files\FluxDeck\models\vae")

    monkeypatch.setitem(cli.COMMANDS, "list", refuse)
    assert cli.main(["list"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert r"C:\Program Files\FluxDeck\models\vae cannot be written" in line and "C:\\FluxDeck" in line


def test_token_advice_works_for_a_double_clicked_bat():
    gated = ModelFile(
        "flux1-dev", "black-forest-labs/FLUX.1-dev", "flux1-dev.safetensors", "diffusion_models", gated=True
    )
    text = str(hub_error(401, {"X-Error-Code": "GatedRepo"}, gated, "https://huggingface.co", False))
    assert "setx HF_TOKEN" in text and "new window" in text and "set HF_TOKEN=" not in text


def test_vae_tiling_reads_available_ram_through_psutil(monkeypatch):
    import psutil

    from engine.generation import vae_tiling

    class Memory:
        available = 123_456_789

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory())
    assert vae_tiling.free_bytes("cpu") == 123_456_789
    assert "/proc/meminfo" not in Path(vae_tiling.__file__).read_text()


def test_readme_says_how_to_extract_the_7z():
    readme = (ROOT / "README.md").read_text()
    assert "7-Zip" in readme and "C:\\FluxDeck" in readme and "unzip" not in readme.lower()
