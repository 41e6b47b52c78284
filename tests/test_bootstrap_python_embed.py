"""`python -m bootstrap bundle` fetches the pinned Windows embeddable Python through the verified downloader
(here from the local fake hub); --python-embed stays an override."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import py7zr
import pytest

from bootstrap import cli, python_embed
from bootstrap.download import Downloader, DownloadOptions
from bootstrap.errors import BootstrapError
from tests.bootstrap_hubserver import FakeHub, HubFile

ZIP_NAME = "python-3.12.10-embed-amd64.zip"


def embed_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:  # fixed dates: the same bytes on every call
        for name, data in (
            ("python.exe", b"MZ"),
            ("python312.dll", b"MZ"),
            ("python312._pth", b"python312.zip\n.\n"),
        ):
            archive.writestr(zipfile.ZipInfo(name, date_time=(2025, 4, 8, 0, 0, 0)), data)
    return buffer.getvalue()


@pytest.fixture
def served():
    with FakeHub() as hub:
        hub_file = hub.add(HubFile("python/embed", ZIP_NAME, embed_zip()))
        url = f"{hub.endpoint}/python/embed/resolve/main/{ZIP_NAME}"
        yield hub, python_embed.EmbedPin("3.12.10", url, hub_file.sha256)


def test_the_manifest_pins_a_published_zip():
    pin = python_embed.load_pin()
    assert pin.version == "3.12.10" and pin.filename == ZIP_NAME
    assert pin.url == f"https://www.python.org/ftp/python/3.12.10/{ZIP_NAME}"
    assert pin.sha256 == "4acbed6dd1c744b0376e3b1cf57ce906f9dc9e95e68824584c8099a63025a3c3"


def test_bundle_downloads_verifies_and_includes_the_pinned_python(served, tmp_path, monkeypatch, capsys):
    hub, pin = served
    monkeypatch.setattr(python_embed, "load_pin", lambda manifest=None: pin)
    out = tmp_path / "dist"
    assert cli.main(["bundle", "--out", str(out)]) == 0
    archive = Path(capsys.readouterr().out.strip().splitlines()[-1])
    with py7zr.SevenZipFile(archive) as z:
        names = z.getnames()
    assert "fluxdeck/python_embeded/python.exe" in names and "fluxdeck/python_embeded/python312._pth" in names
    assert (out / "downloads" / python_embed.CACHE_FOLDER / ZIP_NAME).read_bytes() == embed_zip()
    # a second bundle takes the verified copy: the server is not asked again
    asked = len(hub.requests("hub"))
    assert cli.main(["bundle", "--out", str(out)]) == 0
    assert len(hub.requests("hub")) == asked


def test_a_zip_that_does_not_match_the_pin_never_lands(served, tmp_path):
    hub, pin = served
    wrong = python_embed.EmbedPin(pin.version, pin.url, "0" * 64)
    options = DownloadOptions(endpoint=hub.endpoint, token=None, backoff_s=0.01, retries=1)
    with pytest.raises(BootstrapError):
        python_embed.fetch(wrong, tmp_path, Downloader(tmp_path, options, sleep=lambda s: None))
    assert not (tmp_path / python_embed.CACHE_FOLDER / ZIP_NAME).exists()


def test_python_embed_stays_an_override_and_nothing_is_downloaded(tmp_path, monkeypatch, capsys):
    def no_download(*args, **kwargs):
        raise AssertionError("downloaded although --python-embed was given")

    monkeypatch.setattr(python_embed, "fetch", no_download)
    folder = tmp_path / "embed"
    folder.mkdir()
    (folder / "python.exe").write_bytes(b"MZ")
    assert cli.main(["bundle", "--out", str(tmp_path / "dist"), "--python-embed", str(folder)]) == 0


def test_a_manifest_without_the_pin_is_one_sentence(tmp_path):
    manifest = tmp_path / "manifest.toml"
    manifest.write_text('[python_embed]\nversion = "3.12.10"\n')
    with pytest.raises(BootstrapError, match=r"no \[python_embed\] url: give --python-embed instead"):
        python_embed.load_pin(manifest)
