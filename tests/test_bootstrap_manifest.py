"""The shipped manifest: the DESIGN.md schema, real figures only, presets that add up."""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest

from bootstrap.errors import BootstrapError
from bootstrap.hub import file_url, find_token, origin, same_origin
from bootstrap.manifest import FOLDERS, load_manifest, parse_manifest
from bootstrap.untrusted import confine, name_problem
from engine.contract import layout

MANIFEST = load_manifest()
REFERENCE = Path("/work/shared/reference/models.md")
# the figures of the files beyond FLUX.1's base set, with where each was found (same columns as REFERENCE)
MODELS_DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"
# the tokenizer folders a preset of each family needs next to its model files
FAMILY_TOKENIZERS = {
    "flux1": {layout.CLIP_TOKENIZER, layout.T5_TOKENIZER},
    "flux2": {layout.QWEN3_TOKENIZER},
}
MODEL_FOLDERS = {"checkpoints", "diffusion_models", "unet"}


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
            assert FAMILY_TOKENIZERS[preset.family] <= {f.folder for f in files}, preset.name
            other = set().union(*FAMILY_TOKENIZERS.values()) - FAMILY_TOKENIZERS[preset.family]
            assert not other & {f.folder for f in files}, preset.name
    assert not any(f.gated for f in MANIFEST.preset_files("schnell-fp8"))
    assert any(f.gated for f in MANIFEST.preset_files("dev-full"))


@pytest.mark.skipif(not REFERENCE.is_file(), reason="the shared reference is not on this machine")
def test_figures_match_the_reference_table():
    # FLUX.1's base files are in the shared reference; the others in docs/models.md, each with its source
    table = REFERENCE.read_text() + "\n" + MODELS_DOC.read_text()
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


# ---- nothing bad gets through (issue 10): paths confined under Windows rules, typed fields, escaped names ----

WINDOWS_MODELS = PureWindowsPath("C:\\FluxDeck\\models")
ESCAPES = [
    "..\\..\\run_gpu.bat",  # backslashes are separators on Windows
    "C:\\Windows\\System32\\evil.dll",  # a drive letter replaces the folder
    "C:evil.dll",  # drive-relative
    "\\\\server\\share\\evil.dll",  # UNC
    "\\\\?\\C:\\evil.dll",  # the long-path prefix
    "//server/share/evil.dll",
    "/etc/cron.d/evil",
    "../../evil",
    "vae/../../evil",
    "nul.safetensors",  # device names, with any extension
    "COM1",
    "ae.safetensors:hidden",  # an NTFS alternate data stream
    "ae.safetensors.",  # Windows drops trailing dots and spaces: another file's name
    "ae.safetensors ",
    "",
    "a//b",
    "ae\x1b[2J.safetensors",
]


def test_unconfined_windows_paths_would_escape():
    # why a check is needed at all: joined as they are, these leave the models folder on Windows
    assert WINDOWS_MODELS / "vae" / "C:\\Windows\\evil.dll" == PureWindowsPath("C:\\Windows\\evil.dll")
    assert (WINDOWS_MODELS / "vae" / "\\\\server\\share\\x").drive == "\\\\server\\share"
    assert ".." in (WINDOWS_MODELS / "vae" / "..\\..\\x").parts


@pytest.mark.parametrize("bad", ESCAPES)
def test_confine_refuses_whatever_could_leave_the_folder_on_any_os(bad):
    for base in (WINDOWS_MODELS, PurePosixPath("/home/me/models")):
        with pytest.raises(BootstrapError) as err:
            confine(base, f"vae/{bad}", "The path of ae")
        assert "\n" not in str(err.value) and "\x1b" not in str(err.value)


def test_confine_keeps_plain_names():
    assert confine(WINDOWS_MODELS, "vae/ae.safetensors", "x") == PureWindowsPath(
        "C:\\FluxDeck\\models\\vae\\ae.safetensors"
    )
    assert confine(PurePosixPath("m"), "tokenizers/t5xxl/spiece.model", "x") == PurePosixPath(
        "m/tokenizers/t5xxl/spiece.model"
    )
    assert name_problem("flux1-dev-Q4_K_S.gguf") is None and name_problem("consommé.txt") is None


