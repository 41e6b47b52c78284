"""Issue 10, the engine's half: crafted files, odd numbers, interrupts and hostile prompts each get one sentence
(exit code 2, no traceback) and lose nothing. Each test here fails on the code before the fix."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine import fixtures
from engine.contract.errors import UserError
from engine.contract.request import GenerateRequest, LoraSpec
from tests.test_engine_bad_input import ROOT, SIZE, run_cli, split

# ---- numbers: finite, in range, checked where the request is validated (items 6 and 8) ----


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--guidance", "nan"], "--guidance nan is not a finite number"),
        (["--guidance", "inf"], "--guidance inf is not a finite number"),
        (["--guidance", "1e30"], "--guidance 1e+30 is out of range"),
        (["--cfg", "nan"], "--cfg nan is not a finite number"),
        (["--shift", "nan"], "--shift nan is not a finite number"),
        (["--shift", "inf"], "--shift inf is not a finite number"),
        (["--denoise", "nan"], "--denoise nan is not a finite number"),
        (["--vram-budget", "nan"], "--vram-budget nan is not a finite number"),
        (["--vram-budget", "-1"], "--vram-budget -1.0 is out of range"),
        (["--lora", "style.safetensors:nan"], "--lora style.safetensors:nan is not a finite number"),
        (["--lora", "style.safetensors:inf"], "--lora style.safetensors:inf is not a finite number"),
        (["--lora", "style.safetensors:1e30"], "--lora style.safetensors:1e+30 is out of range"),
        (["--steps", "1000000000"], "--steps 1000000000 is out of range: use 1 to 1000 steps"),
        (["--batch", "1000000"], "--batch 1000000 is out of range: use 1 to 64 images"),
        (["--t5-max-length", "0"], "--t5-max-length 0 is out of range"),
        (["--seed", "9" * 400], "--seed 9999999999999999999999999999999999999... is out of range"),
    ],
)
def test_odd_numbers_are_refused_before_anything_loads(
    dev_set, tmp_path, capsys, monkeypatch, flags, expected
):
    import engine.generation.pipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("validation must refuse this before any model file is read")

    monkeypatch.setattr(engine.generation.pipeline, "resolve", no_loading)
    monkeypatch.setattr(engine.generation.pipeline.sampling, "make_noise", no_loading)
    line = run_cli(
        capsys, "--models-dir", str(dev_set.models_dir), *SIZE, *flags, "--out", str(tmp_path / "o.png")
    )
    assert expected in line
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"width": "64"}, "--width '64' is not a whole number"),
        ({"steps": 4.0}, "--steps 4.0 is not a whole number"),
        ({"batch": True}, "--batch True is not a whole number"),
        ({"guidance": "3.5"}, "--guidance '3.5' is not a number"),
        ({"cfg": float("inf")}, "--cfg inf is not a finite number"),
        ({"prompt": ["a", "list"]}, "--prompt is not text"),
        ({"loras": [{"path": "x.safetensors", "strength": float("nan")}]}, "is not a finite number"),
    ],
)
def test_requests_from_json_are_checked_the_same_way(tmp_path, change, expected):
    data = (
        GenerateRequest(prompt="a cat", out=str(tmp_path / "o.png"), width=64, height=64).to_dict() | change
    )
    with pytest.raises(UserError) as info:
        GenerateRequest.from_dict(data).validate()
    assert expected in str(info.value)


@pytest.mark.parametrize("data", [[1, 2], {"prompt": "x"}, {"prompt": "x", "out": "o.png", "files": [1]}])
def test_malformed_requests_are_one_sentence(data):
    with pytest.raises(UserError):
        GenerateRequest.from_dict(data).validate()


def test_tag_strengths_are_checked_like_flags(dev_set, tmp_path, capsys):
    import shutil

    models = tmp_path / "models"  # a copy: the session's model set stays without a loras folder
    shutil.copytree(dev_set.models_dir, models)
    (models / "loras").mkdir()
    (models / "loras" / "style.safetensors").write_bytes(b"never read")
    out = str(tmp_path / "o.png")
    line = run_cli(capsys, "--models-dir", str(models), *SIZE, "--prompt", "<lora:style:nan>", "--out", out)
    assert "--lora" in line and "is not a finite number" in line


# ---- NaN/Inf in the latents stop the job and name the cause (item 6) ----


def test_nan_weights_stop_the_job_and_name_the_file(dev_set, tmp_path, capsys):
    state = fixtures.cast(dev_set.states.transformer, torch.bfloat16)
    state["final_layer.linear.weight"][0, 0] = float("nan")
    broken = tmp_path / "flux-broken.safetensors"
    save_file(state, str(broken))
    line = run_cli(capsys, *split(dev_set, transformer=broken), *SIZE, "--out", str(tmp_path / "o.png"))
    assert "NaN/infinity at step 1 of 1" in line
    assert f"the transformer file {broken}" in line
    assert not (tmp_path / "o.png").exists()  # no black image


@pytest.mark.parametrize(
    ("role", "tensor", "dtype", "expected"),
    [
        ("t5", "encoder.final_layer_norm.weight", torch.float16, "The text encoding holds NaN/infinity"),
        ("vae", "decoder.conv_out.bias", torch.float32, "The decoded image holds NaN/infinity"),
    ],
)
def test_nan_in_other_weight_files_names_them(dev_set, tmp_path, capsys, role, tensor, dtype, expected):
    state = fixtures.cast(getattr(dev_set.states, role), dtype)
    state[tensor][0] = float("nan")
    broken = tmp_path / f"{role}-broken.safetensors"
    save_file(state, str(broken))
    line = run_cli(capsys, *split(dev_set, **{role: broken}), *SIZE, "--prompt", f"nan {role}",
                   "--out", str(tmp_path / "o.png"))  # fmt: skip
    assert expected in line and str(broken) in line
    assert not (tmp_path / "o.png").exists()


def test_an_exploding_lora_stops_the_job_and_is_named(dev_set, tmp_path, capsys):
    from tests import lora_layouts

    path = tmp_path / "boom.safetensors"
    lora_layouts.kohya(path, dev_set.states.transformer, size=1e30, dtype=torch.float32)
    line = run_cli(capsys, *split(dev_set), *SIZE, "--lora", str(path), "--out", str(tmp_path / "o.png"))
    assert "NaN/infinity at step 1 of 1" in line and "the LoRA boom (strength 1)" in line
    assert not (tmp_path / "o.png").exists()


def test_the_euler_loop_stops_on_nan():
    from engine.generation import sampling

    steps = []
    with pytest.raises(sampling.NonFiniteLatents) as info:
        sampling.euler(
            torch.zeros(1, 4, 8),
            [1.0, 0.75, 0.5, 0.25, 0.0],
            lambda x, t: torch.full_like(x, float("inf") if t < 0.6 else 1.0),
            steps.append,
        )
    assert (info.value.step, info.value.total) == (3, 4) and len(steps) == 2


# ---- malformed safetensors headers (item 5) ----


def _raw_safetensors(path: Path, header, data: bytes = b"\0" * 64) -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


F32_4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
HEADERS = {
    "list": [1, 2, 3],
    "entry not an object": {"w": [1, 2]},
    "missing offsets": {"w": {"dtype": "F32", "shape": [4]}},
    "negative offsets": {"w": {"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}},
    "reversed offsets": {"w": {"dtype": "F32", "shape": [0], "data_offsets": [16, 0]}},
    "one offset": {"w": {"dtype": "F32", "shape": [4], "data_offsets": [16]}},
    "float offsets": {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16.0]}},
    "shape too big": {"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 16]}},
    "negative dim": {"w": {"dtype": "F32", "shape": [-4, -1], "data_offsets": [0, 16]}},
    "shape not a list": {"w": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}},
    "overlap": {"a": F32_4, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}},
    "unknown dtype": {"w": {"dtype": "F128", "shape": [4], "data_offsets": [0, 16]}},
    "unhashable dtype": {"w": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}},
    "metadata not texts": {"__metadata__": {"a": 1}, "w": F32_4},
    "deeply nested": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_malformed_headers_are_one_sentence(tmp_path, case):
    from engine.formats.weights import SafetensorsFile

    path = _raw_safetensors(tmp_path / "bad.safetensors", HEADERS[case], b"\0" * 200_064)
    with pytest.raises(UserError) as info:
        SafetensorsFile(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_malformed_header_through_the_cli(dev_set, tmp_path, capsys):
    bad = _raw_safetensors(tmp_path / "bad.safetensors", HEADERS["overlap"])
    line = run_cli(capsys, *split(dev_set, vae=bad), *SIZE, "--out", str(tmp_path / "o.png"))
    assert "overlap" in line and "download it again" in line


def test_a_good_header_still_reads(tmp_path):
    from engine.formats.weights import SafetensorsFile

    path = tmp_path / "good.safetensors"
    save_file(
        {"a": torch.arange(4.0), "b": torch.ones(2, 3, dtype=torch.bfloat16), "e": torch.zeros(0)}, str(path)
    )
    loaded = SafetensorsFile(path).load(["a", "b", "e"])
    assert (
        torch.equal(loaded["a"], torch.arange(4.0))
        and loaded["b"].shape == (2, 3)
        and loaded["e"].numel() == 0
    )


def test_one_bad_file_does_not_stop_the_models_scan(dev_set, tmp_path):
    import shutil

    from engine.contract.request import ModelFiles
    from engine.formats.model_files import resolve

    models = tmp_path / "models"
    shutil.copytree(dev_set.models_dir, models)
    for i, case in enumerate(("list", "entry not an object", "negative dim", "deeply nested")):
        _raw_safetensors(models / "diffusion_models" / f"a{i}-bad.safetensors", HEADERS[case])
    resolved = resolve(ModelFiles(models_dir=str(models)))
    assert resolved.components["transformer"].file.path.name == "flux-tiny.safetensors"
    assert len(resolved.notes) == 4
    assert all(note.startswith("skipped a") for note in resolved.notes)


# ---- GGUF types and shapes, LoRA fields, prompts, init images (item 9) ----


def _gguf_with(tmp_path: Path, qtype, metadata=None) -> Path:
    from engine.formats.gguf_file import write_gguf
    from engine.formats.gguf_quants import QType, block_layout

    block, size = block_layout(QType[qtype])
    path = tmp_path / f"{qtype}.gguf"
    raw = torch.randint(0, 255, (4, 64 // block * size), dtype=torch.uint8).numpy()
    write_gguf(path, {"double_blocks.0.img_attn.qkv.weight": raw}, {"double_blocks.0.img_attn.qkv.weight": QType[qtype]},
               "flux", metadata)  # fmt: skip
    return path


@pytest.mark.parametrize("qtype", ["F64", "IQ4_NL"])
def test_unsupported_gguf_types_are_refused_at_load(tmp_path, qtype):
    from engine.formats.weights import GGUFFile

    with pytest.raises(UserError, match=f"GGUF type {qtype} .*which FluxDeck cannot read"):
        GGUFFile(_gguf_with(tmp_path, qtype))


@pytest.mark.parametrize("shape", [[3, 5], [-4, -64], [2, 2, 2]])
def test_a_bad_orig_shape_is_refused_at_load(tmp_path, shape):
    from engine.formats.weights import GGUFFile

    meta = {"comfy.gguf.orig_shape.double_blocks.0.img_attn.qkv.weight": shape}
    with pytest.raises(UserError, match="does not fit the tensor's 256 values"):
        GGUFFile(_gguf_with(tmp_path, "Q8_0", meta))


def _lora(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


KEY = "lora_unet_double_blocks_0_img_attn_qkv"
DOWN, UP = torch.ones(4, 64), torch.ones(192, 4)


@pytest.mark.parametrize(
    ("tensors", "metadata", "expected"),
    [
        ({f"{KEY}.lora_down.weight": torch.ones(0, 64), f"{KEY}.lora_up.weight": torch.ones(192, 0)}, None,
         "rank 0"),
        ({f"{KEY}.lora_down.weight": DOWN, f"{KEY}.lora_up.weight": UP, f"{KEY}.alpha": torch.ones(0)}, None,
         "an alpha of 0 values"),
        ({f"{KEY}.lora_down.weight": DOWN, f"{KEY}.lora_up.weight": UP,
          f"{KEY}.alpha": torch.tensor(float("nan"))}, None, "not a finite number"),
        ({f"{KEY}.lora_down.weight": DOWN * float("inf"), f"{KEY}.lora_up.weight": UP}, None,
         "holds NaN or infinite values"),
        ({f"{KEY}.lora_down.weight": DOWN, f"{KEY}.lora_up.weight": UP},
         {"lora_adapter_metadata": json.dumps({"lora_alpha": "abc"})}, "lora_alpha of 'abc'"),
        ({f"{KEY}.lora_down.weight": DOWN, f"{KEY}.lora_up.weight": UP},
         {"lora_adapter_metadata": json.dumps({"transformer.alpha_pattern": [1, 2]})}, "alpha_pattern"),
        ({f"{KEY}.lora_down.weight": DOWN, f"{KEY}.lora_up.weight": UP},
         {"lora_adapter_metadata": json.dumps({"alpha_pattern": {"x": "big"}})}, "alpha_pattern"),
    ],
)  # fmt: skip
def test_broken_lora_fields_are_one_sentence(tmp_path, tensors, metadata, expected):
    from engine.formats.lora import load_lora

    path = _lora(tmp_path / "bad.safetensors", tensors, metadata)
    with pytest.raises(UserError, match=expected):
        load_lora(path)


def test_a_prompt_that_is_not_utf8_is_refused(dev_set, tmp_path, capsys):
    """Bytes that are not UTF-8 in argv reach Python as lone surrogates (surrogateescape)."""
    line = run_cli(
        capsys, "--models-dir", str(dev_set.models_dir), *SIZE, "--prompt", b"a \xff cat".decode("utf-8", "surrogateescape"),
        "--out", str(tmp_path / "o.png"),
    )  # fmt: skip
    assert "--prompt holds bytes that are not valid UTF-8" in line


def _png_header_only(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [20_000, 9_000])  # 400 MP (PIL's own bomb alarm), 81 MP (ours)
def test_a_decompression_bomb_init_image_is_refused(dev_set, tmp_path, capsys, side):
    bomb = _png_header_only(tmp_path / "bomb.png", side, side)
    line = run_cli(capsys, "--models-dir", str(dev_set.models_dir), *SIZE, "--init-image", str(bomb),
                   "--out", str(tmp_path / "o.png"))  # fmt: skip
    assert "is too big to open safely" in line


def test_a_broken_init_image_is_refused(dev_set, tmp_path, capsys):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    line = run_cli(capsys, "--models-dir", str(dev_set.models_dir), *SIZE, "--init-image", str(junk),
                   "--out", str(tmp_path / "o.png"))  # fmt: skip
    assert "is not an image file" in line


# ---- the text-embedding cache and the tokenizer (item 7) ----


def test_the_embedding_cache_keys_on_the_tokenizer(dev_set, tmp_path, monkeypatch):
    import shutil

    import engine.generation.encode
    from engine.contract.request import ModelFiles
    from engine.generation.pipeline import Engine, EngineOptions

    encoded = []
    real_clip, real_t5 = engine.generation.encode.encode_clip, engine.generation.encode.encode_t5
    monkeypatch.setattr(
        engine.generation.encode, "encode_clip", lambda *a: encoded.append("clip") or real_clip(*a)
    )
    monkeypatch.setattr(engine.generation.encode, "encode_t5", lambda *a: encoded.append("t5") or real_t5(*a))
    other = tmp_path / "other-t5"
    shutil.copytree(dev_set.t5_tokenizer, other)
    (other / "added_tokens.json").write_text("{}")  # another tokenizer folder, with other contents
    engine = Engine(EngineOptions(cache_dir=str(tmp_path / "cache")))

    def job(t5_tokenizer) -> GenerateRequest:
        files = ModelFiles(models_dir=str(dev_set.models_dir), t5_tokenizer=str(t5_tokenizer))
        return GenerateRequest(
            prompt="a cat", out=str(tmp_path / "o.png"), width=64, height=64, steps=1, files=files
        )

    engine.generate(job(dev_set.t5_tokenizer))
    engine.generate(job(dev_set.t5_tokenizer))
    assert encoded == ["clip", "t5"]  # the second job came from the cache
    engine.generate(job(other))
    assert encoded == ["clip", "t5", "t5"]  # another tokenizer: T5 encodes again, CLIP still cached
    with pytest.raises(UserError, match="tokenizer folder .* does not exist"):
        engine.generate(job(tmp_path / "gone"))


# ---- the engine server never dies on input (item 10) ----


class _FakeEngine:
    def generate(self, request, on_event, cancel):
        raise RuntimeError("CUDA error: device-side assert at 0xdeadbeef (raw text)")


def _serve(lines: list[str], last_id: str) -> list[dict]:
    """Feed `lines` to a real Server, keep its input open until job `last_id` is answered, then end it."""
    from engine.server import LineWriter, Server

    out = io.StringIO()

    def commands():
        yield from (line + "\n" for line in lines)
        deadline = time.monotonic() + 30
        while f'"id":"{last_id}","message"' not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)

    assert Server(LineWriter(out), _FakeEngine).serve(commands()) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_the_server_answers_every_line_and_survives(tmp_path):
    good = GenerateRequest(prompt="a cat", out=str(tmp_path / "o.png"), width=64, height=64).to_dict()
    replies = _serve(
        [
            "[" * 100_000,  # a RecursionError in the JSON parser
            '{"type": "job", "id": "deep", "request": ' + "[" * 50_000 + "]" * 50_000 + "}",
            "[1, 2]",
            "not json",
            json.dumps({"type": "cancel", "id": "nobody"}),
            json.dumps({"type": "cancel", "id": {"a": [1]}}),
            json.dumps({"type": ["x"]}),
            json.dumps({"type": "job", "id": "list", "request": [1]}),
            json.dumps({"type": "job", "id": "boom", "request": good}),
        ],
        last_id="boom",
    )
    assert replies[0]["type"] == "ready" and replies[-1] == {"type": "bye"}
    errors = [r for r in replies if r["type"] == "error"]
    assert [r["id"] for r in errors[:6]] == [None] * 6
    assert {"type": "unknown-job", "id": "nobody"}.items() <= replies[5].items()
    by_job = {r["id"]: r["message"] for r in errors if r["id"] is not None}
    assert by_job["list"].startswith("The request is not a JSON object")
    assert (
        by_job["boom"]
        == "The engine failed unexpectedly (RuntimeError): the log has the details; please report it."
    )
    assert all("0xdeadbeef" not in r.get("message", "") for r in replies)


# ---- prompt tags stay inside the loras folder (item 11) and parse in linear time (item 16) ----


@pytest.fixture
def loras_dir(tmp_path) -> Path:
    folder = tmp_path / "models" / "loras"
    (folder / "sub").mkdir(parents=True)
    for path in (folder / "style.safetensors", folder / "sub" / "deep.safetensors", tmp_path / "x.safetensors",
                 tmp_path / "models" / "y.safetensors"):  # fmt: skip
        path.write_bytes(b"")
    return folder


@pytest.mark.parametrize(
    "name",
    ["../../x", "../y", "sub/../../y", "..\\..\\x", "/etc/passwd", "\\\\server\\share\\x", "PLACEHOLDER_ABSOLUTE"],
)  # fmt: skip
def test_prompt_tags_cannot_leave_the_loras_folder(loras_dir, tmp_path, name):
    from engine.formats.lora import prompt_loras

    name = str(tmp_path / "x") if name == "PLACEHOLDER_ABSOLUTE" else name
    with pytest.raises(UserError, match="in the prompt names"):
        prompt_loras(f"a cat <lora:{name}:0.5>", loras_dir)


@pytest.mark.parametrize("name", ["C:\\Windows\\x", "C:x", "//server/share/x", "", ".", "a\0b"])
def test_the_confinement_helper_refuses_drives_and_roots(tmp_path, name):
    from engine.paths import confined

    with pytest.raises(UserError, match="is not a plain name inside"):
        confined(tmp_path, name, "a test")


def test_a_link_out_of_the_loras_folder_is_refused(loras_dir, tmp_path):
    from engine.formats.lora import prompt_loras

    os.symlink(tmp_path / "x.safetensors", loras_dir / "outside.safetensors")
    with pytest.raises(UserError, match="leads outside"):
        prompt_loras("<lora:outside>", loras_dir)


def test_tags_inside_the_folder_still_work(loras_dir):
    from engine.formats.lora import prompt_loras

    prompt, specs = prompt_loras(
        "a cat <lora:style:0.5>, <LORA:deep> and <lora:sub/deep:2:ignored> end", loras_dir
    )
    assert prompt == "a cat, and end"
    assert specs == [
        LoraSpec(str(loras_dir / "style.safetensors"), 0.5),
        LoraSpec(str(loras_dir / "sub" / "deep.safetensors"), 1.0),
        LoraSpec(str(loras_dir / "sub" / "deep.safetensors"), 2.0),
    ]


@pytest.mark.parametrize(
    "prompt",
    [
        "<lora:" * 16_000,  # 96k characters, no `>`
        "<lora:a:b" * 10_700,  # tags with names and strengths, never closed
        "x<lora:" * 13_700,
        "<lora::" * 13_800 + ">",  # empty names, one `>` at the very end
    ],
    ids=["unclosed", "unclosed-with-strengths", "text-between", "empty-names"],
)
def test_tags_parse_in_linear_time(prompt):
    from engine.formats.lora import prompt_loras

    start = time.perf_counter()
    assert prompt_loras(prompt, None) == (prompt, [])
    assert time.perf_counter() - start < 0.2  # the old pattern took about 20 s on 96k characters


# ---- interrupted writes never leave a half-written file at the final name (item 3) ----


class _InterruptedImage:
    """Writes half a PNG, checks the final name is not there yet, then is interrupted (Ctrl+C)."""

    def __init__(self, final: Path):
        self.final = final

    def save(self, f, format, pnginfo):
        f.write(b"\x89PNG\r\n\x1a\n half of it")
        assert not self.final.exists() and Path(f.name).parent == self.final.parent
        raise KeyboardInterrupt


def test_an_interrupted_png_leaves_nothing(tmp_path):
    from engine.generation.png_output import save_png

    final = tmp_path / "out.png"
    with pytest.raises(KeyboardInterrupt):
        save_png(_InterruptedImage(final), final, "params", {"prompt": "x"})
    assert list(tmp_path.iterdir()) == []


def test_a_png_is_complete_or_absent_under_sigterm(tmp_path):
    """A real process killed by SIGTERM while it writes: the final name never holds a partial file."""
    final = tmp_path / "out.png"
    script = (
        "import sys, time; from engine.atomic_write import write_atomic\n"
        "def write(f):\n"
        "    f.write(b'partial'); f.flush(); print('writing', flush=True); time.sleep(60)\n"
        f"write_atomic({str(final)!r}, write)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "writing"
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    finally:
        process.kill()
    assert not final.exists()
    assert not any(p.suffix == ".png" for p in tmp_path.iterdir())


def test_atomic_writes_never_replace_unless_asked(tmp_path):
    from engine.atomic_write import write_atomic

    target = tmp_path / "a.png"
    target.write_bytes(b"first")
    with pytest.raises(FileExistsError):
        write_atomic(target, lambda f: f.write(b"second"))
    assert target.read_bytes() == b"first"
    write_atomic(target, lambda f: f.write(b"third"), overwrite=True)
    assert target.read_bytes() == b"third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_sigterm_interrupts_a_generation_like_ctrl_c():
    from engine.cli import _sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), _sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    assert signal.getsignal(signal.SIGTERM) is before
