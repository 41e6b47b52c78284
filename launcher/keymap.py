"""Every key the TUI answers to, in one dataclass; config.toml's [keys] table overrides them by id."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from textual.binding import Binding


@dataclass(frozen=True)
class Keymap:
    # anywhere
    generate: str = "ctrl+g"
    cancel: str = "escape"
    cancel_all: str = "ctrl+x"
    load_png: str = "ctrl+o"
    show_generate: str = "f2"
    show_gallery: str = "f3"
    show_queue: str = "f4"
    show_models: str = "f5"
    show_settings: str = "f6"
    show_log: str = "f7"
    show_edit: str = "f8"
    # generate screen
    random_seed: str = "ctrl+r"
    toggle_hunt: str = "ctrl+e"
    loras: str = "ctrl+l"  # the LoRA panel (the same key closes it)
    controlnets: str = "ctrl+t"  # the ControlNet panel (the same key closes it)
    # edit screen
    edit_mode: str = "f9"  # the next mode: inpaint, outpaint, Kontext, control
    # gallery
    reuse: str = "enter,u"
    refine: str = "r"
    open_image: str = "o"
    edit_image: str = "e"  # the selected image in the Edit screen
    # queue
    cancel_selected: str = "delete,x"
    # models
    wizard: str = "w"
    download: str = "d"
    verify: str = "v"
    rescan: str = "s"
    # settings
    save_settings: str = "ctrl+s"

    def binding(
        self, name: str, action: str, description: str, *, show: bool = True, priority: bool = False
    ) -> Binding:
        """A Binding whose id is the field name, so App.set_keymap can remap it."""
        return Binding(getattr(self, name), action, description, show=show, priority=priority, id=name)

    def overridden(self, keys: dict[str, str]) -> dict[str, str]:
        """The [keys] entries that name a real binding id (unknown ones are ignored)."""
        names = {f.name for f in dataclasses.fields(self)}
        return {name: key for name, key in keys.items() if name in names}

    def key_for(self, name: str, keys: dict[str, str] | None = None) -> str:
        """The first key a binding answers to ([keys] where it remaps it, else the default), for hints."""
        return (self.overridden(keys or {}).get(name) or getattr(self, name)).split(",")[0].strip()


KEYS = Keymap()  # the defaults; frozen, so shared safely by the classes' BINDINGS
