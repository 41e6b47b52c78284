"""`python -m bootstrap env|download|verify|list|wizard|bundle`. Exit codes as the engine's: bad input (a
BootstrapError, a folder that cannot be written, a wrong flag) is one sentence and 2; files that failed to download
or verify are 1; Ctrl+C is 130. No answer at a prompt (its input ended) is one sentence and 2, Ctrl+C there 130.

Only the standard library is imported here: `env` must run on a Python that has nothing installed yet.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bootstrap.errors import BootstrapError, InputEnded

BAD_INPUT = 2  # as the engine's UserError and argparse's own errors
INTERRUPTED = 130  # Ctrl+C, as a shell reports SIGINT


def _minutes(text: str) -> float:
    """--max-minutes: a finite number of minutes from 0.1 to a day."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.1 <= value <= 1440:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of minutes from 0.1 to 1440")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bootstrap", description="FluxDeck's setup: environment, models, bundle"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    env = sub.add_parser("env", help="build or check the Python environment (a no-op when it is ready)")
    device = env.add_mutually_exclusive_group()
    device.add_argument(
        "--gpu", dest="device", action="store_const", const="gpu", help="insist on a CUDA torch"
    )
    device.add_argument("--cpu", dest="device", action="store_const", const="cpu", help="run on the CPU")
    env.add_argument("--which", action="store_true", help="print the environment's python and exit")
    env.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    env.add_argument(
        "--target", choices=("windows", "linux"), help="plan for this OS (the bundle is built on Linux)"
    )
    env.add_argument("--no-selftest", action="store_true", help="skip the engine's selftest")
    env.add_argument("--requirements", type=Path, help="the dependency list (default: requirements.txt)")

    def model_args(p: argparse.ArgumentParser, names_help: str) -> None:
        p.add_argument("names", nargs="*", metavar="NAME", help=names_help)
        p.add_argument("--preset", action="append", default=[], help="a preset's files (repeatable)")
        p.add_argument("--models-dir", type=Path, help="default: models_dir of config.toml, else ./models")
        p.add_argument("--manifest", type=Path, help="default: bootstrap/manifest.toml")

    model_args(sub.add_parser("download", help="download and verify model files"), "file names or @groups")
    model_args(
        sub.add_parser("verify", help="re-hash model files against the manifest"),
        "default: every file present",
    )

    listing = sub.add_parser("list", help="the manifest's files and presets")
    listing.add_argument("--manifest", type=Path)

    fits = sub.add_parser("fit", help="each preset's verdict and time estimate on this machine")
    fits.add_argument("--manifest", type=Path)
    fits.add_argument("--models-dir", type=Path, help="where the downloads would go (for the free disk)")
    fits.add_argument("--cpu", action="store_true", help="as if the engine ran on the CPU (the TUI's --cpu)")
    fits.add_argument("--max-minutes", type=_minutes, default=None, metavar="M")
    fits.add_argument("--json", action="store_true", help="one JSON object per preset (the TUI reads these)")

    wizard = sub.add_parser("wizard", help="choose and download a model set for this machine")
    wizard.add_argument("--models-dir", type=Path)
    wizard.add_argument("--manifest", type=Path)
    wizard.add_argument("--config", type=Path, help="default: config.toml at the project root")
    wizard.add_argument("--yes", action="store_true", help="take the recommendation without asking")
    wizard.add_argument(
        "--max-minutes",
        type=_minutes,
        default=None,
        metavar="M",
        help="the time an image may take: the recommendation stays within it (default 5)",
    )

    bundle = sub.add_parser("bundle", help="write <out>/<name>-windows-portable.7z")
    bundle.add_argument("--out", type=Path, default=None, help="default: dist/")
    embed = bundle.add_mutually_exclusive_group()
    embed.add_argument(
        "--python-embed",
        type=Path,
        help="the official embeddable Python (.zip or folder) to include (default: the manifest's pinned one, "
        "downloaded and verified)",
    )
    embed.add_argument("--no-python-embed", action="store_true", help="a bundle without python_embeded/")
    return parser


