"""Masked autoencoder (He et al., CVPR 2022) over 2D or 3D patches, built from MONAI blocks.

Seed 001 (Georgescu, KES 2023, Sec. 3.2) uses it to learn the structure of normal images:

- patch embedding plus a fixed sin-cos positional embedding: ``P = P~ + pos``;
- random masking: ``V = mask(P, alpha)`` keeps ``n - round(alpha * n)`` tokens per image;
- encoder on the visible tokens only: ``E = encoder(V)``;
- a light decoder on ``E`` with a learned mask token in every dropped position and its own
  positional embedding: ``Z = Z_bar + pos_d``, ``P^ = decoder(Z)``, one pixel patch per token;
- loss (Eq. 1): mean squared error between ``P^`` and the pixel patches ``X~`` on the masked tokens
  only, or on all tokens (the Sec. 4.5 ablation);
- reconstruction (Sec. 4.3): the visible tokens are replaced by the original patches and the result
  is averaged over several passes with different random masks.

MONAI's ``MaskedAutoEncoderViT`` is not used because it rejects ``alpha = 0`` (the paper's
autoencoder ablation, Fig. 5), keeps ``int`` rather than ``round`` tokens, and draws its masks
from the global CPU RNG with no way to seed them per call, which deterministic scoring needs.
Its building blocks (``PatchEmbeddingBlock``, ``TransformerBlock``, the sin-cos embedding) are used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from torch import Tensor, nn

__all__ = ["MAEOutput", "MaskedAutoencoder", "masked_token_count"]


def masked_token_count(n_tokens: int, mask_ratio: float) -> int:
    """``round(alpha * n)`` (halves round up), capped so that at least one token stays visible."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return min(int(math.floor(mask_ratio * n_tokens + 0.5)), n_tokens - 1)


@dataclass
class MAEOutput:
    """One MAE pass: the decoder's patch predictions for every token, the mask and the targets."""

    prediction: Tensor  # (B, n, patch_dim): P^ for every token, visible ones included
    target: Tensor  # (B, n, patch_dim): the pixel patches X~ of the input
    mask: Tensor  # (B, n) bool, True where the token was dropped (masked)


