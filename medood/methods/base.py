"""The anomaly-detection method contract and the method registry.

A method is an ``nn.Module`` registered by name with a ``Config`` dataclass whose defaults are the
paper's values. The platform (Ray Train, Tune, Serve, evaluation) only ever sees this contract:

- ``Config``: dataclass of hyperparameters; ``presets`` maps names (``paper``, ``tiny``, ...) to dicts
  of overrides. Every method's config has ``spatial_dims``, ``image_size`` and ``in_channels`` (what
  the data pipeline must feed it) plus ``batch_size`` and ``seed``.
- ``stages()``: the ordered training phases, each with its epochs. A training-free method (the
  reference floors) returns none, sets ``trainable = False`` and fits everything in ``fit_reference``.
- ``configure_optimizers(stage)``: ``{optimizer_name: torch.optim.Optimizer}`` for one stage.
- ``training_step(batch, stage)``: a dict of losses. The optimizer named ``main`` minimises ``loss``;
  any other optimizer ``k`` minimises ``loss_k``. A missing key means "do not step that optimizer this
  iteration" (SQUID updates its generators every second iteration). Each loss is back-propagated only
  into its own optimizer's parameters, so a discriminator loss never moves the generator.
  Other keys are logged as metrics. In eval mode (``not self.training``; the platform's validation,
  under ``torch.no_grad``) it computes the same losses as a validation loss and must change no state:
  no queue, memory, counter, centre, EMA or running-statistics update.
- ``configure_schedulers(stage, optimizers)``: optional per-epoch learning-rate schedulers.
- Stage hooks (optional, called on every Train worker; the default does nothing and costs nothing):

  * ``stage_statistics(stage, batches) -> {name: Tensor}`` before a stage's first epoch, with the
    worker's part of the whole training split (known anomalies included, labels as in training; in
    eval mode, no gradients). Return ``{}`` (without iterating) when the stage needs nothing. The
    platform concatenates every tensor along dim 0 across workers, in rank order, and hands the
    result to ``begin_stage(stage, statistics)`` on every worker, so a deterministic fit there
    (k-means with a fixed seed) gives every rank the same state.
  * ``epoch_statistics(stage) -> {name: Tensor}`` after each training epoch; the platform sums every
    tensor across workers and hands the sums to ``end_epoch(stage, epoch, statistics)`` (sphere pruning
    from assignment counts). ``epoch`` counts from 0 within the stage.

  A run resumed in the middle of a stage does not call ``begin_stage`` again: what it fitted must be
  in the state dict.
- ``fit_reference(batches)``: optional, run on normal training data (known anomalies removed) before
  each validation, in eval mode; the one place besides training where state may change.
- ``score(batch) -> Scores``: higher = more anomalous; ``map`` is per pixel / voxel, or ``None``.
  Scoring never changes state.
- ``to_checkpoint()`` / ``from_checkpoint()``: plain dict of tensors, strings and numbers, so it loads
  with ``torch.load(weights_only=True)``.

This module imports no Ray and touches no files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

CHECKPOINT_FORMAT = 1

# A batch as the platform hands it to a method:
#   image: float32 (B, C, *spatial), intensities scaled to [0, 1]
#   mask:  float32 (B, 1, *spatial) ground-truth anomaly mask, or absent
#   label: int64 (B,), 0 normal, 1 abnormal, -1 unknown
#   id:    list[str]
Batch = dict[str, Any]


@dataclass
class BaseConfig:
    """Fields every method has. Subclasses add their own, with the paper's defaults."""

    spatial_dims: int = 2
    image_size: int = 128
    in_channels: int = 1
    batch_size: int = 16
    seed: int = 0


@dataclass(frozen=True)
class Stage:
    """One training phase: a name and how many epochs it runs."""

    name: str
    epochs: int


@dataclass
class Scores:
    """What ``score`` returns: one value per sample (B,), and optionally a map (B, 1, *spatial)."""

    sample: Tensor
    map: Tensor | None = None