def main(argv: list[str] | None = None) -> int:
    from bootstrap.console import console_modes

    args = build_parser().parse_args(argv)
    try:
        with console_modes():  # Windows: progress redraws, a click does not freeze pip or a download
            return COMMANDS[args.command](args)
    except InputEnded as exc:  # no answer at a prompt: how to come back, not an error with a traceback
        print(_no_choice(args.command, exc.interrupted), file=sys.stderr)
        return INTERRUPTED if exc.interrupted else BAD_INPUT
    except BootstrapError as exc:
        print(f"error: {_printable(exc)}", file=sys.stderr)
        return BAD_INPUT
    except PermissionError as exc:  # a folder the user cannot write to (Program Files, a read-only share)
        where = exc.filename or "a file"
        print(
            f"error: {where} cannot be written (permission denied): move FluxDeck to a folder you own, such as "
            "C:\\FluxDeck, or choose another --models-dir.",
            file=sys.stderr,
        )
        return BAD_INPUT
    except KeyboardInterrupt:
        print("stopped: run the same command again to continue where it left off.", file=sys.stderr)
        return INTERRUPTED


def _no_choice(command: str, interrupted: bool) -> str:
    """e.g. 'No choice made; run the wizard again with `.venv/bin/python -m bootstrap wizard` (or start
    run_gpu or run_cpu again) when ready.'"""
    python = sys.executable or "python"
    python = f'"{python}"' if " " in python else python
    start = "Stopped at the question, no choice made" if interrupted else "No choice made"
    return (
        f"{start}; run the {command} again with `{python} -m bootstrap {command}` (or start run_gpu or run_cpu "
        "again) when ready."
    )


def _printable(text: object) -> str:
    """What a manifest, a server or a file system said, with control characters escaped (no terminal codes)."""
    from bootstrap.untrusted import printable

    return printable(text)


def _models_dir(given: Path | None) -> Path:
    from bootstrap.config_file import ProjectConfig

    return given if given is not None else ProjectConfig.load().models_dir


def cmd_env(args: argparse.Namespace) -> int:
    from bootstrap.preflight import python_problem

    problem = None if args.which or args.target else python_problem()
    if problem:
        raise BootstrapError(problem)
    from bootstrap.environment import EnvOptions, build_environment, environment_python

    options = EnvOptions(device=args.device or "auto", selftest=not args.no_selftest)
    if args.requirements:
        options.requirements = args.requirements
    if args.which:
        print(environment_python(options))
        return 0
    return build_environment(options, dry_run=args.dry_run, target=args.target)


def cmd_download(args: argparse.Namespace) -> int:
    from bootstrap.download import Downloader
    from bootstrap.manifest import load_manifest
    from bootstrap.progress import TerminalProgress

    manifest = load_manifest(args.manifest)
    if not args.names and not args.preset:
        raise BootstrapError(
            f"Name the files to download, or a --preset: one of {', '.join(manifest.presets)} (`python -m bootstrap list`)."
        )
    files = manifest.select(args.names, args.preset)
    models_dir = _models_dir(args.models_dir)
    downloader = Downloader(
        models_dir, progress=TerminalProgress(), say=lambda text: print(_printable(text), file=sys.stderr)
    )
    outcomes, errors = downloader.ensure(files)
    for outcome in outcomes:
        word = "already verified" if outcome.status == "present" else "downloaded and verified"
        print(_printable(f"{outcome.file.name}: {word}: {outcome.path}"))
    for error in errors:
        print(f"error: {_printable(error)}", file=sys.stderr)
    return 1 if errors else 0


