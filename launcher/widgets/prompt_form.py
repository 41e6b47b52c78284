"""The generate form: prompts, model, size, sampling, seed, batch / seed hunt, img2img, LoRAs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.reactive import var
from textual.widgets import Checkbox, Input, Label, Select, Static, TextArea

from engine.contract.request import SIZE_MULTIPLE
from launcher import controlnets
from launcher.controlnets import ControlNetChoice, ControlNetFile, ControlNetValue
from launcher.form import AUTO_MODEL, FormValues
from launcher.keymap import KEYS
from launcher.limits import RANGES, FormError, parse_number
from launcher.loras import STRENGTH_RANGE, LoraChoice, LoraFile, choose, lora_label, match_loras, summary
from launcher.models import InstalledFile, defaults_for_file, family_for_file
from launcher.seeds import SeedMode
from launcher.sizes import ASPECTS, MEGAPIXELS, aspect_label, parse_aspect, size_for

CUSTOM = "custom"


class PromptForm(VerticalScroll):
    DEFAULT_CSS = """
    PromptForm { width: 64; min-width: 48; border-right: tall $panel; padding: 0 1; }
    PromptForm #prompt { height: 6; margin-bottom: 1; }
    PromptForm .row { height: 1; margin-bottom: 1; }
    PromptForm .row > Label { width: 12; color: $text-muted; }
    PromptForm .row > .gap { width: auto; padding: 0 1; color: $text-muted; }
    PromptForm .row > Input, PromptForm .row > Select { width: 1fr; background: $boost; }
    PromptForm .row > .short { width: 8; }
    PromptForm .row > Checkbox { width: auto; }
    PromptForm .title { color: $text-muted; }
    PromptForm .row > #loras, PromptForm .row > #controlnets { width: 1fr; }
    PromptForm #family { color: $text-muted; margin-bottom: 1; width: 100%; }
    """

    models: var[list[InstalledFile]] = var(list, init=False)  # the model files the model choice offers

    def __init__(
        self,
        values: FormValues,
        models: list[InstalledFile],
        find_loras: Callable[[], list[LoraFile]] = list,
        lora_key: str = KEYS.loras,
        find_controlnets: Callable[[], list[ControlNetFile]] = list,
        controlnet_key: str = KEYS.controlnets,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self._initial = values
        self.set_reactive(PromptForm.models, models)
        self._model = self._model_value(values.model)
        self.find_loras = find_loras
        self._lora_key = lora_key  # the key that opens the LoRA panel, for the hint
        # path -> on/off and strength, for every LoRA seen this session (the LoRA panel edits it in place)
        self.lora_choices: dict[str, LoraChoice] = {}
        choose(self.lora_choices, values.loras)
        self.find_controlnets = find_controlnets
        self._controlnet_key = controlnet_key
        # path -> the ControlNet panel's fields for every ControlNet seen this session (edited in place)
        self.controlnet_choices: dict[str, ControlNetChoice] = {}

    def compose(self) -> ComposeResult:
        v = self._initial
        yield Label("Prompt (T5)", classes="title")
        yield TextArea(v.prompt, id="prompt", soft_wrap=True, show_line_numbers=False, tab_behavior="focus")
        with Horizontal(classes="row"):
            yield Label("CLIP prompt")
            yield Input(
                v.clip_prompt, id="clip_prompt", placeholder="empty: same as the prompt", compact=True
            )
        with Horizontal(classes="row"):
            yield Label("Negative")
            yield Input(
                v.negative, id="negative", placeholder="used when CFG > 1", disabled=v.cfg <= 1, compact=True
            )
        with Horizontal(classes="row"):
            yield Label("Model")
            yield Select(
                self._model_options(), value=self._model, allow_blank=False, id="model", compact=True
            )
        yield Label(self._family_text(self._model), id="family", markup=False)
        with Horizontal(classes="row"):
            yield Label("Size")
            aspects = [(aspect_label(a), aspect_label(a)) for a in ASPECTS] + [("custom", CUSTOM)]
            yield Select(aspects, value=CUSTOM, allow_blank=False, id="aspect", compact=True)
            yield Label("", classes="gap")
            megapixels = [(f"{mp:g} MP", mp) for mp in MEGAPIXELS]
            yield Select(megapixels, value=1.0, allow_blank=False, id="megapixels", compact=True)
            yield Label("", classes="gap")
            yield Input(str(v.width), id="width", type="integer", classes="short", compact=True)
            yield Label("x", classes="gap")
            yield Input(str(v.height), id="height", type="integer", classes="short", compact=True)
        with Horizontal(classes="row"):
            yield Label("Steps")
            yield Input(str(v.steps), id="steps", type="integer", classes="short", compact=True)
            yield Label("Guidance", classes="gap")
            yield Input(f"{v.guidance:g}", id="guidance", type="number", classes="short", compact=True)
            yield Label("CFG", classes="gap")
            yield Input(f"{v.cfg:g}", id="cfg", type="number", classes="short", compact=True)
        with Horizontal(classes="row"):
            yield Label("Seed")
            yield Input(str(v.seed), id="seed", type="integer", compact=True)
            yield Label("", classes="gap")
            modes = [
                ("+1 per image", SeedMode.INCREMENT),
                ("fixed", SeedMode.FIXED),
                ("random", SeedMode.RANDOM),
            ]
            yield Select(modes, value=v.seed_mode, allow_blank=False, id="seed_mode", compact=True)
        with Horizontal(classes="row"):
            yield Label("Images")
            yield Input(str(v.batch), id="batch", type="integer", classes="short", compact=True)
            yield Label("", classes="gap")
            yield Checkbox("seed hunt: keep going until escape", v.hunt, id="hunt", compact=True)
        with Horizontal(classes="row"):
            yield Label("Init image")
            yield Input(v.init_image, id="init_image", placeholder="img2img: a PNG or JPEG", compact=True)
            yield Label("Denoise", classes="gap")
            yield Input(f"{v.denoise:g}", id="denoise", type="number", classes="short", compact=True)
        with Horizontal(classes="row"):
            yield Label("LoRAs")
            yield Static(self._lora_summary(), id="loras", markup=False)
        with Horizontal(classes="row"):
            yield Label("ControlNets")
            yield Static(self._controlnet_summary(), id="controlnets", markup=False)

    # -- models ---------------------------------------------------------------------------------------
    def _model_options(self) -> list[tuple[str, str]]:
        options = [("auto: the model in the models folder", AUTO_MODEL)]
        options += [(f"{m.path.name} ({m.folder})", str(m.path)) for m in self.models if m.is_model]
        return options

    def _model_value(self, model: str) -> str:
        known = {value for _, value in self._model_options()}
        return model if model in known else AUTO_MODEL

    def watch_models(self) -> None:
        if not self.is_mounted:
            return
        select = self.query_one("#model", Select)
        current = select.value
        with self.prevent(Select.Changed):
            select.set_options(self._model_options())
            self._model = self._model_value(str(current))
            select.value = self._model

    @staticmethod
    def _family_text(model: str) -> str:
        """The chosen file's family and the defaults it brings (read from its tensor names)."""
        if model == AUTO_MODEL:
            return "family: read by the engine from the models folder"
        return family_for_file(model).describe()

    # -- ControlNets -----------------------------------------------------------------------------------
    def _controlnet_summary(self) -> str:
        return f"{controlnets.summary(self.controlnet_choices)} · {self._controlnet_key}: choose"

    def refresh_controlnets(self) -> None:
        self.query_one("#controlnets", Static).update(self._controlnet_summary())

    def controlnet_values(self) -> list[ControlNetValue]:
        """The enabled ControlNets, checked; FormError names the first field that does not pass."""
        return controlnets.checked(self.controlnet_choices)

    def set_controlnets(self, wanted: list[tuple[str, ControlNetChoice]]) -> list[str]:
        """Turn on exactly these ControlNets (those whose files are here); returns the names of the missing."""
        found, missing = controlnets.match(wanted, self.find_controlnets())
        controlnets.choose(self.controlnet_choices, found)
        self.refresh_controlnets()
        return missing

    # -- LoRAs ----------------------------------------------------------------------------------------
    def _lora_summary(self) -> str:
        return f"{summary(self.lora_choices)} · {self._lora_key}: choose"

    def refresh_loras(self) -> None:
        """Show the LoRA choices (after the LoRA panel changed them)."""
        self.query_one("#loras", Static).update(self._lora_summary())

    def lora_values(self) -> list[tuple[str, float]]:
        """(path, strength) of the enabled LoRAs; FormError for a strength that does not parse or a lost file."""
        low, high = STRENGTH_RANGE
        loras = []
        for path, choice in self.lora_choices.items():
            if not choice.enabled:
                continue
            name = lora_label(path)
            if not Path(path).is_file():
                raise FormError(f"LoRA {name} is no longer at {path}: turn it off in the LoRA panel.")
            strength = float(parse_number(choice.strength, float, f"Strength of LoRA {name}", low, high))
            loras.append((path, strength))
        return loras

    def set_loras(self, loras: list[tuple[str, float]]) -> list[str]:
        """Turn on exactly these LoRAs (those whose files exist here); returns the names of the missing ones."""
        found, missing = match_loras(loras, self.find_loras())
        choose(self.lora_choices, found)
        self.refresh_loras()
        return missing

    # -- values ----------------------------------------------------------------------------------------
    def values(self) -> FormValues:
        """The form as FormValues; FormError names the first field that does not parse."""
        text = {field.id: field.value for field in self.query(Input) if field.id}

        def number(name: str, label: str) -> float:
            kind, low, high = RANGES[name]
            return parse_number(text[name], kind, label, low, high)

        width, height = int(number("width", "Width")), int(number("height", "Height"))
        for name, value in (("Width", width), ("Height", height)):
            if value % SIZE_MULTIPLE:
                raise FormError(
                    f"{name} {value} is not a multiple of {SIZE_MULTIPLE}: "
                    f"try {round(value / SIZE_MULTIPLE) * SIZE_MULTIPLE}."
                )
        init_image = text["init_image"].strip()
        if init_image and not Path(init_image).expanduser().is_file():
            raise FormError(f"Init image {init_image} does not exist: give the path of a PNG or JPEG.")
        return FormValues(
            prompt=self.query_one("#prompt", TextArea).text.strip(),
            clip_prompt=text["clip_prompt"].strip(),
            negative=text["negative"].strip(),
            model=str(self.query_one("#model", Select).value),
            width=width,
            height=height,
            steps=int(number("steps", "Steps")),
            guidance=float(number("guidance", "Guidance")),
            cfg=float(number("cfg", "CFG")),
            seed=int(number("seed", "Seed")),
            seed_mode=SeedMode(self.query_one("#seed_mode", Select).value),
            batch=int(number("batch", "Images per press")),
            hunt=self.query_one("#hunt", Checkbox).value,
            init_image=str(Path(init_image).expanduser()) if init_image else "",
            denoise=float(number("denoise", "Denoise")),
            loras=self.lora_values(),
            controlnets=self.controlnet_values(),
        )

    def set_values(self, v: FormValues) -> list[str]:
        """Fill the form; returns the names of LoRAs asked for whose files are not here (left off)."""
        with self.prevent(Select.Changed, Input.Changed, Checkbox.Changed):
            self.query_one("#prompt", TextArea).text = v.prompt
            for name in ("clip_prompt", "negative", "init_image"):
                self.query_one(f"#{name}", Input).value = getattr(v, name)
            for name in ("width", "height", "steps", "seed", "batch"):
                self.query_one(f"#{name}", Input).value = str(getattr(v, name))
            for name in ("guidance", "cfg", "denoise"):
                self.query_one(f"#{name}", Input).value = f"{getattr(v, name):g}"
            self._model = self._model_value(v.model)
            self.query_one("#model", Select).value = self._model
            self.query_one("#family", Label).update(self._family_text(self._model))
            self.query_one("#seed_mode", Select).value = v.seed_mode
            self.query_one("#hunt", Checkbox).value = v.hunt
            self.query_one("#aspect", Select).value = CUSTOM
        self.query_one("#negative", Input).disabled = v.cfg <= 1
        return self.set_loras(v.loras)

    def set_seed(self, seed: int) -> None:
        self.query_one("#seed", Input).value = str(seed)

    def set_hunt(self, hunt: bool) -> None:
        self.query_one("#hunt", Checkbox).value = hunt

    @property
    def hunt(self) -> bool:
        return self.query_one("#hunt", Checkbox).value

    # -- reactions -------------------------------------------------------------------------------------
    @on(Select.Changed, "#model")
    def _model_changed(self, event: Select.Changed) -> None:
        if str(event.value) == self._model:
            return  # the initial value, or set by set_values: keep the steps and guidance
        self._model = str(event.value)
        defaults = defaults_for_file(str(event.value))
        self.query_one("#steps", Input).value = str(defaults.steps)
        self.query_one("#guidance", Input).value = f"{defaults.guidance:g}"
        self.query_one("#family", Label).update(self._family_text(self._model))

    @on(Select.Changed, "#aspect")
    @on(Select.Changed, "#megapixels")
    def _size_preset(self) -> None:
        aspect = self.query_one("#aspect", Select).value
        if aspect == CUSTOM:
            return
        width, height = size_for(
            parse_aspect(str(aspect)), float(self.query_one("#megapixels", Select).value)
        )
        with self.prevent(Input.Changed):
            self.query_one("#width", Input).value = str(width)
            self.query_one("#height", Input).value = str(height)

    @on(Input.Changed, "#width")
    @on(Input.Changed, "#height")
    def _free_size(self) -> None:
        with self.prevent(Select.Changed):
            self.query_one("#aspect", Select).value = CUSTOM

    @on(Input.Changed, "#cfg")
    def _cfg_changed(self, event: Input.Changed) -> None:
        try:
            cfg = float(event.value)
        except ValueError:
            return
        self.query_one("#negative", Input).disabled = cfg <= 1
