"""The downloader against a loopback hub: redirects, resume, hashing, gating, the token, retries, skipping."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bootstrap import verified
from bootstrap.download import Downloader, DownloadOptions
from bootstrap.errors import BootstrapError
from bootstrap.manifest import ModelFile
from tests.bootstrap_hubserver import FakeHub, HubFile

ROOT = Path(__file__).resolve().parent.parent
SIZE = 300_000
CHUNK = 64 * 1024


def payload(size: int = SIZE, seed: int = 1) -> bytes:
    out, block = bytearray(), hashlib.sha256(str(seed).encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])


@pytest.fixture
def hub():
    with FakeHub() as server:
        yield server


def model_file(hub_file: HubFile, name: str = "ae", folder: str = "vae", with_hash: bool = True) -> ModelFile:
    return ModelFile(
        name=name,
        repo=hub_file.repo,
        path=hub_file.path,
        folder=folder,
        size=len(hub_file.data) if with_hash else None,
        sha256=hub_file.sha256 if with_hash else None,
        gated=hub_file.gated,
    )


def downloader(
    hub: FakeHub, models: Path, token: str | None = None, **kw
) -> tuple[Downloader, list[float], list[str]]:
    sleeps: list[float] = []
    said: list[str] = []
    options = DownloadOptions(
        endpoint=hub.endpoint, token=token, backoff_s=0.01, chunk_bytes=CHUNK, retries=3
    )
    for key, value in kw.items():
        setattr(options, key, value)
    return Downloader(models, options, sleep=sleeps.append, say=said.append), sleeps, said


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_download_follows_the_302_and_lands_verified(hub, tmp_path):
    f = hub.add(HubFile("Comfy-Org/Lumina", "split_files/vae/ae.safetensors", payload()))
    d, _, _ = downloader(hub, tmp_path / "models")
    out = d.fetch(model_file(f))
    target = tmp_path / "models" / "vae" / "ae.safetensors"
    assert out.status == "downloaded" and out.path == target
    assert target.read_bytes() == f.data
    assert not target.with_name("ae.safetensors.part").exists()
    assert [s.status for s in hub.requests("hub")] == [302]
    assert [s.status for s in hub.requests("cdn")] == [200]
    assert verified.VerifiedState.load(tmp_path / "models").files["vae/ae.safetensors"].sha256 == f.sha256


def test_dropped_connection_resumes_with_a_range_request(hub, tmp_path):
    f = hub.add(HubFile("r/a", "ae.safetensors", payload(), drop_after=150_000, drops=2))
    d, sleeps, _ = downloader(hub, tmp_path)
    d.fetch(model_file(f))
    assert (tmp_path / "vae" / "ae.safetensors").read_bytes() == f.data
    cdn = hub.requests("cdn")
    assert len(cdn) == 2 and "Range" not in cdn[0].headers
    # every byte that arrived before the drop is kept and not fetched again
    assert cdn[1].headers["Range"] == "bytes=150000-" and cdn[1].status == 206
    assert len(sleeps) == 1


def test_resume_after_the_process_is_killed(hub, tmp_path):
    data = payload(3 * 1024 * 1024 + 123)
    f = hub.add(HubFile("r/big", "model.safetensors", data, stall_after=2 * 1024 * 1024 + 5000))
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(
        f'[[file]]\nname = "big"\nrepo = "r/big"\npath = "model.safetensors"\nsize = {len(data)}\n'
        f'sha256 = "{f.sha256}"\nfolder = "checkpoints"\ngated = false\n'
    )
    models = tmp_path / "models"
    part = models / "checkpoints" / "model.safetensors.part"
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": ""}
    cmd = [
        sys.executable,
        "-m",
        "bootstrap",
        "download",
        "big",
        "--manifest",
        str(manifest),
        "--models-dir",
        str(models),
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not (
            part.exists() and part.stat().st_size >= 2 * 1024 * 1024 + 5000
        ):  # all sent before the stall
            assert proc.poll() is None and time.monotonic() < deadline, "the download never reached the stall"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    f.release.set()
    kept = part.stat().st_size
    assert kept == 2 * 1024 * 1024 + 5000 and not part.with_name("model.safetensors").exists()
    f.stall_after = None
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (models / "checkpoints" / "model.safetensors").read_bytes() == data
    assert hub.requests("cdn")[-1].headers["Range"] == f"bytes={kept}-"


@pytest.mark.parametrize("with_hash", [True, False], ids=["manifest-sha256", "hub-linked-etag"])
def test_corrupt_bytes_never_land(hub, tmp_path, with_hash):
    data = payload()
    bad = bytearray(data)
    bad[200_000] ^= 0xFF
    f = hub.add(HubFile("r/x", "ae.safetensors", data, serve=bytes(bad)))
    d, _, _ = downloader(hub, tmp_path)
    with pytest.raises(BootstrapError) as err:
        d.fetch(model_file(f, with_hash=with_hash))
    message = str(err.value)
    assert "ae" in message and f.sha256 in message and hashlib.sha256(bad).hexdigest() in message
    assert tree(tmp_path / "vae") == []  # neither the file nor its .part


def test_gated_without_a_token_explains_and_writes_nothing(hub, tmp_path):
    f = hub.add(HubFile("black-forest-labs/FLUX.1-dev", "flux1-dev.safetensors", payload(), gated=True))
    d, _, _ = downloader(hub, tmp_path / "models", token=None)
    with pytest.raises(BootstrapError) as err:
        d.fetch(model_file(f, name="flux1-dev", folder="diffusion_models"))
    message = str(err.value)
    assert f"{hub.endpoint}/black-forest-labs/FLUX.1-dev" in message  # where to accept the licence
    assert "accept the licence" in message and "HF_TOKEN" in message
    assert not (tmp_path / "models").exists()
    assert hub.requests("cdn") == []


def test_gated_with_a_token_that_was_not_granted(hub, tmp_path):
    f = hub.add(HubFile("black-forest-labs/FLUX.1-dev", "flux1-dev.safetensors", payload(), gated=True))
    d, _, _ = downloader(hub, tmp_path / "models", token="hf_someone_else")
    with pytest.raises(BootstrapError, match="not in the authorized list.*accept the licence"):
        d.fetch(model_file(f, name="flux1-dev", folder="diffusion_models"))
    assert not (tmp_path / "models").exists()


def test_token_reaches_the_hub_and_never_the_cdn(hub, tmp_path):
    f = hub.add(HubFile("black-forest-labs/FLUX.1-dev", "flux1-dev.safetensors", payload(), gated=True))
    d, _, _ = downloader(hub, tmp_path, token=hub.token)
    d.fetch(model_file(f, name="flux1-dev", folder="diffusion_models"))
    assert [s.headers.get("Authorization") for s in hub.requests("hub")] == [f"Bearer {hub.token}"]
    cdn = hub.requests("cdn")
    assert cdn and all("Authorization" not in s.headers for s in cdn)
    assert hub.cdn_base.split(":")[-1] != hub.endpoint.split(":")[-1]


def test_a_5xx_that_recovers_is_retried_with_backoff(hub, tmp_path):
    f = hub.add(HubFile("r/x", "ae.safetensors", payload(), fail_5xx=2))
    d, sleeps, said = downloader(hub, tmp_path)
    assert d.fetch(model_file(f)).status == "downloaded"
    assert [s.status for s in hub.requests("hub")] == [503, 503, 302]
    assert sleeps == [0.01, 0.02]
    assert "503" in said[0]


def test_a_5xx_that_persists_names_the_host(hub, tmp_path):
    f = hub.add(HubFile("r/x", "ae.safetensors", payload(), fail_5xx=100))
    d, _, _ = downloader(hub, tmp_path, retries=2)
    host = hub.endpoint.removeprefix("http://")
    with pytest.raises(BootstrapError, match=f"failed after 2 retries: the server answered 503 \\({host}\\)"):
        d.fetch(model_file(f))
    assert tree(tmp_path) == []


def test_a_verified_file_is_skipped_without_hashing_or_asking(hub, tmp_path, monkeypatch):
    f = hub.add(HubFile("r/x", "ae.safetensors", payload()))
    first, _, _ = downloader(hub, tmp_path)
    first.fetch(model_file(f))
    hub.log.clear()

    def no_hashing(*args, **kwargs):
        raise AssertionError("a verified file was hashed again")

    monkeypatch.setattr("bootstrap.download.hash_file", no_hashing)
    again, _, _ = downloader(hub, tmp_path)
    outcomes, errors = again.ensure([model_file(f)])
    assert errors == [] and [o.status for o in outcomes] == ["present"]
    assert hub.log == []
    # a file changed behind our back (new mtime) is hashed again, locally
    target = tmp_path / "vae" / "ae.safetensors"
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    monkeypatch.setattr("bootstrap.download.hash_file", verified.hash_file)
    third, _, _ = downloader(hub, tmp_path)
    assert third.fetch(model_file(f)).status == "present" and hub.log == []


def test_a_wrong_file_in_place_is_replaced_only_by_a_verified_one(hub, tmp_path):
    f = hub.add(HubFile("r/x", "ae.safetensors", payload()))
    target = tmp_path / "vae" / "ae.safetensors"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"HeaderTooLarge" * 10)
    d, _, said = downloader(hub, tmp_path)
    assert d.fetch(model_file(f)).status == "downloaded"
    assert target.read_bytes() == f.data and "does not match" in said[0]


def test_free_disk_space_is_checked_before_the_first_byte(hub, tmp_path):
    f = hub.add(HubFile("r/x", "ae.safetensors", payload()))
    d, _, _ = downloader(hub, tmp_path / "models")
    d.free_space = lambda path: 1000
    with pytest.raises(BootstrapError, match="Not enough free disk space"):
        d.ensure([model_file(f)])
    no_size = model_file(
        f, with_hash=False
    )  # the size is learnt from the hub's X-Linked-Size, still before writing
    with pytest.raises(BootstrapError, match="Not enough free disk space"):
        d.fetch(no_size)
    assert hub.requests("cdn") == [] and not (tmp_path / "models").exists()


def test_manifest_hash_that_disagrees_with_the_hub_stops_before_writing(hub, tmp_path):
    f = hub.add(HubFile("r/x", "ae.safetensors", payload()))
    stale = ModelFile("ae", "r/x", "ae.safetensors", "vae", size=SIZE, sha256="0" * 64)
    d, _, _ = downloader(hub, tmp_path)
    with pytest.raises(BootstrapError, match="changed on the hub"):
        d.fetch(stale)
    assert hub.requests("cdn") == [] and tree(tmp_path) == []
    assert f.sha256 in str(pytest.raises(BootstrapError, d.fetch, stale).value)


def test_unknown_hash_is_taken_from_the_linked_etag_and_said(hub, tmp_path):
    f = hub.add(HubFile("Kijai/flux-fp8", "flux1-dev-fp8.safetensors", payload()))
    d, _, said = downloader(hub, tmp_path)
    d.fetch(model_file(f, name="flux1-dev-fp8-transformer", folder="diffusion_models", with_hash=False))
    assert any("X-Linked-Etag" in line for line in said)
    state = verified.VerifiedState.load(tmp_path)
    assert state.files["diffusion_models/flux1-dev-fp8.safetensors"].sha256 == f.sha256


def test_small_git_files_are_checked_against_the_git_blob_sha1(hub, tmp_path):
    good = hub.add(HubFile("openai/clip", "vocab.json", b'{"a": 1}' * 1000, lfs=False))
    bad = hub.add(HubFile("openai/clip", "merges.txt", b"a b\n" * 1000, lfs=False, serve=b"a c\n" * 1000))
    d, _, said = downloader(hub, tmp_path)
    outcomes, errors = d.ensure(
        [
            model_file(good, "clip_l-vocab", "tokenizers/clip_l", with_hash=False),
            model_file(bad, "clip_l-merges", "tokenizers/clip_l", with_hash=False),
        ]
    )
    assert [o.file.name for o in outcomes] == ["clip_l-vocab"] and len(errors) == 1
    assert "git blob SHA-1" in str(errors[0]) and "clip_l-merges" in str(errors[0])
    assert tree(tmp_path / "tokenizers") == ["clip_l", "clip_l/vocab.json"]
    assert hub.requests("cdn") == []


def test_cli_download_and_verify(hub, tmp_path, monkeypatch, capsys):
    from bootstrap.cli import main

    ok = hub.add(HubFile("comfyanonymous/flux_text_encoders", "clip_l.safetensors", payload(seed=2)))
    gated = hub.add(
        HubFile("black-forest-labs/FLUX.1-dev", "flux1-dev.safetensors", payload(seed=3), gated=True)
    )
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(
        f'[[file]]\nname = "clip_l"\nrepo = "{ok.repo}"\npath = "{ok.path}"\nsize = {SIZE}\nsha256 = "{ok.sha256}"\n'
        'folder = "text_encoders"\n\n'
        f'[[file]]\nname = "flux1-dev"\nrepo = "{gated.repo}"\npath = "{gated.path}"\nfolder = "diffusion_models"\n'
        "gated = true\n\n"
        '[[preset]]\nname = "both"\nfiles = ["clip_l", "flux1-dev"]\n'
    )
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    models = tmp_path / "models"
    args = ["--manifest", str(manifest), "--models-dir", str(models)]
    assert main(["download", "--preset", "both", *args]) == 1
    out, err = capsys.readouterr()
    assert "clip_l: downloaded and verified" in out
    assert "error: flux1-dev is in the gated repo" in err and "Traceback" not in err
    assert main(["download", "nope", *args]) == 2
    assert "Unknown file 'nope'" in capsys.readouterr().err
    assert main(["verify", *args]) == 0
    assert "ok  clip_l: sha256 matches the manifest" in capsys.readouterr().out
    target = models / "text_encoders" / "clip_l.safetensors"
    target.write_bytes(payload(seed=9))
    assert main(["verify", *args]) == 1
    assert "FAILED  clip_l: sha256 is" in capsys.readouterr().out


def test_progress_shows_bytes_speed_and_eta():
    import io

    from bootstrap.progress import TerminalProgress, progress_line

    assert progress_line("ae", 4_200_000_000, 17_200_000_000, 38_100_000) == (
        "ae  4.2 GB / 17.2 GB (24%)  38.1 MB/s  ETA 5m 41s"
    )
    assert progress_line("vocab", 1500, None, None) == "vocab  1.5 KB"
    now = [0.0]
    out = io.StringIO()
    progress = TerminalProgress(stream=out, clock=lambda: now[0])
    progress.start("ae", 1000, 0)
    for _ in range(4):
        now[0] += 2.0
        progress.advance(100)
    assert out.getvalue().splitlines()[-1] == "ae  400 B / 1.0 KB (40%)  50 B/s  ETA 12s"


# ---- nothing bad gets through (issue 10) ----


def within(seconds: float, work):
    """work()'s result or exception, or a test failure when it runs longer (it is left running on a daemon
    thread, which ends with the fake hub)."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, work()))
        except BaseException as exc:  # handed to the test
            outcome.append((False, exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still running after {seconds} s: the attempts are not bounded"
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def test_a_server_that_cuts_and_refuses_to_resume_is_given_up_on(hub, tmp_path):
    # full GET cut at the same byte -> Range -> 416 -> part deleted -> full GET ...: the part grows every time,
    # but never past the furthest byte reached, so it is not progress
    f = hub.add(
        HubFile("r/x", "ae.safetensors", payload(), drop_after=150_000, drops=10**6, refuse_ranges=True)
    )
    d, sleeps, _ = downloader(hub, tmp_path, retries=3)
    with pytest.raises(BootstrapError, match="failed after 3 retries") as err:
        within(30, lambda: d.fetch(model_file(f)))  # an endless loop fails here instead of hanging the suite
    assert "\n" not in str(err.value)
    assert len(hub.requests("cdn")) <= 2 * (3 + 1)
    assert not (tmp_path / "vae" / "ae.safetensors").exists()
    # and however the failures look, the number of attempts is bounded
    hub.log.clear()
    d, _, _ = downloader(hub, tmp_path, retries=1000, max_attempts=5)
    with pytest.raises(BootstrapError, match="did not complete in 5 attempts"):
        d.fetch(model_file(f))
    assert len(hub.requests("hub")) == 5


def test_a_server_with_fewer_bytes_than_the_size_is_said_at_once(hub, tmp_path):
    data = payload()
    f = hub.add(HubFile("r/x", "ae.safetensors", data, serve=data[:-1000]))
    d, _, _ = downloader(hub, tmp_path)
    with pytest.raises(BootstrapError, match=f"has {SIZE - 1000} bytes for ae but {SIZE} were expected"):
        within(30, lambda: d.fetch(model_file(f, with_hash=False)))  # the size: the hub's X-Linked-Size
    assert len(hub.requests("cdn")) == 1 and tree(tmp_path / "vae") == []


@pytest.mark.parametrize(
    "location",
    [
        "file:///etc/passwd",
        "http://[::1/x",
        "http://localhost:port/x",
        "gopher://localhost/x",
        "https://:0/x",
    ],
)
def test_a_redirect_to_a_local_file_or_a_malformed_address_is_one_sentence(hub, tmp_path, location):
    f = hub.add(HubFile("r/x", "ae.safetensors", payload(), location=location))
    d, _, _ = downloader(hub, tmp_path)
    with pytest.raises(BootstrapError) as err:
        d.fetch(model_file(f))
    assert "\n" not in str(err.value) and ("http(s)" in str(err.value) or "cannot be used" in str(err.value))
    assert hub.requests("cdn") == [] and tree(tmp_path) == []


def test_a_malformed_hf_endpoint_is_one_sentence(tmp_path):
    f = ModelFile("ae", "r/x", "ae.safetensors", "vae")
    for endpoint in ("huggingface.co", "file:///srv/hub", "https://"):
        d = Downloader(tmp_path, DownloadOptions(endpoint=endpoint, token=None), sleep=lambda s: None)
        with pytest.raises(BootstrapError, match="check HF_ENDPOINT"):
            d.fetch(f)


def test_without_a_size_or_hash_a_cut_off_file_is_never_verified(hub, tmp_path):
    # a plain file served with no ETag and no Content-Length, cut after 100 kB: the end of the connection looks
    # like the end of the file
    f = hub.add(HubFile("r/x", "vocab.json", payload(), lfs=False, bare=True, drop_after=100_000))
    mf = model_file(f, "vocab", "tokenizers/clip_l", with_hash=False)
    d, _, _ = downloader(hub, tmp_path)
    with pytest.raises(BootstrapError, match="Neither the manifest nor the server gives a size or a hash"):
        d.fetch(mf)
    assert tree(tmp_path / "tokenizers") == []
    # a copy already in place is not trusted either
    target = tmp_path / "tokenizers" / "clip_l" / "vocab.json"
    target.parent.mkdir(parents=True)
    target.write_bytes(payload()[:100_000])
    outcomes, errors = downloader(hub, tmp_path)[0].ensure([mf])
    assert outcomes == [] and len(errors) == 1
    assert verified.VerifiedState.load(tmp_path).files == {}
    assert not downloader(hub, tmp_path)[0].is_verified(mf)


def test_a_trickling_server_meets_the_deadline(hub, tmp_path):
    f = hub.add(HubFile("r/x", "ae.safetensors", payload(), trickle_s=0.05))  # about 2 kB/s
    d, _, _ = downloader(hub, tmp_path, deadline_s=0.6)
    with pytest.raises(
        BootstrapError, match="took longer than the 1s allowed.*run the command again to resume"
    ):
        within(10, lambda: d.fetch(model_file(f)))
    part = tmp_path / "vae" / "ae.safetensors.part"
    assert 0 < part.stat().st_size < SIZE and not part.with_name("ae.safetensors").exists()
    # below the minimum speed for a whole window, an attempt is a failure even though bytes arrived
    hub.log.clear()
    d, _, _ = downloader(hub, tmp_path, retries=2, slow_window_s=0.2, min_speed_bytes_s=100_000)
    with pytest.raises(BootstrapError, match="failed after 2 retries: the server sends only"):
        d.fetch(model_file(f))
    assert len(hub.requests("cdn")) == 3


def test_models_dir_that_is_a_file_is_one_sentence(hub, tmp_path, monkeypatch, capsys):
    from bootstrap.cli import main

    f = hub.add(HubFile("r/x", "ae.safetensors", payload()))
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(
        f'[[file]]\nname = "ae"\nrepo = "r/x"\npath = "ae.safetensors"\nfolder = "vae"\nsize = {SIZE}\n'
    )
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    a_file = tmp_path / "models.txt"
    a_file.write_text("not a folder")
    for models in (a_file, a_file / "inside"):
        for command in ("download", "verify"):
            assert main([command, "ae", "--manifest", str(manifest), "--models-dir", str(models)]) == 2
            err = capsys.readouterr().err
            assert "not a folder" in err and "Traceback" not in err and err.count("\n") == 1
    assert main(["wizard", "--yes", "--manifest", str(manifest), "--models-dir", str(a_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert hub.log == [] and f.data


def test_what_a_server_says_reaches_the_terminal_escaped(tmp_path, monkeypatch, capsys):
    from bootstrap.cli import main

    with FakeHub(error_message="gone \x1b]0;owned\x07\x1b[2J") as hub:
        hub.add(HubFile("r/x", "other.safetensors", payload()))
        manifest = tmp_path / "manifest.toml"
        manifest.write_text('[[file]]\nname = "ae"\nrepo = "r/x"\npath = "ae.safetensors"\nfolder = "vae"\n')
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", "")
        assert main(["download", "ae", "--manifest", str(manifest), "--models-dir", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "no file ae.safetensors" in err
