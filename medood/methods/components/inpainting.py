"""SQUID's feature-level in-painting block (Xiang 2022, thesis §3.4, Fig. 3.4-3.5).

For the ``grid x grid`` patch features ``F`` of one image (cells in row-major order):

1. a point-wise (1x1) convolution shrinks the channels (the bottleneck of §3.4.2, ratio 1/4 as in the
   authors' code) and each cell's map is flattened into one token;
2. the space-aware memory turns every token into its "normal" counterpart ``N_ij`` (Eq. 3.1);
3. one Transformer layer restores each cell from its context: the query is the cell's own token ``F_ij``,
   the keys/values are the eight neighbours' ``N`` (zero tokens, masked out of the attention, where a
   neighbour falls outside the grid);
4. a second 1x1 convolution restores the channels;
5. the masked shortcut mixes the block's input back in during training only (Eqs. 3.3-3.4).

Ablations of Tables 4.4-4.5 are options: ``memory`` (queue / learnable matrix / none), ``space_aware``,
``aggregator`` (transformer / conv) and ``shortcut`` (masked / soft / none).
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from torch import Tensor, nn

from medood.methods.components.memory import SpaceAwareMemoryMatrix, SpaceAwareMemoryQueue

# The 3x3 neighbourhood without its centre, row-major: the 8 key/value tokens of Fig. 3.4(b).
NEIGHBOUR_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
MEMORIES = ("queue", "matrix", "none")
AGGREGATORS = ("transformer", "conv")
SHORTCUTS = ("masked", "soft", "none")


def neighbour_index(grid: int) -> tuple[Tensor, Tensor]:
    """For each of the ``grid * grid`` cells (row-major), the indices of its 8 neighbours and which exist.

    Returns ``(index, valid)``, both (R, 8) with R = grid * grid; a missing neighbour has index R, the
    padding token appended by ``gather_neighbours``.
    """
    cells = grid * grid
    index = torch.full((cells, len(NEIGHBOUR_OFFSETS)), cells, dtype=torch.long)
    for cell in range(cells):
        row, col = divmod(cell, grid)
        for slot, (dr, dc) in enumerate(NEIGHBOUR_OFFSETS):
            r, c = row + dr, col + dc
            if 0 <= r < grid and 0 <= c < grid:
                index[cell, slot] = r * grid + c
    return index, index < cells


def gather_neighbours(tokens: Tensor, grid: int) -> tuple[Tensor, Tensor]:
    """tokens (B, R, C) -> (neighbours (B, R, 8, C) with zero padding, valid (R, 8))."""
    index, valid = neighbour_index(grid)
    padded = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], 1, tokens.shape[2])], dim=1)
    return padded[:, index.to(tokens.device)], valid.to(tokens.device)


def masked_shortcut(
    features: Tensor, inpainted: Tensor, mode: str, probability: float, training: bool
) -> Tensor:
    """Eq. 3.3 in training (``delta ~ Bernoulli(rho)`` per sample and spatial position; 1 = in-painted),
    Eq. 3.4 at inference (the in-painted features only); ``soft`` is Eq. 4.5 (both phases); ``none`` never
    mixes the input back in."""
    if mode == "masked":
        if not training:
            return inpainted
        shape = (inpainted.shape[0], 1, *inpainted.shape[2:])
        delta = torch.bernoulli(torch.full(shape, probability, device=inpainted.device, dtype=inpainted.dtype))
        return (1 - delta) * features + delta * inpainted
    if mode == "soft":
        # Eq. 4.5 is deterministic, so unlike Eq. 3.3 nothing asks to switch it off at inference (§4.5).
        return (1 - probability) * features + probability * inpainted
    if mode == "none":
        return inpainted
    raise ValueError(f"unknown shortcut {mode!r}; known: {', '.join(SHORTCUTS)}")


class InpaintingBlock(nn.Module):
    """Feature-level in-painting of a ``grid x grid`` set of patch feature maps (§3.4.2-3.4.3).

    ``forward`` takes (B * R, C, h, w) patch features, cells of one image consecutive in row-major order,
    and returns the in-painted features of the same shape plus the bottleneck tokens (B, R, D) that the
    caller copies into the memory queue once per training step (``write_memory``).
    """

    def __init__(
        self,
        channels: int,
        grid: int,
        feature_size: int,
        bottleneck: int = 4,
        heads: int = 8,
        memory: str = "queue",
        memory_size: int = 200,
        space_aware: bool = True,
        shrinkage: str = "gumbel",
        top_k: int = 5,
        shrink_threshold: float = 0.0025,
        addressing: str = "dot",
        temperature: float = 0.1,
        aggregator: str = "transformer",
        shortcut: str = "masked",
        shortcut_probability: float = 0.95,
    ) -> None:
        super().__init__()
        for name, value, known in (
            ("memory", memory, MEMORIES),
            ("aggregator", aggregator, AGGREGATORS),
            ("shortcut", shortcut, SHORTCUTS),
        ):
            if value not in known:
                raise ValueError(f"unknown {name} {value!r}; known: {', '.join(known)}")
        if channels % bottleneck:
            raise ValueError(f"in-painting bottleneck {bottleneck} must divide the channels {channels}")
        self.grid, self.feature_size = grid, feature_size
        self.inner = channels // bottleneck
        self.dim = self.inner * feature_size * feature_size
        self.space_aware, self.shortcut, self.shortcut_probability = space_aware, shortcut, shortcut_probability

        self.reduce = Convolution(2, channels, self.inner, kernel_size=1, act="RELU", norm="BATCH", bias=False)
        self.expand = Convolution(2, self.inner, channels, kernel_size=1, act="RELU", norm="BATCH", bias=False)
        regions = grid * grid if space_aware else 1
        memory_args = dict(
            shrinkage=shrinkage, top_k=top_k, threshold=shrink_threshold, addressing=addressing, temperature=temperature
        )
        self.memory: SpaceAwareMemoryQueue | SpaceAwareMemoryMatrix | None
        if memory == "queue":
            self.memory = SpaceAwareMemoryQueue(regions, memory_size, self.dim, **memory_args)
        elif memory == "matrix":
            self.memory = SpaceAwareMemoryMatrix(regions, memory_size, self.dim, **memory_args)
        else:
            self.memory = None
        self.context = NeighbourContext(self.dim, heads, aggregator)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        cells = self.grid * self.grid
        reduced = self.reduce(features)
        tokens = reduced.reshape(-1, cells, self.dim)  # F: (B, R, D)
        normal = self.recall(tokens)  # N: (B, R, D), Eq. 3.1
        neighbours, valid = gather_neighbours(normal, self.grid)
        restored = self.context(tokens, neighbours, valid, normal)
        inpainted = self.expand(restored.reshape(reduced.shape))
        return masked_shortcut(features, inpainted, self.shortcut, self.shortcut_probability, self.training), tokens

    def recall(self, tokens: Tensor) -> Tensor:
        """Eq. 3.1 for every cell: its own region (space-aware) or one region shared by all cells."""
        if self.memory is None:
            return tokens
        if self.space_aware:
            return self.memory(tokens)
        return self.memory(tokens.reshape(-1, 1, self.dim)).reshape(tokens.shape)

    @torch.no_grad()
    def write_memory(self, tokens: Tensor) -> None:
        """Copy one batch of bottleneck tokens (B, R, D) into the queue (§3.2.3); other memories ignore it."""
        if isinstance(self.memory, SpaceAwareMemoryQueue):
            self.memory.write(tokens if self.space_aware else tokens.reshape(-1, 1, self.dim))


class NeighbourContext(nn.Module):
    """One post-norm Transformer layer [Vaswani] whose query is ``F_ij`` and keys/values its neighbours' ``N``.

    The residual adds the cell's own ``N_ij`` rather than the query ``F_ij``: a residual on ``F`` would let
    the input skip the in-painting, which is the masked shortcut's job (§3.4.3); the authors' code does the
    same (notes, appendix A), with a feed-forward width of D / 4 and no dropout.
    ``aggregator="conv"`` (Table 4.5) replaces the attention by a 3x3 convolution over the patch grid whose
    centre tap reads ``F_ij`` and whose other taps read the zero-padded neighbours' ``N``, keeping the rest.
    """

    def __init__(self, dim: int, heads: int, aggregator: str = "transformer") -> None:
        super().__init__()
        self.aggregator = aggregator
        if aggregator == "transformer":
            self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        else:
            self.convolution = nn.Linear((1 + len(NEIGHBOUR_OFFSETS)) * dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.feed_forward = nn.Sequential(nn.Linear(dim, dim // 4), nn.ReLU(), nn.Linear(dim // 4, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, query: Tensor, neighbours: Tensor, valid: Tensor, centre: Tensor) -> Tensor:
        """query, centre (B, R, D); neighbours (B, R, 8, D); valid (R, 8) -> (B, R, D)."""
        batch, cells, dim = query.shape
        if self.aggregator == "transformer":
            # A cell without neighbours (a 1x1 grid) attends to nothing: unmask its padding to avoid a NaN
            # softmax, then drop the result.
            has_context = valid.any(dim=-1)
            padding = (~valid & has_context[:, None]).repeat(batch, 1)
            context, _ = self.attention(
                query.reshape(-1, 1, dim),
                neighbours.reshape(-1, len(NEIGHBOUR_OFFSETS), dim),
                neighbours.reshape(-1, len(NEIGHBOUR_OFFSETS), dim),
                key_padding_mask=padding,
                need_weights=False,
            )
            context = context.reshape(batch, cells, dim) * has_context[None, :, None]
        else:
            context = self.convolution(torch.cat([query, neighbours.flatten(2)], dim=-1))
        restored = self.norm1(centre + context)
        return self.norm2(restored + self.feed_forward(restored))
