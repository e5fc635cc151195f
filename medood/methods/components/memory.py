"""Space-aware memories and their addressing (SQUID, Xiang 2022, thesis §3.2-§3.3).

- ``gumbel_shrinkage``: Eq. 3.2, ``G(w) = sg(hs(w, topk(w)) - phi(w)) + phi(w)``. The forward pass keeps
  exactly the ``k`` largest similarities; the backward pass is the gradient of the softmax over all items.
- ``hard_shrinkage``: the fixed-threshold clipping of earlier memories (MemAE), the "w/o Gumbel Shrinkage"
  baseline of §3.3.1 / Table 4.4.
- ``memory_read``: Eq. 3.1, ``N_ij = sum_k G(w^k) M_ij^k`` with ``w^k = F_ij . M_ij^k``, region by region;
  ``addressing="cosine"`` replaces the dot product by the cosine similarity over a temperature (not the
  thesis': see ``ADDRESSINGS``).
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
# How a query addresses the items (the similarity w^k of Eq. 3.1):
# - "dot": the thesis' dot product F_ij . M_ij^k (§3.2.2) and the authors' code. It favours items of large
#   norm over similar ones, and with queries much longer than the items (post-ReLU features of norm 15-18
#   against learnable items initialised at norm ~0.6) one item wins every query: the student collapses.
# - "cosine": cos(F_ij, M_ij^k) / temperature, the normalised addressing of key-value memories; scale-free,
#   so the most *similar* items win whatever the norms. Not in the thesis (our choice, issue 9).
ADDRESSINGS = ("cosine", "dot")


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


def similarities(queries: Tensor, items: Tensor, addressing: str = "dot", temperature: float = 0.1) -> Tensor:
    """w^k of Eq. 3.1 for every region: queries (B, R, C), items (R, N, C) -> (B, R, N)."""
    if addressing == "dot":
        return torch.einsum("brc,rnc->brn", queries, items)
    if addressing == "cosine":
        # cos = (q / |q|) . m / |m|: dividing the (B, R, N) products by the item norms gives F.normalize's
        # value (same eps) without normalising (and back-propagating through) every (R, N, C) item, which
        # was the most expensive part of a training step with the student's large memories.
        dots = torch.einsum("brc,rnc->brn", F.normalize(queries, dim=-1), items)
        return dots / (items.norm(dim=-1).clamp_min(1e-12).unsqueeze(0) * temperature)
    raise ValueError(f"unknown addressing {addressing!r}; known: {', '.join(ADDRESSINGS)}")


def memory_read(
    queries: Tensor,
    items: Tensor,
    valid: Tensor | None = None,
    shrinkage: str = "gumbel",
    top_k: int = 5,
    threshold: float = 0.0025,
    addressing: str = "dot",
    temperature: float = 0.1,
) -> Tensor:
    """Eq. 3.1 for every region: queries (B, R, C), items (R, N, C), valid (R, N) -> (B, R, C).

    A region with no valid item returns zeros.
    """
    similarity = similarities(queries, items, addressing, temperature)
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
        addressing: str = "dot",
        temperature: float = 0.1,
    ) -> None:
        super().__init__()
        if shrinkage not in SHRINKAGES:
            raise ValueError(f"unknown shrinkage {shrinkage!r}; known: {', '.join(SHRINKAGES)}")
        if addressing not in ADDRESSINGS:
            raise ValueError(f"unknown addressing {addressing!r}; known: {', '.join(ADDRESSINGS)}")
        if temperature <= 0:
            raise ValueError(f"the addressing temperature must be > 0, got {temperature}")
        self.regions, self.size, self.dim = regions, size, dim
        self.shrinkage, self.top_k, self.threshold = shrinkage, top_k, threshold
        self.addressing, self.temperature = addressing, temperature

    def _read(self, queries: Tensor, items: Tensor, valid: Tensor | None) -> Tensor:
        return memory_read(
            queries, items, valid, self.shrinkage, self.top_k, self.threshold, self.addressing, self.temperature
        )


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
        addressing: str = "dot",
        temperature: float = 0.1,
    ) -> None:
        super().__init__(regions, size, dim, shrinkage, top_k, threshold, addressing, temperature)
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
        return self._read(queries, items, self.valid())

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

    With dot-product addressing the items start uniform in +-1/sqrt(dim) like MemAE's and the authors'
    (norm ~0.58, whatever ``dim``). With cosine addressing they start standard normal (norm ~sqrt(dim)), the
    scale of the batch-normalised features they replace (our choice, issue 9): the read returns items, not
    directions, and reads 30 times shorter than the features leave the decoder with the 5% of positions
    the masked shortcut lets through in training and nothing at inference. Measured on the collapse
    probe of tests/test_squid.py: cosine addressing with the small init collapses as the dot product does
    (reconstructions' spread 0.0003 for inputs' 0.17), with this init it does not (0.028).
    With Gumbel shrinkage the forward pass combines the top-``k`` items and the gradient still reaches
    every item through the softmax (§3.3.2).
    """

    def __init__(
        self,
        regions: int,
        size: int,
        dim: int,
        shrinkage: str = "gumbel",
        top_k: int = 5,
        threshold: float = 0.0025,
        addressing: str = "dot",
        temperature: float = 0.1,
    ) -> None:
        super().__init__(regions, size, dim, shrinkage, top_k, threshold, addressing, temperature)
        items = torch.empty(regions, size, dim)
        if addressing == "cosine":
            items.normal_()
        else:
            bound = 1.0 / math.sqrt(dim)
            items.uniform_(-bound, bound)
        self.items = nn.Parameter(items)

    def forward(self, queries: Tensor) -> Tensor:
        return self._read(queries, self.items, None)


def _mask_empty_slots(similarity: Tensor, valid: Tensor | None) -> Tensor:
    """-inf at invalid slots, except in rows without any valid slot (kept finite, so no NaN appears)."""
    if valid is None:
        return similarity
    drop = ~valid & valid.any(dim=-1, keepdim=True)
    return similarity.masked_fill(drop, float("-inf"))
