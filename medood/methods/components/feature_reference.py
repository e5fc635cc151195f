"""Anomaly scores of features against the normal training features, and the sensitivity split.

The scores of Rafiee's thesis, all on L2-normalised features h(x) of the normal training images:

- ``mahalanobis`` (Eq. 5.2 = Eq. 7.1): s(x) = (h - mu)^T Sigma^-1 (h - mu), mu and Sigma over all
  training features ("K-means with K = 1", Sec. 5.1.3). Sigma by ``covariance``: ``empirical`` (the
  maximum-likelihood covariance and its pseudo-inverse, as the SSD code the thesis cites computes it;
  equal to ``sklearn.covariance.EmpiricalCovariance``), ``ledoit_wolf`` (``sklearn.covariance.LedoitWolf``)
  or ``ridge`` (Sigma + eps * tr(Sigma) / d * I). With no more samples than dimensions the empirical
  covariance is singular and ``empirical`` / ``ridge`` fall back to Ledoit-Wolf (not in the thesis).
- ``cos_avg`` (Eq. 6.1): S(x) = -(1/M) sum_m exp(cos(h, h_m) / tau), computed in the log domain as
  -(logsumexp(cos / tau) - log M), a monotone transform (same ranking, no overflow for small tau).
- ``cos_max`` (Eq. 7.2): S(x) = -max_m exp(cos(h, h_m)), the 1-nearest-neighbour cosine score.

Self-match: a bank of training features contains each training image, so scoring a training image
(the platform's calibration and ``fit_reference`` run on them) would match it with itself. Each
bank row keeps a hash of its case id, and a query with the same id skips that row.

Sensitivity (thesis Sec. 6.1.5, I Sec. 3.4): a fixed part of the training cases (chosen by a hash
of the id, so deterministic and independent of the batch order) is held out as D_train^sens; the
rest, D_train^ref, is the reference. ``sensitivity_scores`` scores with D_train^ref only, so
AUROC(sens scores -> 0, in-distribution test scores -> 1) is the label-free sensitivity score
(``medood.platform.metrics.label_free_sensitivity``).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FEATURE_SCORES = ("mahalanobis", "cos_avg", "cos_max")
COVARIANCES = ("empirical", "ledoit_wolf", "ridge")


def id_hashes(ids: list[str] | None, n: int) -> Tensor:
    """A stable 63-bit hash per case id (BLAKE2b), or -1 per row when there are no ids."""
    if ids is None:
        return torch.full((n,), -1, dtype=torch.int64)
    return torch.tensor(
        [int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little") >> 1 for i in ids],
        dtype=torch.int64,
    )


def in_sensitivity_split(hashes: Tensor, fraction: float) -> Tensor:
    """True for the cases of D_train^sens: a hash-uniform share ``fraction`` of the training cases."""
    return (hashes % 10_000).double() < fraction * 10_000


def fit_gaussian(features: Tensor, covariance: str = "empirical", eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Mean and precision (float64) of ``features`` (n, d) under the chosen covariance estimator."""
    x = features.detach().double().cpu()
    n, d = x.shape
    if covariance not in COVARIANCES:
        raise ValueError(f"unknown covariance {covariance!r}; known: {', '.join(COVARIANCES)}")
    if covariance == "ledoit_wolf" or n <= d:
        from sklearn.covariance import LedoitWolf

        estimator = LedoitWolf().fit(x.numpy())
        return torch.from_numpy(estimator.location_), torch.from_numpy(estimator.precision_)
    mean = x.mean(0)
    centred = x - mean
    cov = centred.T @ centred / n  # maximum likelihood (bias=True), as SSD and sklearn
    if covariance == "ridge":
        cov = cov + eps * torch.trace(cov) / d * torch.eye(d, dtype=cov.dtype)
    return mean, torch.linalg.pinv(cov, hermitian=True)


def mahalanobis(features: Tensor, mean: Tensor, precision: Tensor) -> Tensor:
    """Squared Mahalanobis distance of each row (float64)."""
    d = features.double() - mean.to(features.device, torch.float64)
    return ((d @ precision.to(features.device, torch.float64)) * d).sum(1)


def cosine_scores(
    features: Tensor, bank: Tensor, kind: str, temperature: float, query_ids: Tensor | None = None, bank_ids: Tensor | None = None
) -> Tensor:
    """``cos_avg`` / ``cos_max`` of unit-norm ``features`` against a unit-norm bank, own rows excluded."""
    cos = features.double() @ bank.to(features.device, torch.float64).T  # (B, M)
    valid = torch.ones_like(cos, dtype=torch.bool)
    if query_ids is not None and bank_ids is not None:
        q, m = query_ids.to(cos.device), bank_ids.to(cos.device)
        valid = ~((q[:, None] == m[None, :]) & (q[:, None] >= 0))
    if kind == "cos_max":
        best = cos.masked_fill(~valid, -math.inf).max(1).values
        return -best.exp()
    logits = (cos / temperature).masked_fill(~valid, -math.inf)
    count = valid.sum(1).clamp_min(1).double()
    return -(torch.logsumexp(logits, 1) - count.log())


