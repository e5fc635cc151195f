"""Space-aware memories and their addressing (SQUID, Xiang 2022, thesis §3.2-§3.3).

- ``gumbel_shrinkage``: Eq. 3.2, ``G(w) = sg(hs(w, topk(w)) - phi(w)) + phi(w)``. The forward pass keeps
  exactly the ``k`` largest similarities; the backward pass is the gradient of the softmax over all items.
- ``hard_shrinkage``: the fixed-threshold clipping of earlier memories (MemAE), the "w/o Gumbel Shrinkage"
  baseline of §3.3.1 / Table 4.4.
- ``memory_read``: Eq. 3.1, ``N_ij = sum_k G(w^k) M_ij^k`` with ``w^k = F_ij . M_ij^k``, region by region.
- ``SpaceAwareMemoryQueue``: §3.2.3, one FIFO region per grid cell, filled by copying encoder features once
  per training step through a pointer; not learned, and never written outside ``write`` (frozen at test time).
- ``SpaceAwareMemoryMatrix``: the learnable (MemAE-style) counterpart, one region per grid cell; SQUID's
  student generator uses it at its two deepest levels (§3.7, "Hierarchical Memory").

Shapes: queries are ``(B, R, C)`` (batch, region, item dimension); a memory holds ``(R, N, C)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SHRINKAGES = ("gumbel", "hard", "none")


def gumbel_shrinkage(similarity: Tensor, k: int, valid: Tensor | None = None) -> Tensor:
    """Addressing weights over the last dimension: hard top-``k`` forward, softmax backward (Eq. 3.2).

    Eq. 3.2 read literally would weight items by the raw hard-shrunk dot products, whose scale is
    arbitrary; like the authors' code (notes, appendix A) the forward weights are the softmax probabilities
    of the top-``k`` items renormalised to sum to one, which is the softmax over the top-``k`` similarities.
    Exactly ``min(k, #valid)`` weights are non-zero (ties are broken by ``torch.topk``). ``valid`` masks
    out empty slots (``False`` = never addressed).
    """
    similarity = _mask_empty_slots(similarity, valid)
    soft = torch.softmax(similarity, dim=-1)
    k = min(k, similarity.shape[-1])
    top = torch.topk(similarity.detach(), k, dim=-1).indices
    keep = torch.zeros_like(soft, dtype=torch.bool).scatter_(-1, top, True)
    if valid is not None:
        keep &= valid
    hard = soft.detach() * keep
    hard = hard / hard.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    # Straight-through: the value of ``hard``, the gradient of ``soft``.
    return (hard - soft).detach() + soft


def hard_shrinkage(similarity: Tensor, threshold: float, valid: Tensor | None = None) -> Tensor:
    """MemAE's addressing: softmax, zero the weights below ``threshold``, renormalise (L1)."""
    soft = torch.softmax(_mask_empty_slots(similarity, valid), dim=-1)
    # MemAE's continuous hard shrinkage: relu(w - t) * w / |w - t|, which is w where w > t and 0 elsewhere.
    shrunk = F.relu(soft - threshold) * soft / ((soft - threshold).abs() + 1e-12)
    return shrunk / shrunk.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def memory_read(
    queries: Tensor,
    items: Tensor,
    valid: Tensor | None = None,
    shrinkage: str = "gumbel",
    top_k: int = 5,
    threshold: float = 0.0025,
) -> Tensor:
    """Eq. 3.1 for every region: queries (B, R, C), items (R, N, C), valid (R, N) -> (B, R, C).

    A region with no valid item returns zeros.
    """
    similarity = torch.einsum("brc,rnc->brn", queries, items)
    mask = None if valid is None else valid.unsqueeze(0).expand_as(similarity)
    if shrinkage == "gumbel":
        weights = gumbel_shrinkage(similarity, top_k, mask)
    elif shrinkage == "hard":
        weights = hard_shrinkage(similarity, threshold, mask)
    elif shrinkage == "none":
        weights = torch.softmax(_mask_empty_slots(similarity, mask), dim=-1)
    else:
        raise ValueError(f"unknown shrinkage {shrinkage!r}; known: {', '.join(SHRINKAGES)}")
    if mask is not None:
        weights = weights * mask  # an empty region reads as zeros
    return torch.einsum("brn,rnc->brc", weights, items)


class _RegionMemory(nn.Module):
    """What both memories share: ``regions`` banks of ``size`` items of width ``dim``, and their shrinkage."""

    def __init__(
        self,
        regions: int,
        size: int,
        dim: int,
        shrinkage: str = "gumbel",
        top_k: int = 5,
        threshold: float = 0.0025,
    ) -> None:
        super().__init__()
        if shrinkage not in SHRINKAGES:
            raise ValueError(f"unknown shrinkage {shrinkage!r}; known: {', '.join(SHRINKAGES)}")
        self.regions, self.size, self.dim = regions, size, dim
        self.shrinkage, self.top_k, self.threshold = shrinkage, top_k, threshold


class SpaceAwareMemoryQueue(_RegionMemory):
    """One FIFO queue of ``size`` items per region (§3.2.3, Fig. 3.4c).

    ``write`` copies a batch of features into every region at the shared pointer and advances it,
    wrapping around to overwrite the oldest items; ``read`` addresses only the slots filled so far.
    The queue is state (buffers, in the state dict), not parameters: no gradient reaches it.
    """

    def __init__(
        self,
        regions: int,
        size: int,
        dim: int,
        shrinkage: str = "gumbel",
        top_k: int = 5,
        threshold: float = 0.0025,
    ) -> None:
        super().__init__(regions, size, dim, shrinkage, top_k, threshold)
        self.register_buffer("items", torch.zeros(regions, size, dim))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def valid(self) -> Tensor:
        """(R, N) bool: which slots hold a copied feature."""
        slots = torch.arange(self.size, device=self.items.device) < self.filled
        return slots.unsqueeze(0).expand(self.regions, -1)

    def forward(self, queries: Tensor) -> Tensor:
        return self.read(queries)

    def read(self, queries: Tensor) -> Tensor:
        """Eq. 3.1 against the queue: (B, R, C) -> (B, R, C); zeros while the queue is empty."""
        items = self.items
        if torch.is_grad_enabled():
            # ``write`` updates the buffer in place after this read; a copy keeps autograd's saved tensor intact.
            items = items.clone()
        return memory_read(queries, items, self.valid(), self.shrinkage, self.top_k, self.threshold)

    @torch.no_grad()
    def write(self, features: Tensor) -> None:
        """Copy (B, R, C) features into the queue, FIFO (the newest ``size`` survive if B > size)."""
        if features.dim() != 3 or features.shape[1:] != (self.regions, self.dim):
            raise ValueError(
                f"memory queue expects features of shape (B, {self.regions}, {self.dim}); got {tuple(features.shape)}"
            )
        count = features.shape[0]
        values = features.detach().to(self.items.dtype)[-self.size :]
        start = self.pointer + (count - values.shape[0])
        slots = (start + torch.arange(values.shape[0], device=self.items.device)) % self.size
        self.items.index_copy_(1, slots, values.transpose(0, 1))
        self.pointer.copy_((self.pointer + count) % self.size)
        self.filled.copy_(torch.clamp(self.filled + count, max=self.size))


class SpaceAwareMemoryMatrix(_RegionMemory):
    """Learnable memory, one region of ``size`` items per grid cell (MemAE [15] made space-aware, §3.2.2).

    Items start uniform in +-1/sqrt(dim) like MemAE's; with Gumbel shrinkage the forward pass combines the
    top-``k`` items and the gradient still reaches every item through the softmax (§3.3.2).
    """

    def __init__(
        self,
        regions: int,
        size: int,
        dim: int,
        shrinkage: str = "gumbel",
        top_k: int = 5,
        threshold: float = 0.0025,
    ) -> None:
        super().__init__(regions, size, dim, shrinkage, top_k, threshold)
        bound = 1.0 / math.sqrt(dim)
        self.items = nn.Parameter(torch.empty(regions, size, dim).uniform_(-bound, bound))

    def forward(self, queries: Tensor) -> Tensor:
        return memory_read(queries, self.items, None, self.shrinkage, self.top_k, self.threshold)


def _mask_empty_slots(similarity: Tensor, valid: Tensor | None) -> Tensor:
    """-inf at invalid slots, except in rows without any valid slot (kept finite, so no NaN appears)."""
    if valid is None:
        return similarity
    drop = ~valid & valid.any(dim=-1, keepdim=True)
    return similarity.masked_fill(drop, float("-inf"))