class AnomalyMethod(nn.Module):
    """Base class of every registered method."""

    name: ClassVar[str] = ""
    trainable: ClassVar[bool] = True  # False: no stages; fitted in fit_reference only
    Config: ClassVar[type] = BaseConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {"paper": {}, "tiny": {}}

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def config_fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls.Config)}

    @classmethod
    def make_config(cls, preset: str | None = "paper", overrides: dict[str, Any] | None = None) -> Any:
        """Resolve ``Config`` defaults, then a preset's overrides, then the user's overrides.

        Unknown presets and keys raise ``ValueError`` naming the valid ones; values given as
        strings (from the CLI's ``--set key=value``) are parsed to the field's type.
        """
        values: dict[str, Any] = {}
        if preset is not None:
            if preset not in cls.presets:
                raise ValueError(
                    f"unknown preset {preset!r} for method {cls.name!r}; known: {', '.join(sorted(cls.presets))}"
                )
            values.update(cls.presets[preset])
        values.update(overrides or {})
        fields = cls.config_fields()
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(
                f"unknown config key(s) {', '.join(map(repr, unknown))} for method {cls.name!r}; "
                f"valid keys: {', '.join(sorted(fields))}"
            )
        defaults = cls.Config()
        parsed = {k: _coerce(k, v, getattr(defaults, k)) for k, v in values.items()}
        config = dataclasses.replace(defaults, **parsed)
        validate = getattr(config, "validate", None)
        if callable(validate):
            validate()
        return config

    @classmethod
    def build(cls, preset: str | None = "paper", **overrides: Any) -> AnomalyMethod:
        return cls(cls.make_config(preset, overrides))

    # -- training ---------------------------------------------------------------------------

    def stages(self) -> list[Stage]:
        raise NotImplementedError

    def configure_optimizers(self, stage: str) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def configure_schedulers(
        self, stage: str, optimizers: dict[str, torch.optim.Optimizer]
    ) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        """Optional: learning-rate schedulers by optimizer name, stepped once per epoch (default: none)."""
        return {}

    def training_step(self, batch: Batch, stage: str) -> dict[str, Tensor]:
        raise NotImplementedError

    @classmethod
    def uses_auxiliary_images(cls, config: Any) -> bool:
        """Whether ``training_step`` reads ``batch["aux_image"]``: images of an auxiliary set (e.g. the
        negatives' source in seed 002 ch. 6-7), one per training image, which the platform draws from
        the shard folder the user names (``medood train --aux-data``). Default: no."""
        return False

    def forward(self, batch: Batch, stage: str) -> dict[str, Tensor]:
        # DistributedDataParallel synchronises gradients only for calls that go through forward.
        return self.training_step(batch, stage)

    def stage_statistics(self, stage: str, batches: Iterable[Batch]) -> dict[str, Tensor]:
        """Optional: this worker's statistics of the training split before ``stage`` (default: none)."""
        return {}

    def begin_stage(self, stage: str, statistics: dict[str, Tensor]) -> None:  # noqa: B027 - optional hook
        """Optional: start ``stage`` from ``stage_statistics`` concatenated over all workers (default: nothing)."""

    def epoch_statistics(self, stage: str) -> dict[str, Tensor]:
        """Optional: this worker's per-epoch statistics, summed over workers for ``end_epoch`` (default: none)."""
        return {}

    def end_epoch(self, stage: str, epoch: int, statistics: dict[str, Tensor]) -> None:  # noqa: B027 - optional hook
        """Optional: act on the epoch's statistics summed over all workers (default: nothing)."""

    def fit_reference(self, batches: Iterable[Batch]) -> None:  # noqa: B027 - optional hook
        """Optional: statistics from normal training data after training (default: none)."""

    @torch.no_grad()
    def score(self, batch: Batch) -> Scores:
        raise NotImplementedError

    # -- checkpoints ------------------------------------------------------------------------

    def to_checkpoint(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "method": self.name,
            "config": dataclasses.asdict(self.config),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }

    @staticmethod
    def from_checkpoint(payload: dict[str, Any]) -> AnomalyMethod:
        if payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"unsupported checkpoint format {payload.get('format')!r}; expected {CHECKPOINT_FORMAT}"
            )
        cls = get(payload["method"])
        config = cls.make_config(None, payload["config"])
        method = cls(config)
        method.load_state_dict(payload["state_dict"])
        method.eval()
        return method


def read_state_dict(path: str, field_name: str) -> dict[str, Tensor]:
    """Pretrained weights from a local file the user names in ``field_name`` (nothing is downloaded).

    Accepts a bare state dict or one under ``state_dict`` / ``model`` (as training scripts save them);
    tensors only (``weights_only``). A missing or unreadable file is a ``ValueError`` naming both.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{field_name}={path!r}: no such file (expected a local PyTorch state dict, "
                         "e.g. saved with torch.save(model.state_dict(), FILE))") from None
    except Exception as error:  # pickle errors, truncated zip archives, non-tensor payloads
        raise ValueError(f"{field_name}={path!r}: not a readable PyTorch state dict ({error})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{field_name}={path!r}: expected a dict of tensors (a state dict)")
    return state


# -- registry -----------------------------------------------------------------------------------

_REGISTRY: dict[str, type[AnomalyMethod]] = {}
M = TypeVar("M", bound=type[AnomalyMethod])


def register(name: str) -> Callable[[M], M]:
    """Class decorator: ``@register("squid")`` adds the method to the registry under ``name``."""

    def wrap(cls: M) -> M:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def get(name: str) -> type[AnomalyMethod]:
    _load_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def names() -> list[str]:
    _load_builtin_methods()
    return sorted(_REGISTRY)


def _load_builtin_methods() -> None:
    import medood.methods  # noqa: F401  (importing the package registers the built-in methods)


# -- helpers ------------------------------------------------------------------------------------


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Parse a CLI string (or YAML scalar) into the type of the field's default."""
    if not isinstance(value, str) or isinstance(default, str):
        if isinstance(default, tuple) and isinstance(value, list):
            return tuple(value)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    text = value.strip()
    try:
        if isinstance(default, bool):
            if text.lower() in {"1", "true", "yes", "on"}:
                return True
            if text.lower() in {"0", "false", "no", "off"}:
                return False
            raise ValueError
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, tuple):
            items = [p for p in text.strip("()[]").split(",") if p.strip()]
            kinds = [type(d) for d in default] or [float] * len(items)
            return tuple((kinds[i] if i < len(kinds) else kinds[-1])(p.strip()) for i, p in enumerate(items))
        if default is None:
            import yaml

            return yaml.safe_load(text)
    except ValueError:
        raise ValueError(
            f"config key {key!r}: cannot parse {value!r} as {type(default).__name__}"
        ) from None
    return value


def default_field(value: Any) -> Any:
    """``dataclasses.field`` for mutable defaults (tuples are preferred and need none)."""
    return field(default_factory=lambda: value)

