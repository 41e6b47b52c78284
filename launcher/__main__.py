"""python -m launcher: the FluxDeck TUI."""

from __future__ import annotations

import sys

from launcher.cli import parse_args


def main(argv: list[str] | None = None) -> int:
    from launcher.config import ConfigError

    try:
        return _main(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    options = parse_args(argv)
    if options.check_models:
        from launcher.config import ConfigFile
        from launcher.models import has_any_model

        settings = ConfigFile.load(options.config).settings
        if options.models_dir:
            settings.models_dir = options.models_dir
        return 0 if has_any_model(settings.model_roots()) else 3
    # textual-image probes the terminal (sixel / kitty, cell size) when imported: before the app starts.
    import textual_image.widget  # noqa: F401

    from bootstrap.console import console_modes
    from launcher.app import FluxDeckApp
    from launcher.config import ConfigFile

    app = FluxDeckApp(options, ConfigFile.load(options.config))
    try:
        with console_modes():  # Windows: QuickEdit off while the TUI runs (a click would freeze it), VT on
            app.run()
    finally:
        app.engine.stop(timeout=5.0)
    return app.return_code or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
