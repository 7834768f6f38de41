"""One training step's forward: the model and its losses as one module, compiled as one graph.

``torch.compile`` of the model alone leaves the losses (batch-hard mining, cross-entropy, the
contrastive term: ~70 small kernels forward and backward) launched one by one between CUDA-graph
replays; compiling model and losses together fuses them and puts them in the same graph. Under
DDP only the model is compiled: DDP's gradient hooks need dynamo to see the DDP module itself.
"""

from __future__ import annotations

import torch
from torch import nn

from dmf_core.config import Config
from dmf_core.train.losses import dmf_losses

#: Caption token states are padded to a multiple of this when the step is compiled, so that CUDA
#: graphs are recorded once per length bucket, not once per distinct caption length of a batch.
CAPTION_PAD_MULTIPLE = 16


class LossStep(nn.Module):
    """``forward(images, labels, attributes=None, **model_inputs)`` -> :func:`dmf_losses`' dict."""

    def __init__(self, model: nn.Module, cfg: Config):
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, images: torch.Tensor, labels: torch.Tensor, attributes: torch.Tensor | None = None,
                **model_inputs) -> dict[str, torch.Tensor]:
        return dmf_losses(self.model(images, **model_inputs), labels, self.cfg, attributes)


def compiles(mode: str | None, device: torch.device) -> bool:
    """Whether ``train.compile: mode`` compiles on ``device``: ``reduce-overhead`` (CUDA graphs)
    only pays on CUDA, where small batches are launch-bound; elsewhere it stays eager rather than
    spend minutes compiling for no gain."""
    return mode is not None and not (mode == "reduce-overhead" and device.type != "cuda")


def loss_step(model: nn.Module, cfg: Config, mode: str | None, device: torch.device,
              distributed: bool = False) -> nn.Module:
    """The step's forward for ``model`` (plain or DDP-wrapped) under ``train.compile: mode``;
    checkpoints keep saving the plain module."""
    if not compiles(mode, device):
        return LossStep(model, cfg)
    if distributed:
        return LossStep(torch.compile(model, mode=mode), cfg)
    return torch.compile(LossStep(model, cfg), mode=mode)
