"""Vision Transformer image encoder (timm-compatible parameter names) and its weight loader.

The module names match timm's ``VisionTransformer`` (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``) so
the ImageNet weights of ``jx_vit_base_p16_224`` load by name; only the position embeddings are
resized (bilinear, as TransReID) from the source grid to this model's patch grid.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``p``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (fused kernels)."""

    def __init__(self, dim: int, heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask``: optional bool (B, L) with True on tokens that may be attended to."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn_mask = None if mask is None else mask[:, None, None, :]
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0
        )
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block (the standard ViT residual form, both residuals kept)."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, attn_drop=drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Conv patchifier; ``stride < patch`` gives overlapping patches (TransReID's stride option)."""

    def __init__(self, height: int, width: int, patch: int, stride: int, dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.grid = ((height - patch) // stride + 1, (width - patch) // stride + 1)
        self.num_patches = self.grid[0] * self.grid[1]
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def init_weights(module: nn.Module) -> None:
    """timm's ViT init: truncated normal 0.02 for linear weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class VisionTransformer(nn.Module):
    """ViT returning all output tokens (CLS first, then the patch grid row-major), after the final norm."""

    def __init__(
        self,
        height: int,
        width: int,
        patch: int = 16,
        stride: int = 16,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        # The constructor arguments, so that a saved model can be rebuilt without the pipeline config.
        self.init_kwargs = {"height": height, "width": width, "patch": patch, "stride": stride, "dim": dim,
                            "depth": depth, "heads": heads, "mlp_ratio": mlp_ratio, "drop_path": drop_path}
        self.dim = dim
        self.patch_embed = PatchEmbed(height, width, patch, stride, dim)
        self.grid = self.patch_embed.grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, dim))
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, 0.0, r) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_weights)

    @property
    def num_tokens(self) -> int:
        return 1 + self.patch_embed.num_patches

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------
# Pretrained weights
# ---------------------------------------------------------------------------------------------

# Keys of a timm ViT checkpoint that belong to its ImageNet classifier, not to the encoder.
IGNORED_PREFIXES = ("head.", "pre_logits.", "fc_norm.", "head_drop.")


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did with every tensor of the checkpoint."""

    loaded: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def resize_pos_embed(posemb: torch.Tensor, new_grid: tuple[int, int], num_prefix: int = 1,
                     old_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Bilinearly resize (1, prefix + gh*gw, D) position embeddings to ``new_grid``.

    ``old_grid`` defaults to the square grid the token count implies (224/16 -> 14x14).
    """
    prefix, grid_tokens = posemb[:, :num_prefix], posemb[:, num_prefix:]
    n = grid_tokens.shape[1]
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"pos_embed has {n} grid tokens: not a square grid, pass old_grid")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"pos_embed has {n} grid tokens, not {old_grid[0]}x{old_grid[1]}")
    if tuple(old_grid) == tuple(new_grid):
        return posemb
    dim = posemb.shape[-1]
    grid = grid_tokens.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(posemb.dtype)
    return torch.cat([prefix, grid], dim=1)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``.pth``/``.pt``/``.bin`` read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pretrained weights not found (model.image.pretrained)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a mapping of tensors, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_pretrained(model: VisionTransformer, path: str | Path, source_grid: tuple[int, int] | None = None
                    ) -> LoadReport:
    """Copy timm ViT weights (e.g. ``jx_vit_base_p16_224``) into ``model``; raise on any mismatch.

    Every tensor of the checkpoint is either loaded, explicitly ignored (classifier head) or an
    error; every parameter of the model must be covered. ``pos_embed`` is resized to the model's grid.
    """
    state = read_state_dict(path)
    report = LoadReport()
    own = model.state_dict()
    new_state: dict[str, torch.Tensor] = {}
    unexpected, bad_shape = [], []
    for key, tensor in state.items():
        if key.startswith(IGNORED_PREFIXES):
            report.ignored.append(key)
            continue
        if key not in own:
            unexpected.append(key)
            continue
        if key == "pos_embed" and tensor.shape != own[key].shape:
            if tensor.shape[-1] != own[key].shape[-1]:
                bad_shape.append(f"{key}: {tuple(tensor.shape)} vs model {tuple(own[key].shape)}")
                continue
            tensor = resize_pos_embed(tensor, model.grid, 1, source_grid)
            report.resized.append(key)
        if tensor.shape != own[key].shape:
            bad_shape.append(f"{key}: {tuple(tensor.shape)} vs model {tuple(own[key].shape)}")
            continue
        new_state[key] = tensor.to(own[key].dtype)
        report.loaded.append(key)
    missing = sorted(set(own) - set(new_state))
    problems = []
    if unexpected:
        problems.append(f"unexpected keys (not in this model): {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if bad_shape:
        problems.append(f"shape mismatches: {bad_shape[:8]}")
    if missing:
        problems.append(f"model parameters not in the checkpoint: {missing[:8]}")
    if problems:
        raise ValueError(f"{path}: cannot load as a ViT with depth={len(model.blocks)} dim={model.dim}: "
                         + "; ".join(problems))
    model.load_state_dict(new_state, strict=True)
    log.info("loaded %d tensors from %s (resized %s, ignored %s)", len(report.loaded), path,
             report.resized, report.ignored)
    return report