@pytest.mark.parametrize("bad", [b for b in ESCAPES if b])
def test_manifest_paths_that_could_escape_are_refused(bad):
    text = f'[[file]]\nname="a"\nrepo="r/a"\npath={json.dumps("split_files/" + bad)}\nfolder="vae"\n'
    with pytest.raises(BootstrapError, match="[Pp]ath") as err:
        parse_manifest(text)
    assert "\x1b" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('file = "x"', r"must be \[\[file\]\] tables"),
        (
            '[[file]]\nname=5\nrepo="r/a"\npath="a"\nfolder="vae"',
            r"name in a \[\[file\]\] of the manifest must be a string",
        ),
        (
            '[[file]]\nname="a"\nrepo="r/a"\npath="a"\nfolder="vae"\nsize="12"',
            r"size in the \[\[file\]\] a .* must be a whole number",
        ),
        ('[[file]]\nname="a"\nrepo="r/a"\npath="a"\nfolder="vae"\nsize=true', "must be a whole number"),
        (
            '[[file]]\nname="a"\nrepo="r/a"\npath="a"\nfolder="vae"\ngated="no"',
            "gated .* must be true or false",
        ),
        ('[[file]]\nname="a"\nrepo="r/a"\npath=["a"]\nfolder="vae"', "path .* must be a string"),
        ('[[file]]\nname="a"\nrepo="r/a"\npath="a"\nfolder=1', "folder .* must be a string"),
        ('[[file]]\nname="a"\nrepo="../../x"\npath="a"\nfolder="vae"', "not an owner/name repo id"),
        (
            '[[file]]\nname="a"\nrepo="r/a"\npath="a"\nfolder="vae"\nrevision=3',
            "revision .* must be a string",
        ),
        ('[[preset]]\nname="p"\nfiles="abc"', "files in the .*preset.* must be a list"),
        ('[[preset]]\nname="p"\nfiles=[1]', "must be a list of file names"),
        ('[[preset]]\nname="p"\nfiles=[]\ndisk_gb="8"', "disk_gb .* must be a number"),
        ('[[preset]]\nname="p"\nfiles=[]\ndisk_gb=nan', "disk_gb .* must be a number 0 or more"),
        ('[[preset]]\nname="p"\nfiles=[]\nrank=1.5', "rank .* must be a whole number"),
        ("[[preset]]\nfiles=[]", "lacks name"),
        ("group = [1]", r"\[group\] must map"),
        ("[group]\nx = 'a'", r"\[group\] must map"),
        ("[group]\nx = ['@x']\n[[preset]]\nname='p'\nfiles=['@x']", "contains itself"),
        ('[[file]]\nname="a\\u001b[31m"\nrepo="r/a"\npath="a"\nfolder="vae"', "holds control characters"),
    ],
)
def test_wrong_toml_types_are_one_sentence(text, says):
    with pytest.raises(BootstrapError, match=says) as err:
        parse_manifest(text)
    message = str(err.value)
    assert "\n" not in message and "\x1b" not in message


