"""`python -m engine generate|selftest|serve`: the headless engine. Progress on stderr; bad input is one sentence."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import traceback

from engine.contract.errors import UserError
from engine.contract.events import Done, Event, Message, Stage, Step
from engine.contract.request import GenerateRequest, LoraSpec, ModelFiles


def parse_lora(text: str) -> LoraSpec:
    """FILE[:STRENGTH]; a Windows drive letter's colon is not a strength."""
    path, sep, strength = text.rpartition(":")
    if sep and path and not strength.startswith(("\\", "/")):
        try:
            return LoraSpec(path, float(strength))
        except ValueError:
            pass
    return LoraSpec(text, 1.0)


class _Parser(argparse.ArgumentParser):
    """Bad flags are bad input too: one sentence and exit code 2, not the whole usage text."""

    def error(self, message: str):
        self.exit(2, f"error: {message}: see {self.prog} --help.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m engine", description="FluxDeck's FLUX.1 engine")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate images from a prompt")
    gen.add_argument("--prompt", required=True, help="the prompt (T5; also CLIP unless --clip-prompt)")
    gen.add_argument("--clip-prompt", help="a separate prompt for CLIP-L")
    gen.add_argument("--negative", help="negative prompt, used with --cfg above 1")
    gen.add_argument("--cfg", type=float, default=1.0, help="true CFG scale (1: off)")
    gen.add_argument("--width", type=int, default=1024)
    gen.add_argument("--height", type=int, default=1024)
    gen.add_argument("--steps", type=int, help="default: 28 for [dev], 4 for [schnell]")
    gen.add_argument("--guidance", type=float, default=3.5, help="distilled guidance ([dev])")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch", type=int, default=1)
    gen.add_argument("--shift", default="auto", help="auto, none, or the shift's mu")
    gen.add_argument("--init-image", help="img2img: the starting image")
    gen.add_argument("--denoise", type=float, default=1.0, help="img2img strength (1: ignore the image)")
    gen.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]")
    gen.add_argument("--checkpoint", help="an all-in-one checkpoint (transformer, CLIP, T5 and VAE)")
    gen.add_argument("--transformer", help="the FLUX transformer (diffusion model) file")
    gen.add_argument("--clip", help="the CLIP-L text encoder file")
    gen.add_argument("--t5", help="the T5-XXL text encoder file")
    gen.add_argument("--vae", help="the autoencoder file (ae.safetensors)")
    gen.add_argument("--models-dir", help="a models folder in the ComfyUI layout")
    gen.add_argument("--clip-tokenizer", help="folder with the CLIP tokenizer")
    gen.add_argument("--t5-tokenizer", help="folder with the T5 tokenizer")
    gen.add_argument("--t5-max-length", type=int, help="T5 tokens: default 512 for [dev], 256 for [schnell]")
    gen.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    gen.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    gen.add_argument("--vram-budget", type=float, help="GB of weights to keep on the GPU")
    gen.add_argument(
        "--cache",
        default="none",
        metavar="none|first-block[:THRESHOLD]",
        help="step caching: skip most of the transformer on steps whose first block barely changed "
        "(faster, slightly different image; default threshold 0.12)",
    )
    gen.add_argument(
        "--out", required=True, help="the PNG to write (never overwritten: a free name is picked)"
    )

    test = sub.add_parser("selftest", help="run the whole path on a tiny random model")
    test.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    sub.add_parser("serve", help="JSON-lines engine for the TUI (stdin/stdout)")
    return parser


def request_from_args(args: argparse.Namespace) -> GenerateRequest:
    files = ModelFiles(
        checkpoint=args.checkpoint,
        transformer=args.transformer,
        clip=args.clip,
        t5=args.t5,
        vae=args.vae,
        models_dir=args.models_dir,
        clip_tokenizer=args.clip_tokenizer,
        t5_tokenizer=args.t5_tokenizer,
    )
    if not (
        files.checkpoint or files.models_dir or all([files.transformer, files.clip, files.t5, files.vae])
    ):
        raise UserError(
            "Say where the model is: --checkpoint FILE, --models-dir DIR, or all of --transformer --clip --t5 --vae."
        )
    return GenerateRequest(
        prompt=args.prompt,
        clip_prompt=args.clip_prompt,
        negative=args.negative,
        cfg=args.cfg,
        width=args.width,
        height=args.height,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        batch=args.batch,
        shift=args.shift,
        init_image=args.init_image,
        denoise=args.denoise,
        loras=[parse_lora(text) for text in args.lora],
        files=files,
        t5_max_length=args.t5_max_length,
        device=args.device,
        dtype=args.dtype,
        vram_budget=args.vram_budget,
        cache=args.cache,
        out=args.out,
    )


class StderrProgress:
    """Prints stages, each step with its s/it, and a closing line with the total time and the mean s/it."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr

    def __call__(self, event: Event) -> None:
        if isinstance(event, Stage):
            print(f"[{event.stage}] {event.detail}".rstrip(), file=self.stream, flush=True)
        elif isinstance(event, Step):
            print(
                f"  step {event.step}/{event.total}  {event.seconds_per_it:.3f} s/it"
                + ("  (cached)" if event.cached else ""),
                file=self.stream,
                flush=True,
            )
        elif isinstance(event, Message):
            print(f"  note: {event.text}", file=self.stream, flush=True)
        elif isinstance(event, Done):
            print(
                f"[done] {event.seconds:.2f} s in all, {event.mean_seconds_per_it:.3f} s/it mean: {', '.join(event.paths)}",
                file=self.stream,
                flush=True,
            )


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM ends a generation as Ctrl+C does (a KeyboardInterrupt), so that a file being written is removed
    rather than left behind under its temporary name; the previous handler comes back afterwards."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            from engine.server import main as serve

            return serve([])
        if args.command == "selftest":
            from engine.selftest import run_selftest

            return run_selftest(args.device)
        from engine.generation.pipeline import Engine, EngineOptions, default_cache_dir

        request = request_from_args(args)
        engine = Engine(EngineOptions(cache_dir=str(default_cache_dir())))
        with _sigterm_as_interrupt():
            paths = engine.generate(request, StderrProgress())
        for path in paths:
            print(path)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: say so plainly, keep the details for the report
        traceback.print_exc()
        print(
            f"error: the engine failed unexpectedly ({type(e).__name__}: {e}); please report it.",
            file=sys.stderr,
        )
        return 1
