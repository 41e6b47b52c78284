"""`python -m engine generate|selftest|serve`: the headless engine. Progress on stderr; bad input is one sentence."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import sys
import threading
import traceback
import typing
from pathlib import Path

from engine.contract.errors import UserError
from engine.contract.request import DEVICES, Flag, GenerateRequest


class _Parser(argparse.ArgumentParser):
    """Bad flags are bad input too: one sentence and exit code 2, not the whole usage text."""

    def error(self, message: str):
        self.exit(2, f"error: {message}: see {self.prog} --help.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m engine", description="FluxDeck's FLUX.1 engine")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate images from a prompt")
    add_request_flags(gen, GenerateRequest)

    test = sub.add_parser("selftest", help="run the whole path on a tiny random model")
    test.add_argument("--device", default="auto", choices=list(DEVICES))
    test.add_argument(
        "--speed-file",
        type=Path,
        default=None,
        help="where to save this machine's measured speed (default: logs/speed.json in the project folder)",
    )
    test.add_argument("--no-speed", action="store_true", help="skip the speed measurement")

    sub.add_parser("serve", help="JSON-lines engine for the TUI (stdin/stdout)")
    return parser


def _request_flags(cls) -> list[tuple[Flag, dataclasses.Field, type]]:
    """(flag, field, type) of each flag of a request dataclass, in field order: a dataclass field without a Flag
    (GenerateRequest.files) gives its own fields' flags; any other field without one is not on the command line."""
    hints = typing.get_type_hints(cls)
    found = []
    for item in dataclasses.fields(cls):
        spec = item.metadata.get("flag")
        if spec is None and dataclasses.is_dataclass(hints[item.name]):
            found += _request_flags(hints[item.name])
        elif spec is not None:
            found.append((spec, item, hints[item.name]))
    return found


def add_request_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field, from the field: its default (required when it has none), its type, its Flag."""
    for spec, item, kind in _request_flags(cls):
        options: dict = {"dest": item.name, "help": spec.help, "metavar": spec.metavar}
        if typing.get_origin(kind) is list:
            options.update(action="append", default=[])
        else:
            if item.default is dataclasses.MISSING:
                options["required"] = True
            else:
                options["default"] = item.default
            number = [t for t in typing.get_args(kind) or (kind,) if t in (int, float)]
            if number:
                options["type"] = number[0]
            if spec.choices is not None:
                options["choices"] = list(spec.choices)
        parser.add_argument(spec.flag_of(item.name), **{k: v for k, v in options.items() if v is not None})


def _from_args(cls, args: argparse.Namespace):
    """The dataclass from the flags add_request_flags made (a field without a flag keeps its default)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for item in dataclasses.fields(cls):
        spec = item.metadata.get("flag")
        if spec is None and dataclasses.is_dataclass(hints[item.name]):
            values[item.name] = _from_args(hints[item.name], args)
        elif spec is not None:
            given = getattr(args, item.name)
            values[item.name] = [spec.parse(text) for text in given] if spec.parse is not None else given
    return cls(**values)


def request_from_args(args: argparse.Namespace) -> GenerateRequest:
    request = _from_args(GenerateRequest, args)
    request.files.check_given()
    return request


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
            from engine.runtime.speed import DEFAULT_FILE
            from engine.selftest import run_selftest

            return run_selftest(args.device, None if args.no_speed else (args.speed_file or DEFAULT_FILE))
        from engine.generation.pipeline import Engine, EngineOptions, default_cache_dir
        from engine.progress import StderrProgress

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