def cmd_verify(args: argparse.Namespace) -> int:
    from bootstrap.checks import verify_files
    from bootstrap.manifest import load_manifest
    from bootstrap.progress import TerminalProgress

    manifest = load_manifest(args.manifest)
    explicit = bool(args.names or args.preset)
    files = manifest.select(args.names, args.preset) if explicit else list(manifest.files.values())
    results = verify_files(_models_dir(args.models_dir), files, explicit, TerminalProgress())
    for result in results:
        print(_printable(result.line()))
    if not results:
        print("no manifest file is present in the models folder.")
    return 0 if all(r.ok for r in results) else 1


def cmd_list(args: argparse.Namespace) -> int:
    from bootstrap.manifest import load_manifest
    from bootstrap.progress import human_bytes

    manifest = load_manifest(args.manifest)
    print("presets:")
    for preset in manifest.presets.values():
        tags = [t for t in (preset.family, preset.kind) if t not in ("flux1", "txt2img")]
        tag = f" [{', '.join(tags)}]" if tags else ""
        print(
            _printable(
                f"  {preset.name:<16} {preset.title}{tag} ({preset.disk_gb:g} GB, {preset.steps} steps)"
            )
        )
    print("files:")
    for f in manifest.files.values():
        size = human_bytes(f.size) if f.size else "size from the hub"
        flags = " gated" if f.gated else ""
        print(_printable(f"  {f.name:<30} {f.relpath:<52} {size}{flags}"))
    for group, names in manifest.groups.items():
        print(_printable(f"  @{group}: {', '.join(names)}"))
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from bootstrap import fit, wizard
    from bootstrap.hardware import detect_system
    from bootstrap.manifest import load_manifest

    manifest = load_manifest(args.manifest)
    system = detect_system(_models_dir(args.models_dir))
    if args.cpu:
        system = dataclasses.replace(system, gpu=None)
    speed = fit.machine_speed(lambda text: print(_printable(text), file=sys.stderr))
    found = wizard.verdicts(manifest, system, speed)
    limit = wizard.DEFAULT_MAX_MINUTES if args.max_minutes is None else args.max_minutes
    best, why = wizard.recommend(manifest, system, speed, limit, found)
    if not args.json:
        print(_printable(wizard.describe_system(system)))
    for name, verdict in found.items():
        if args.json:
            row = {"preset": name, "title": verdict.preset.title, "disk_gb": verdict.preset.disk_gb,
                   "fits": verdict.fits, "verdict": verdict.text(), "recommended": name == best.name,
                   "image_seconds": verdict.image_seconds}  # fmt: skip
            print(json.dumps(row))
        else:
            star = " (recommended)" if name == best.name else ""
            print(_printable(f"  {name}{star} - {wizard.explain(verdict, manifest)}"))
    if not args.json:
        print(_printable(f"Recommended: {best.name}, {why}."))
    return 0


def cmd_wizard(args: argparse.Namespace) -> int:
    from bootstrap.wizard import TerminalIO, run_wizard

    return run_wizard(
        TerminalIO(),
        models_dir=args.models_dir,
        manifest_path=args.manifest,
        config_path=args.config,
        assume_yes=args.yes,
        **({} if args.max_minutes is None else {"max_minutes": args.max_minutes}),
    )


def cmd_bundle(args: argparse.Namespace) -> int:
    from bootstrap.bundle import BundleOptions, build_bundle

    options = BundleOptions(python_embed=args.python_embed)
    if args.out is not None:
        options.out_dir = args.out
    if options.python_embed is None and not args.no_python_embed:
        from bootstrap import python_embed

        options.python_embed = python_embed.fetch(python_embed.load_pin(), options.out_dir / "downloads")
    archive = build_bundle(options)
    print(archive)
    return 0


COMMANDS = {
    "env": cmd_env,
    "download": cmd_download,
    "verify": cmd_verify,
    "list": cmd_list,
    "fit": cmd_fit,
    "wizard": cmd_wizard,
    "bundle": cmd_bundle,
}
