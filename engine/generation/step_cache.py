"""Step caching: skip most of the transformer on steps where its first block barely changed.

First-Block-Cache (ParaAttention's method, as diffusers' `FirstBlockCacheConfig(threshold=T)` runs it): each
step runs the first double block; when its residual (what it added to the image stream) differs from the one of
the last fully computed step by at most T, relatively (mean |r − r_prev| / mean |r_prev|), the other blocks are
skipped and their contribution from that last computed step is added instead. The first step always computes.
With true CFG the prompt's and the negative prompt's rows keep separate states and decide each for itself, as
diffusers' "cond" and "uncond" contexts do. A cache lives for one job.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class _Group:
    head_residual: torch.Tensor | None = None  # of the last computed step
    tail: tuple[torch.Tensor, torch.Tensor] | None = None  # what the other blocks added then (img, txt)


@dataclass
class FirstBlockCache:
    threshold: float
    groups: int = 1  # batch rows split into this many equal groups (true CFG: 2), each deciding for itself
    decisions: list[tuple[bool, ...]] = field(default_factory=list)  # per step, per group: computed?
    changes: list[tuple[float, ...]] = field(default_factory=list)  # per step, per group: the relative change
    _states: list[_Group] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._states = [_Group() for _ in range(self.groups)]

    def run(
        self,
        head_residual: torch.Tensor,
        img: torch.Tensor,
        txt: torch.Tensor,
        rest: Callable[[slice, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        size = img.shape[0] // self.groups
        rows = [slice(g * size, (g + 1) * size) for g in range(self.groups)]
        changes = tuple(
            self._change(state, head_residual[r]) for state, r in zip(self._states, rows, strict=True)
        )
        compute = tuple(math.isinf(change) or change > self.threshold for change in changes)  # first: inf
        self.changes.append(changes)
        self.decisions.append(compute)
        img_out, txt_out = [], []
        for state, r, computes in zip(self._states, rows, compute, strict=True):
            if computes:
                done_img, done_txt = rest(r, img[r], txt[r])
                state.head_residual = head_residual[r]
                state.tail = (done_img - img[r], done_txt - txt[r])
            else:
                done_img, done_txt = img[r] + state.tail[0], txt[r] + state.tail[1]
            img_out.append(done_img)
            txt_out.append(done_txt)
        if len(img_out) == 1:
            return img_out[0], txt_out[0]
        return torch.cat(img_out), torch.cat(txt_out)

    @staticmethod
    def _change(state: _Group, residual: torch.Tensor) -> float:
        """mean |r − r_prev| / mean |r_prev| against the last computed step (inf when there is none)."""
        if state.head_residual is None or state.tail is None:
            return math.inf
        previous = state.head_residual
        return float(((residual - previous).abs().mean() / previous.abs().mean()).item())

    @property
    def skipped_steps(self) -> list[int]:
        """1-based steps on which every group reused the cache."""
        return [i + 1 for i, computed in enumerate(self.decisions) if not any(computed)]
