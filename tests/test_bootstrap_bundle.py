"""The portable 7z: what goes in (code, launchers, embeddable Python) and what never does; it runs once unpacked."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import py7zr
import pytest

from bootstrap.bundle import BundleOptions, build_bundle
from bootstrap.cli import main
from bootstrap.errors import BootstrapError

ROOT = Path(__file__).resolve().parent.parent


def write(path: Path, text: str = "x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fake_project(root: Path) -> Path:
    write(root / "pyproject.toml", '[project]\nname = "fluxdeck"\n')
    for name in ("README.md", "run_gpu.bat", "run_cpu.bat", "run_gpu.sh", "requirements.txt"):
        write(root / name)
    write(root / "bootstrap" / "manifest.toml")
    write(root / "bootstrap" / "cli.py")
    write(root / "engine" / "cli.py")
    write(root / "launcher" / "app.py")
    # none of these belong in a bundle
    write(root / "engine" / "__pycache__" / "cli.cpython-311.pyc")
    write(root / "models" / "checkpoints" / "flux1-schnell-fp8.safetensors")
    write(root / "models" / "vae" / "ae.safetensors.part")
    write(root / ".venv" / "bin" / "python")
    write(root / "outputs" / "x.png")
    write(root / "dist" / "old-windows-portable.7z")
    write(root / "config.toml")
    write(root / "tests" / "test_x.py")
    write(root / ".git" / "HEAD")
    return root


def official_embed_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("python.exe", b"MZ")
        archive.writestr("python311.dll", b"MZ")
        archive.writestr("python311.zip", b"PK")
        archive.writestr(
            "python311._pth",
            "python311.zip\n.\n\n# Uncomment to run site.main() automatically\n#import site\n",
        )
        archive.writestr("Lib/site-packages/torch/__init__.py", "")
    return path


def test_bundle_holds_code_launchers_and_python_but_no_models_venv_or_caches(tmp_path):
    root = fake_project(tmp_path / "project")
    embed = official_embed_zip(tmp_path / "python-3.11.9-embed-amd64.zip")
    archive = build_bundle(BundleOptions(root=root, out_dir=tmp_path / "out", python_embed=embed))
    assert archive == tmp_path / "out" / "fluxdeck-windows-portable.7z"
    with py7zr.SevenZipFile(archive) as z:
        names = set(z.getnames())
    with py7zr.SevenZipFile(archive) as z:
        z.extractall(tmp_path / "unpacked")
    pth = (tmp_path / "unpacked" / "fluxdeck" / "python_embeded" / "python311._pth").read_bytes()
    assert {
        "fluxdeck/README.md",
        "fluxdeck/run_gpu.bat",
        "fluxdeck/requirements.txt",
        "fluxdeck/bootstrap/manifest.toml",
        "fluxdeck/engine/cli.py",
        "fluxdeck/launcher/app.py",
        "fluxdeck/python_embeded/python.exe",
    } <= names
    for unwanted in (
        "models",
        ".venv",
        "__pycache__",
        "outputs",
        "dist",
        "config.toml",
        "tests",
        ".git",
        "site-packages",
        ".part",
    ):
        assert not any(unwanted in name for name in names), unwanted
    assert pth.decode().splitlines()[-2:] == ["..", "import site"]


def test_bundle_refuses_a_wrong_python(tmp_path):
    root = fake_project(tmp_path / "project")
    with pytest.raises(BootstrapError, match="no python.exe"):
        build_bundle(BundleOptions(root=root, out_dir=tmp_path, python_embed=tmp_path / "project" / "engine"))


def test_bundle_unpacks_and_generates_an_image(tmp_path, capsys):
    fixtures = pytest.importorskip("engine.fixtures", reason="engine.fixtures is not written yet")
    assert main(["bundle", "--out", str(tmp_path / "dist"), "--no-python-embed"]) == 0
    archive = Path(capsys.readouterr().out.strip())
    assert archive == tmp_path / "dist" / "fluxdeck-windows-portable.7z"
    with py7zr.SevenZipFile(archive) as z:
        z.extractall(tmp_path / "fresh")
    app = tmp_path / "fresh" / "fluxdeck"
    models = tmp_path / "models"
    fixtures.write_tiny_model_set(models)
    out = tmp_path / "cat.png"
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run(
        [sys.executable, "-c", "import engine; print(engine.__file__)"],
        cwd=app,
        env=environ,
        capture_output=True,
        text=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(app), (
        "the engine was not imported from the unpacked bundle"
    )
    done = subprocess.run(
        [sys.executable, "-m", "engine", "generate", "--prompt", "a cat", "--models-dir", str(models)]
        + ["--width", "64", "--height", "64", "--steps", "2", "--out", str(out)],
        cwd=app,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- nothing bad gets through (issue 10) ----


def test_secrets_and_environments_inside_code_folders_are_not_packed(tmp_path):
    root = fake_project(tmp_path / "project")
    for secret in (
        "engine/.env",
        "launcher/hf_token",
        "docs/.env.local",
        "bootstrap/token",
        "engine/.venv/bin/python",
        "launcher/venv/lib/x.py",
        "engine/cache/embeddings.bin",
        "bootstrap/.cache/huggingface/token",
        "engine/models/vae/ae.safetensors",
    ):
        write(root / secret, "hf_secret")
    write(root / "launcher" / "screens" / "gallery.py")  # code in subfolders stays
    write(root / "engine" / "generation" / "models" / "__init__.py")  # a package named like a data folder
    write(root / "engine" / "generation" / "models" / "flux.py")
    write(root / "engine" / "generation" / "models" / "stray.safetensors")  # weights never ship
    archive = build_bundle(BundleOptions(root=root, out_dir=tmp_path / "out"))
    with py7zr.SevenZipFile(archive) as z:
        names = set(z.getnames())
    assert "fluxdeck/launcher/screens/gallery.py" in names
    assert "fluxdeck/engine/generation/models/flux.py" in names
    names -= {"fluxdeck/engine/generation/models", "fluxdeck/engine/generation/models/__init__.py"}
    names.discard("fluxdeck/engine/generation/models/flux.py")
    leaked = [n for n in names if any(s in n for s in (".env", "token", "venv", "cache", "models"))]
    assert leaked == []


def test_a_code_package_named_models_is_packed_but_no_weights_in_it(tmp_path):
    """engine/models/ is the engine's model code (a package); weights dropped into it stay out."""
    root = fake_project(tmp_path / "project")
    for name in ("engine/models/__init__.py", "engine/models/flux1.py", "engine/models/vae/ae.safetensors",
                 "engine/models/flux1-dev.gguf", "launcher/models/x.safetensors", "launcher/models/notes.txt"):  # fmt: skip
        write(root / name)
    archive = build_bundle(BundleOptions(root=root, out_dir=tmp_path / "out"))
    with py7zr.SevenZipFile(archive) as z:
        packed = sorted(n for n in z.getnames() if "/models/" in n)
    assert packed == ["fluxdeck/engine/models/__init__.py", "fluxdeck/engine/models/flux1.py"]


