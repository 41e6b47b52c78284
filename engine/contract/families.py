"""Which FLUX family and variant a transformer is, from its tensor names alone (no torch, nothing loaded).

The engine (engine/models/flux2.py, engine/formats/model_files.py, engine/generation/pipeline.py) and the TUI
(launcher/models.py, which reads a file's safetensors header) both ask here, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Container

# FLUX.2's transformer has one shared single-stream modulation; FLUX.1's single blocks each have their own.
FLUX2_TENSOR = "single_stream_modulation.lin.weight"
# FLUX.1 [dev] (and its Fill/Kontext/Canny/Depth models) embed the distilled guidance; [schnell] does not.
GUIDANCE_TENSOR = "guidance_in.in_layer.weight"


def is_flux2(names: Container[str]) -> bool:
    """A FLUX.2 transformer ([klein] 4B/9B), by its tensor names without any checkpoint prefix."""
    return FLUX2_TENSOR in names


def has_guidance_embedding(names: Container[str]) -> bool:
    return GUIDANCE_TENSOR in names