def test_cli_says_a_bad_manifest_in_one_sentence(tmp_path, capsys):
    from bootstrap.cli import main

    manifest = tmp_path / "m.toml"
    manifest.write_text('[[file]]\nname="\\u001b]0;x\\u0007a"\nrepo="r/a"\npath="C:\\\\x"\nfolder="vae"\n')
    assert main(["list", "--manifest", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "\x1b" not in err and "\x07" not in err and "\\x1b" in err


# ---- the FLUX.2 [klein], edit, control and Redux entries (issues 12, 13, 14) ----


def test_every_published_figure_is_a_real_sha256_and_size():
    hashed = [f for f in MANIFEST.files.values() if f.sha256 is not None]
    assert len(hashed) >= 40  # the FLUX.1 base set and the additions
    for f in hashed:
        assert re.fullmatch(r"[0-9a-f]{64}", f.sha256), f.name
        assert isinstance(f.size, int) and f.size > 0, f.name
    for f in MANIFEST.files.values():  # a size without its hash would be a figure from nowhere
        assert f.size is None or f.sha256 is not None, f.name
    # one published hash names one set of bytes: copies of a file share their size
    sizes: dict[str, set[int | None]] = {}
    for f in hashed:
        sizes.setdefault(f.sha256, set()).add(f.size)
    assert all(len(s) == 1 for s in sizes.values())


def test_every_preset_names_files_that_exist_once():
    for preset in MANIFEST.presets.values():
        files = MANIFEST.preset_files(preset.name)
        assert files and len({f.relpath for f in files}) == len(files), preset.name
        for name in preset.files:
            if not name.startswith("@"):
                assert name in MANIFEST.files, (preset.name, name)
        if preset.name != "tokenizers":
            models = [f for f in files if f.folder in MODEL_FOLDERS]
            assert len(models) >= 1, preset.name


def test_every_folder_is_one_the_engine_searches():
    searched = {
        *layout.ROLE_FOLDERS,
        *layout.EXTRA_FOLDERS,
        *layout.LORA_FOLDERS,
        layout.CLIP_TOKENIZER,
        layout.T5_TOKENIZER,
        layout.QWEN3_TOKENIZER,
    }
    for folder in FOLDERS:
        # a Depth Anything model is a transformers folder one level inside depth/
        top = folder.split("/")[0] if folder.startswith(layout.DEPTH + "/") else folder
        assert top in searched, folder
    for f in MANIFEST.files.values():
        if f.folder in MODEL_FOLDERS or f.folder in (layout.TEXT_ENCODERS, layout.VAE, layout.CONTROLNET):
            assert f.filename.endswith(layout.WEIGHT_SUFFIXES), f.name


def test_klein_edit_and_control_presets():
    klein = MANIFEST.presets["klein-4b"]
    assert (klein.family, klein.kind, klein.steps) == ("flux2", "txt2img", 4)
    files = MANIFEST.preset_files("klein-4b")
    assert not any(f.gated for f in files)  # Apache-2.0: no account
    assert {f.folder for f in files} >= {"diffusion_models", "text_encoders", "vae", layout.QWEN3_TOKENIZER}
    assert any(f.gated for f in MANIFEST.preset_files("klein-9b"))  # BFL gates the 9B
    assert MANIFEST.presets["klein-9b"].family == "flux2"
    assert MANIFEST.presets["edit"].kind == "edit" and MANIFEST.presets["control"].kind == "control"
    edit = {f.name for f in MANIFEST.preset_files("edit")}
    assert {"flux1-fill-dev-Q4_K_S", "flux1-kontext-dev-Q4_K_S"} <= edit
    control = MANIFEST.preset_files("control")
    assert {"controlnet", "loras", "depth/depth-anything-v2-small"} <= {f.folder for f in control}
    for name in ("edit", "control"):  # the smallest ungated forms: no token needed
        assert not any(f.gated for f in MANIFEST.preset_files(name)), name
    union = MANIFEST.files["flux1-controlnet-union-pro-2"]
    assert union.target(Path("m")) == Path("m/controlnet/FLUX.1-dev-ControlNet-Union-Pro-2.0.safetensors")
    assert union.path == "diffusion_pytorch_model.safetensors"
    depth = MANIFEST.files["depth-anything-v2-small-config"]
    assert depth.target(Path("m")) == Path("m/depth/depth-anything-v2-small/config.json")


def test_presets_have_a_family_and_a_kind():
    base = '[[file]]\nname="a"\nrepo="r/a"\npath="a.safetensors"\nfolder="diffusion_models"\n[[preset]]\nname="p"\nfiles=["a"]\n'
    preset = parse_manifest(base).presets["p"]
    assert (preset.family, preset.kind) == ("flux1", "txt2img")
    preset = parse_manifest(base + 'family="flux2"\nkind="edit"\n').presets["p"]
    assert (preset.family, preset.kind) == ("flux2", "edit")


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ('family="flux3"', "family in the .*preset.* must be one of flux1, flux2"),
        ('kind="upscale"', "kind in the .*preset.* must be one of txt2img, edit, control"),
        ("kind=3", "kind .* must be a string"),
    ],
)
def test_bad_family_or_kind_is_one_sentence(extra, says):
    text = (
        '[[file]]\nname="a"\nrepo="r/a"\npath="a"\nfolder="vae"\n[[preset]]\nname="p"\nfiles=["a"]\n' + extra
    )
    with pytest.raises(BootstrapError, match=says) as err:
        parse_manifest(text)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "bad", ["../x.safetensors", "a/b.safetensors", "nul.safetensors", "x.safetensors.", "c:x"]
)
def test_save_as_must_be_a_plain_name(bad):
    text = f'[[file]]\nname="a"\nrepo="r/a"\npath="a"\nfolder="controlnet"\nsave_as={json.dumps(bad)}\n'
    with pytest.raises(BootstrapError, match="save_as of a .* is not a plain file name"):
        parse_manifest(text)


