"""A ViT that takes DINO's multi-crop views (global and local crops of different sizes) and DINO's head.

MONAI's ``ViT`` fixes its positional embedding to ``img_size``, so a 96-px local crop cannot go
through a 256-px model. ``MultiCropViT`` keeps one learnable position embedding at the global grid
and interpolates it bicubically to other grids (DINO's ``interpolate_pos_encoding``); the blocks
are MONAI's ``TransformerBlock`` (pre-norm attention + MLP), and the output is the CLS token after
the final LayerNorm. DINO's stochastic depth (drop_path 0.1 on the student) is omitted: MONAI's
block has none.

``DINOHead`` is the vanilla DINO head (Caron et al. 2021; the thesis' "two fully connected layers",
I Sec. 4.2): an MLP to a bottleneck, L2 normalisation, then a weight-normalised linear layer to K
soft-classes whose norm is fixed to 1 (``norm_last_layer``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.networks.blocks import TransformerBlock
from torch import Tensor, nn


class MultiCropViT(nn.Module):
    def __init__(self, in_channels: int, image_size: int, patch_size: int, dim: int, depth: int, heads: int,
                 mlp_ratio: int = 4) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be divisible by patch_size {patch_size}")
        self.patch_size, self.grid, self.dim = patch_size, image_size // patch_size, dim
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, dim * mlp_ratio, heads, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.apply(_init_weights)

    def interpolate_pos_encoding(self, h: int, w: int) -> Tensor:
        """The position embedding for an ``h`` x ``w`` patch grid (the identity at the global grid)."""
        if h == self.grid and w == self.grid:
            return self.pos_embed
        cls, patches = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patches = patches.reshape(1, self.grid, self.grid, self.dim).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, h * w, self.dim)], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(x)  # (B, dim, h, w)
        h, w = tokens.shape[-2:]
        tokens = tokens.flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self.interpolate_pos_encoding(h, w)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, layers: int = 3, hidden: int = 2048, bottleneck: int = 256,
                 norm_last_layer: bool = True) -> None:
        super().__init__()
        if layers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck)
        else:
            modules: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.GELU()]
            for _ in range(layers - 2):
                modules += [nn.Linear(hidden, hidden), nn.GELU()]
            modules.append(nn.Linear(hidden, bottleneck))
            self.mlp = nn.Sequential(*modules)
        self.apply(_init_weights)
        # weight_norm(Linear(bottleneck, K, bias=False)) with g = 1, frozen when norm_last_layer (DINO).
        self.last_v = nn.Parameter(torch.empty(out_dim, bottleneck))
        nn.init.kaiming_uniform_(self.last_v, a=math.sqrt(5))
        self.last_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    def forward(self, x: Tensor, freeze_last_layer: bool = False) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        v, g = self.last_v, self.last_g
        if freeze_last_layer:  # DINO freezes the last layer in the first epoch(s)
            v, g = v.detach(), g.detach()
        return x @ (g * F.normalize(v, dim=1)).T


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
