"""LoRA files applied at the weight chokepoint. (Being written: until then LoRAs are refused, never ignored.)"""

from __future__ import annotations

from torch import nn

from engine.errors import UserError
from engine.request import LoraSpec


def apply_loras(transformer: nn.Module, clip: nn.Module | None, loras: list[LoraSpec]) -> list[str]:
    """Replace the LoRA patches on these models with `loras` (an empty list clears them); returns notes for the user."""
    if loras:
        raise UserError("LoRAs are not supported by this engine yet: remove --lora.")
    return []