def test_an_existing_comfyui_install_lends_its_controlnets_redux_and_siglip(tmp_path):
    from bootstrap.reuse import ExistingFolder

    models = tmp_path / "ComfyUI" / "models"
    wanted = {
        "xlabs-canny-v3": "xlabs/controlnets",
        "sigclip_vision_384": "clip_vision",
        "flux1-redux-dev-comfy": "style_models",
    }
    comfy = ExistingFolder(models, "ComfyUI")
    for name, sub in wanted.items():
        f = MANIFEST.files[name]
        assert comfy.find(f) is None
        (models / sub).mkdir(parents=True)
        target = models / sub / f.filename
        with open(target, "wb") as out:  # a sparse file of the published size
            out.truncate(f.size - 1)
        assert comfy.find(f) is None  # same name, another size: not the manifest's file
        with open(target, "ab") as out:
            out.write(b"\0")
        assert comfy.find(f) == target


def test_save_as_keeps_two_controlnets_with_the_hubs_generic_name_apart(tmp_path):
    # through the real downloader, against the loopback hub: each lands under its own name, verified
    from bootstrap import verified
    from bootstrap.download import Downloader, DownloadOptions
    from tests.bootstrap_hubserver import FakeHub, HubFile

    with FakeHub() as hub:
        union = hub.add(HubFile("Shakker-Labs/U", "diffusion_pytorch_model.safetensors", b"u" * 70_000))
        other = hub.add(HubFile("InstantX/C", "diffusion_pytorch_model.safetensors", b"c" * 50_000))
        text = "".join(
            f'[[file]]\nname="{name}"\nrepo="{f.repo}"\npath="{f.path}"\nsave_as="{save_as}"\n'
            f'size={len(f.data)}\nsha256="{f.sha256}"\nfolder="controlnet"\n'
            for name, f, save_as in (
                ("union", union, "Union-Pro-2.0.safetensors"),
                ("canny", other, "InstantX-Canny.safetensors"),
            )
        )
        manifest = parse_manifest(text)
        models = tmp_path / "models"
        options = DownloadOptions(endpoint=hub.endpoint, token=None, backoff_s=0.01, retries=1)
        down = Downloader(models, options, sleep=lambda s: None, say=lambda s: None)
        for f in manifest.expand(["union", "canny"]):
            assert down.fetch(f).status == "downloaded"
    assert (models / "controlnet" / "Union-Pro-2.0.safetensors").read_bytes() == union.data
    assert (models / "controlnet" / "InstantX-Canny.safetensors").read_bytes() == other.data
    assert not (models / "controlnet" / "diffusion_pytorch_model.safetensors").exists()
    state = verified.VerifiedState.load(models)
    assert state.files["controlnet/Union-Pro-2.0.safetensors"].sha256 == union.sha256


def test_list_shows_family_and_kind(capsys):
    from bootstrap.cli import main

    assert main(["list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert "[flux2]" in lines["klein-4b"]
    assert "[edit]" in lines["edit"] and "[control]" in lines["control"]
    assert "(12.5 GB, 4 steps)" in lines["klein-4b"] and "[" not in lines["schnell-fp8"].split("]", 1)[1]
