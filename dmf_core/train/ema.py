"""An exponential moving average of the weights: the model a stage saves when ``<stage>.ema > 0``.

Why: on the demo the same seed lands 15 mAP points apart with another thread count (the float
reductions send training on another trajectory; docs/training.md). The average of the weights
over the last few hundred steps is a smoother function of the trajectory than its last point.
Training itself is unchanged: the average is a shadow copy, read only for the saved model and
its feature health.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    """``shadow = d * shadow + (1 - d) * weights`` after every optimizer step, with
    ``d = min(decay, (1 + n) / (10 + n))`` at step ``n`` (the first steps are not frozen in by a
    shadow that starts at the initial weights). BatchNorm statistics are averaged the same way;
    integer buffers (batch counters) are copied."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema: expected a decay in (0, 1), got {decay}")
        self.decay = float(decay)
        self.steps = 0
        self.shadow = copy.deepcopy(model).eval()
        for p in self.shadow.parameters():
            p.requires_grad_(False)

    def _pairs(self, model: nn.Module) -> tuple[list, list, list, list]:
        src = dict(model.state_dict(keep_vars=True))
        dst = dict(self.shadow.state_dict(keep_vars=True))
        floats = [k for k in dst if dst[k].is_floating_point()]
        others = [k for k in dst if not dst[k].is_floating_point()]
        return ([dst[k].data for k in floats], [src[k].data for k in floats],
                [dst[k].data for k in others], [src[k].data for k in others])

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        ema_f, src_f, ema_i, src_i = self._pairs(model)
        torch._foreach_lerp_(ema_f, src_f, 1.0 - d)
        for e, s in zip(ema_i, src_i):
            e.copy_(s)
        self.steps += 1

    def state_dict(self) -> dict:
        return {"steps": self.steps, "weights": self.shadow.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.shadow.load_state_dict(state["weights"])