class FeatureReference(nn.Module):
    """Fitted normal-reference statistics (Gaussian or feature bank) and the score against them.

    Buffers are in the state dict so a checkpoint scores on its own; the bank has as many rows as
    training cases, so it is resized when a state dict is loaded. The sensitivity statistics
    (fitted on D_train^ref only) live outside the state dict: they serve model selection during
    training, not scoring.
    """

    def __init__(self, dim: int, score: str = "mahalanobis", covariance: str = "empirical", covariance_eps: float = 1e-6,
                 temperature: float = 0.04, sensitivity_fraction: float = 0.1) -> None:
        super().__init__()
        if score not in FEATURE_SCORES:
            raise ValueError(f"unknown score {score!r}; known: {', '.join(FEATURE_SCORES)}")
        self.kind, self.covariance, self.covariance_eps = score, covariance, covariance_eps
        self.temperature, self.sensitivity_fraction = temperature, sensitivity_fraction
        gaussian = score == "mahalanobis"
        self.register_buffer("mean", torch.zeros(dim if gaussian else 0, dtype=torch.float64))
        self.register_buffer("precision", torch.zeros((dim, dim) if gaussian else (0, 0), dtype=torch.float64))
        self.register_buffer("bank", torch.zeros(0, dim))
        self.register_buffer("bank_ids", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("fitted", torch.tensor(False))
        self.sensitivity: dict[str, Any] | None = None

    def _statistics(self, features: Tensor, hashes: Tensor) -> dict[str, Tensor]:
        if self.kind == "mahalanobis":
            mean, precision = fit_gaussian(features, self.covariance, self.covariance_eps)
            return {"mean": mean, "precision": precision}
        return {"bank": features.float().cpu(), "bank_ids": hashes.cpu()}

    def _score_with(self, stats: dict[str, Tensor], features: Tensor, hashes: Tensor | None) -> Tensor:
        if self.kind == "mahalanobis":
            return mahalanobis(features, stats["mean"], stats["precision"])
        return cosine_scores(features, stats["bank"], self.kind, self.temperature, hashes, stats["bank_ids"])

    @torch.no_grad()
    def fit(self, features: Tensor, ids: list[str] | None = None) -> None:
        """Fit on all normal training features; also the D_train^ref statistics and D_train^sens scores."""
        if features.shape[0] == 0:
            raise ValueError("fit_reference got no normal training images")
        hashes = id_hashes(ids, features.shape[0])
        stats = self._statistics(features, hashes)
        for key, value in stats.items():
            setattr(self, key, value.to(getattr(self, key).device, getattr(self, key).dtype))
        self.fitted.fill_(True)
        self.sensitivity = None
        sens = in_sensitivity_split(hashes, self.sensitivity_fraction) if ids is not None else None
        if sens is not None and 0 < int(sens.sum()) and int((~sens).sum()) >= 2:
            ref = self._statistics(features[~sens], hashes[~sens])
            self.sensitivity = {"stats": ref, "sens_scores": self._score_with(ref, features[sens], None).float().cpu()}

    def score(self, features: Tensor, ids: list[str] | None = None) -> Tensor:
        if not bool(self.fitted):
            raise RuntimeError("fit_reference on normal training images must run before score")
        hashes = id_hashes(ids, features.shape[0]).to(features.device) if ids is not None else None
        stats = {"mean": self.mean, "precision": self.precision, "bank": self.bank, "bank_ids": self.bank_ids}
        return self._score_with(stats, features, hashes).float()

    def sensitivity_scores(self, features: Tensor) -> Tensor:
        """Scores against D_train^ref only (for the in-distribution test cases of the sensitivity score)."""
        if self.sensitivity is None:
            raise RuntimeError("no sensitivity split: fit_reference needs case ids and at least 3 training cases")
        return self._score_with(self.sensitivity["stats"], features, None).float()

    def sensitivity_reference(self) -> Tensor:
        """Scores of D_train^sens against D_train^ref (the label-0 side of the sensitivity AUROC)."""
        if self.sensitivity is None:
            raise RuntimeError("no sensitivity split: fit_reference needs case ids and at least 3 training cases")
        return self.sensitivity["sens_scores"]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # The bank's row count is the number of training cases at fit time: take the stored shape.
        for name in ("bank", "bank_ids"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def l2_normalise(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=1)


class ReferenceScoring:
    """Mixin for a method that scores by a ``FeatureReference`` (``self.reference``) over its
    ``self.features(image)``: ``fit_reference``, ``score`` and the label-free sensitivity hooks."""

    reference: FeatureReference
    #: dtype the reference statistics are fitted in
    reference_dtype: torch.dtype = torch.float32

    def features(self, image: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def fit_reference(self, batches: Any) -> None:
        feats, ids = [], []
        for b in batches:
            feats.append(self.features(b["image"]).to(self.reference_dtype).cpu())
            ids.extend(b.get("id") or [f"row{len(ids) + i}" for i in range(b["image"].shape[0])])
        if not feats:
            raise ValueError(f"{getattr(self, 'name', type(self).__name__)}: fit_reference got no normal training images")
        self.reference.fit(torch.cat(feats), ids)

    @torch.no_grad()
    def score(self, batch: dict[str, Any]) -> Any:
        from medood.methods.base import Scores

        return Scores(sample=self.reference.score(self.features(batch["image"]), batch.get("id")))

    @torch.no_grad()
    def sensitivity_scores(self, batch: dict[str, Any]) -> Tensor:
        """Scores against the D_train^ref statistics only (Rafiee thesis Sec. 6.1.5), for in-distribution test cases."""
        return self.reference.sensitivity_scores(self.features(batch["image"]))

    def sensitivity_reference(self) -> Tensor | None:
        """Scores of the held-out training cases D_train^sens against D_train^ref; None without a split
        (fit_reference without case ids, or too few training cases)."""
        return self.reference.sensitivity_reference() if self.reference.sensitivity is not None else None
