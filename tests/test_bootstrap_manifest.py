"""The shipped manifest: the DESIGN.md schema, real figures only, presets that add up."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bootstrap.errors import BootstrapError
from bootstrap.hub import file_url, find_token, origin, same_origin
from bootstrap.manifest import FOLDERS, load_manifest, parse_manifest

MANIFEST = load_manifest()
REFERENCE = Path("/work/shared/reference/models.md")


def test_every_file_follows_the_schema():
    for f in MANIFEST.files.values():
        assert f.folder in FOLDERS and "/" in f.repo and f.revision
        assert f.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", f.sha256)
        assert (f.size is None) == (f.sha256 is None) or f.folder.startswith("tokenizers")


def test_presets_name_real_files_and_their_disk_need_adds_up():
    for preset in MANIFEST.presets.values():
        files = MANIFEST.preset_files(preset.name)
        known = sum(f.size or 0 for f in files) / 1e9
        assert known <= preset.disk_gb < known + 12.5, (
            preset.name
        )  # the slack is an unpublished ~11.9 GB file
        if preset.name != "tokenizers":
            assert {"tokenizers/clip_l", "tokenizers/t5xxl"} <= {f.folder for f in files}
    assert not any(f.gated for f in MANIFEST.preset_files("schnell-fp8"))
    assert any(f.gated for f in MANIFEST.preset_files("dev-full"))


@pytest.mark.skipif(not REFERENCE.is_file(), reason="the shared reference is not on this machine")
def test_figures_match_the_reference_table():
    table = REFERENCE.read_text()
    for f in MANIFEST.files.values():
        if f.sha256:
            rows = [line.split("|") for line in table.splitlines() if f.sha256 in line]
            match = [
                r
                for r in rows
                if r[2].strip() == f.repo and r[3].strip() == f.path and r[4].strip() == str(f.size)
            ]
            assert len(match) == 1, f.name
            assert match[0][6].strip().startswith("yes") == f.gated, f.name


def test_bad_manifests_are_one_sentence():
    with pytest.raises(BootstrapError, match="not 64 hex digits"):
        parse_manifest('[[file]]\nname="a"\nrepo="r/a"\npath="a"\nfolder="vae"\nsha256="abc"\n')
    with pytest.raises(BootstrapError, match="not one of"):
        parse_manifest('[[file]]\nname="a"\nrepo="r/a"\npath="a"\nfolder="Stable-diffusion"\n')
    with pytest.raises(BootstrapError, match="Unknown file 'b'"):
        parse_manifest(
            '[[file]]\nname="a"\nrepo="r/a"\npath="a"\nfolder="vae"\n[[preset]]\nname="p"\nfiles=["b"]\n'
        )
    with pytest.raises(BootstrapError, match="Unknown preset 'x': choose one of"):
        MANIFEST.select([], ["x"])


def test_file_urls_and_hosts():
    ae = MANIFEST.files["ae"]
    assert file_url("https://huggingface.co", ae) == (
        "https://huggingface.co/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors"
    )
    assert ae.target(Path("m")) == Path("m/vae/ae.safetensors")
    assert origin("https://huggingface.co/x") == ("https", "huggingface.co", 443)
    assert same_origin("https://huggingface.co/a", "https://HUGGINGFACE.co:443/b")
    assert not same_origin("https://huggingface.co/a", "https://cdn-lfs.huggingface.co/b")
    assert not same_origin("http://127.0.0.1:8000/a", "http://127.0.0.1:8001/a")


def test_token_lookup_order(tmp_path):
    home = tmp_path / "home"
    (home / ".cache" / "huggingface").mkdir(parents=True)
    (home / ".cache" / "huggingface" / "token").write_text("from-default-file\n")
    (tmp_path / "hfhome").mkdir()
    (tmp_path / "hfhome" / "token").write_text("from-hf-home")
    (tmp_path / "explicit").write_text("from-token-path")
    env = {
        "HF_TOKEN": "a",
        "HUGGING_FACE_HUB_TOKEN": "b",
        "HF_TOKEN_PATH": str(tmp_path / "explicit"),
        "HF_HOME": str(tmp_path / "hfhome"),
    }
    assert find_token(env, home) == "a"
    del env["HF_TOKEN"]
    assert find_token(env, home) == "b"
    del env["HUGGING_FACE_HUB_TOKEN"]
    assert find_token(env, home) == "from-token-path"
    del env["HF_TOKEN_PATH"]
    assert find_token(env, home) == "from-hf-home"
    del env["HF_HOME"]
    assert find_token(env, home) == "from-default-file"
    assert find_token({}, tmp_path / "nobody") is None