def test_a_symlinked_file_is_stored_as_the_file_and_a_link_out_is_refused(tmp_path):
    root = fake_project(tmp_path / "project")
    write(root / "engine" / "real.py", "print('real')\n")
    (root / "launcher" / "linked.py").symlink_to(root / "engine" / "real.py")
    archive = build_bundle(BundleOptions(root=root, out_dir=tmp_path / "out"))
    with py7zr.SevenZipFile(archive) as z:
        z.extractall(tmp_path / "unpacked")
    linked = tmp_path / "unpacked" / "fluxdeck" / "launcher" / "linked.py"
    assert not linked.is_symlink() and linked.read_text() == "print('real')\n"
    write(tmp_path / "private" / "id.txt", "secret")
    (root / "engine" / "out.py").symlink_to(tmp_path / "private" / "id.txt")
    with pytest.raises(BootstrapError, match="is a link to .* outside"):
        build_bundle(BundleOptions(root=root, out_dir=tmp_path / "out2"))
    assert not (tmp_path / "out2" / "fluxdeck-windows-portable.7z").exists()


@pytest.mark.parametrize(
    "member",
    [
        "../evil.exe",
        "Lib/../../evil.exe",
        "/etc/evil",
        "..\\evil.exe",
        "C:\\Windows\\evil.dll",
        "C:evil",
        "nul.txt",
    ],
)
def test_zip_members_that_would_unpack_elsewhere_are_refused(tmp_path, member):
    root = fake_project(tmp_path / "project")
    embed = official_embed_zip(tmp_path / "python-embed.zip")
    with zipfile.ZipFile(embed, "a") as archive:
        archive.writestr(zipfile.ZipInfo(member), b"MZ")
    with pytest.raises(BootstrapError, match="not a safe relative path.*The bundle is not written") as err:
        build_bundle(BundleOptions(root=root, out_dir=tmp_path / "out", python_embed=embed))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / "fluxdeck-windows-portable.7z").exists()
