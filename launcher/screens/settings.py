"""Settings saved to config.toml: VRAM budget, device, dtype, folders, extra model paths."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Input, Label, Select, Static, Switch

from engine.contract.request import parse_cache
from launcher.config import DEVICES, DTYPES, Settings
from launcher.keymap import KEYS
from launcher.limits import FormError, parse_number
from launcher.messages import SettingsSaved


class SettingsScreen(Screen):
    BINDINGS = [KEYS.binding("save_settings", "save", "Save")]
    DEFAULT_CSS = """
    SettingsScreen #title { height: 1; padding: 0 1; background: $panel; }
    SettingsScreen VerticalScroll { padding: 0 2; }
    SettingsScreen Label { color: $text-muted; margin-top: 1; }
    SettingsScreen Input, SettingsScreen Select { width: 80; }
    """

    def __init__(self, settings: Settings, path: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self._settings = settings
        self._path = path

    def compose(self) -> ComposeResult:
        s = self._settings
        yield Static(f"Settings (saved to {self._path})", id="title")
        with VerticalScroll():
            yield Label("VRAM budget in GB for weights kept on the GPU (empty: automatic)")
            yield Input(
                "" if s.vram_budget is None else f"{s.vram_budget:g}", id="vram_budget", type="number"
            )
            yield Label("Device")
            yield Select([(d, d) for d in DEVICES], value=s.device, allow_blank=False, id="device")
            yield Label("Weights dtype")
            yield Select([(d, d) for d in DTYPES], value=s.dtype, allow_blank=False, id="dtype")
            yield Label("Models folder (ComfyUI layout)")
            yield Input(s.models_dir, id="models_dir")
            yield Label("Extra model folders, separated by ';'")
            yield Input("; ".join(s.extra_model_paths), id="extra_model_paths")
            yield Label("Outputs folder")
            yield Input(s.output_dir, id="output_dir")
            yield Label("Live preview every step")
            yield Switch(s.live_preview, id="live_preview")
            yield Label(
                "Step cache: none, or first-block[:THRESHOLD] (faster, slightly different images; 0.12)"
            )
            yield Input(s.cache, id="cache")
        yield Footer()

    def read(self) -> Settings:
        text = {field.id: field.value.strip() for field in self.query(Input) if field.id}
        budget = (
            None
            if not text["vram_budget"]
            else float(parse_number(text["vram_budget"], float, "VRAM budget", 0))
        )
        try:
            parse_cache(text["cache"])
        except ValueError:
            raise FormError(
                f"Step cache {text['cache']!r} is not valid: use none, first-block or first-block:T (T from 0 to 1)."
            ) from None
        if not text["models_dir"] or not text["output_dir"]:
            raise FormError("The models and outputs folders cannot be empty: give a folder path.")
        return Settings(
            models_dir=text["models_dir"],
            output_dir=text["output_dir"],
            extra_model_paths=[p.strip() for p in text["extra_model_paths"].split(";") if p.strip()],
            device=str(self.query_one("#device", Select).value),
            dtype=str(self.query_one("#dtype", Select).value),
            vram_budget=budget,
            live_preview=self.query_one("#live_preview", Switch).value,
            cache=text["cache"],
        )

    def action_save(self) -> None:
        try:
            settings = self.read()
        except FormError as error:
            self.notify(str(error), severity="error", markup=False)
            return
        self.post_message(SettingsSaved(settings))