class MaskedAutoencoder(nn.Module):
    """Asymmetric ViT encoder / light decoder MAE over ``spatial_dims``-D patches."""

    def __init__(
        self,
        spatial_dims: int,
        image_size: int,
        in_channels: int,
        patch_size: int,
        encoder_dim: int,
        encoder_depth: int,
        encoder_heads: int,
        decoder_dim: int,
        decoder_depth: int,
        decoder_heads: int,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be divisible by patch_size {patch_size}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.grid = (image_size // patch_size,) * spatial_dims
        self.n_tokens = int(math.prod(self.grid))
        self.patch_dim = in_channels * patch_size**spatial_dims

        # P = P~ + pos with a fixed sin-cos pos (as in the official MAE code the paper uses, Sec. 4.3).
        self.patch_embedding = PatchEmbeddingBlock(
            in_channels=in_channels,
            img_size=image_size,
            patch_size=patch_size,
            hidden_size=encoder_dim,
            num_heads=encoder_heads,
            proj_type="conv",
            pos_embed_type="sincos",
            spatial_dims=spatial_dims,
        )
        self.encoder = nn.Sequential(
            *[
                TransformerBlock(encoder_dim, int(encoder_dim * mlp_ratio), encoder_heads, qkv_bias=True)
                for _ in range(encoder_depth)
            ]
        )
        self.encoder_norm = nn.LayerNorm(encoder_dim)

        self.decoder_embed = nn.Linear(encoder_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embedding = build_sincos_position_embedding(
            list(self.grid), decoder_dim, spatial_dims
        )
        self.decoder = nn.Sequential(
            *[
                TransformerBlock(decoder_dim, int(decoder_dim * mlp_ratio), decoder_heads, qkv_bias=True)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_dim)
        self._init_weights()

    # -- patches ------------------------------------------------------------------------------

    def patchify(self, image: Tensor) -> Tensor:
        """(B, C, *spatial) -> (B, n, p^d * C), tokens in the row-major order of the conv embedding."""
        b, c = image.shape[:2]
        p, d = self.patch_size, self.spatial_dims
        shape = [b, c]
        for g in self.grid:
            shape += [g, p]
        x = image.reshape(shape)
        # (b, c, g1, p1, g2, p2, ...) -> (b, g1, g2, ..., p1, p2, ..., c)
        grid_axes = [2 + 2 * i for i in range(d)]
        patch_axes = [3 + 2 * i for i in range(d)]
        x = x.permute(0, *grid_axes, *patch_axes, 1)
        return x.reshape(b, self.n_tokens, self.patch_dim)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """Inverse of ``patchify``: (B, n, p^d * C) -> (B, C, *spatial)."""
        b = patches.shape[0]
        p, d, c = self.patch_size, self.spatial_dims, self.in_channels
        x = patches.reshape(b, *self.grid, *([p] * d), c)
        # (b, g1.., p1.., c) -> (b, c, g1, p1, g2, p2, ...)
        order = [0, 2 * d + 1]
        for i in range(d):
            order += [1 + i, 1 + d + i]
        x = x.permute(order)
        return x.reshape(b, c, *(g * p for g in self.grid))

    # -- masking ------------------------------------------------------------------------------

    def random_mask(
        self,
        batch_size: int,
        mask_ratio: float,
        device: torch.device,
        generator: torch.Generator | None = None,
        shared: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Indices of the visible tokens (B, n_visible) and the boolean mask (B, n), True = dropped.

        With a ``generator`` (a CPU one) the noise is drawn on the CPU and moved, so a seed gives
        the same masks on every device. ``shared`` draws one mask for the whole batch, so that an
        image's masks do not depend on its position in the batch (deterministic scoring).
        """
        n_masked = masked_token_count(self.n_tokens, mask_ratio)
        rows = 1 if shared else batch_size
        if generator is not None:
            noise = torch.rand(rows, self.n_tokens, generator=generator).to(device)
        else:
            noise = torch.rand(rows, self.n_tokens, device=device)
        ids_keep = noise.argsort(dim=1)[:, : self.n_tokens - n_masked]
        ids_keep = ids_keep.sort(dim=1).values.expand(batch_size, -1)
        mask = torch.ones(batch_size, self.n_tokens, dtype=torch.bool, device=device)
        mask.scatter_(1, ids_keep, False)
        return ids_keep, mask

    # -- forward ------------------------------------------------------------------------------

    def forward(
        self,
        image: Tensor,
        mask_ratio: float,
        generator: torch.Generator | None = None,
        shared_mask: bool = False,
    ) -> MAEOutput:
        tokens = self.patch_embedding(image)  # P = P~ + pos, (B, n, D)
        b, _, dim = tokens.shape
        ids_keep, mask = self.random_mask(b, mask_ratio, image.device, generator, shared_mask)
        visible = tokens.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))  # V = mask(P, alpha)
        encoded = self.encoder_norm(self.encoder(visible))  # E = encoder(V)

        encoded = self.decoder_embed(encoded)
        dec_dim = encoded.shape[-1]
        # Z_bar: learned mask token m everywhere, the encoded tokens put back in their positions.
        z = self.mask_token.to(encoded.dtype).expand(b, self.n_tokens, dec_dim)
        z = z.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, dec_dim), encoded)
        z = z + self.decoder_pos_embedding.to(z.dtype)  # Z = Z_bar + pos_d
        prediction = self.decoder_pred(self.decoder_norm(self.decoder(z)))  # P^ = decoder(Z)
        return MAEOutput(prediction=prediction, target=self.patchify(image), mask=mask)

    @staticmethod
    def loss(output: MAEOutput, on_all_tokens: bool = False) -> Tensor:
        """Eq. (1): squared error on the masked tokens, averaged over them (and over pixels).

        Eq. (1) writes ``1 / (alpha n) * sum_{i in M} ||x~_i - p^_i||^2``; like the official MAE
        code the paper trains with, the squared norm is averaged over the patch's pixels too, which
        only rescales the loss by the constant ``p^d * C``. With no masked token (``alpha = 0``,
        the autoencoder ablation of Fig. 5) every token is reconstructed and scored.
        """
        per_token = (output.prediction - output.target).pow(2).mean(dim=-1)
        mask = output.mask.to(per_token.dtype)
        if on_all_tokens or not bool(output.mask.any()):
            return per_token.mean()
        return (per_token * mask).sum() / mask.sum()

    def reconstruct(
        self,
        image: Tensor,
        mask_ratio: float,
        n_passes: int = 4,
        paste_visible: bool = True,
        generator: torch.Generator | None = None,
        shared_mask: bool = False,
    ) -> Tensor:
        """X^: mean over ``n_passes`` random masks; visible patches are the originals (Sec. 4.3)."""
        total = torch.zeros_like(image)
        for _ in range(n_passes):
            out = self.forward(image, mask_ratio, generator=generator, shared_mask=shared_mask)
            patches = out.prediction
            if paste_visible:
                patches = torch.where(out.mask.unsqueeze(-1), out.prediction, out.target)
            total = total + self.unpatchify(patches)
        return total / n_passes

    # -- helpers ------------------------------------------------------------------------------

    def _init_weights(self) -> None:
        # As the official MAE code: xavier-uniform linear layers, N(0, 0.02) mask token.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        projection = self.patch_embedding.patch_embeddings
        if isinstance(projection, (nn.Conv2d, nn.Conv3d)):
            nn.init.xavier_uniform_(projection.weight.view(projection.weight.shape[0], -1))
        nn.init.normal_(self.mask_token, std=0.02)
