"""A job's plan: what a request comes to before any model loads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.contract.request import GenerateRequest
from engine.formats.model_files import ResolvedFiles
from engine.runtime.devices import Precision


@dataclass(frozen=True)
class Plan:
    """What a request comes to before any model loads: its files, device, precisions and step count."""

    request: GenerateRequest
    files: ResolvedFiles
    device: torch.device
    precision: Precision
    schnell: bool  # a transformer without a guidance embedding: 4 steps, T5 256 tokens, no shift
    family: str = "flux1"  # "flux2": FLUX.2 [klein], run by engine/generation/flux2_stages.py

    @property
    def dtype(self) -> torch.dtype:
        """The transformer computes in this."""
        return self.precision.transformer

    @property
    def support(self) -> torch.dtype:
        """The text encoders and the autoencoder compute in this."""
        return self.precision.encoders

    @property
    def steps(self) -> int:
        return self.request.steps or (4 if self.schnell else 28)

    @property
    def t5_length(self) -> int:
        return self.request.t5_max_length or (256 if self.schnell else 512)
