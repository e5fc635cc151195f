"""Search spaces and ablation grids of the registered methods: ``<method>.yaml`` next to this file.

A file has three top-level keys::

    method: squid
    space:                       # what `medood tune --space default` samples
      lr: {loguniform: [3.0e-5, 3.0e-4]}
      grid: {choice: [1, 2, 4]}
      top_k: {grid: [1, 5]}      # grid axes are crossed with every sample
      lambda_dis: 0.005          # a plain value is held fixed
    ablations:                   # what `medood tune --ablation NAME` runs, one trial per setting
      patch_grid:                # a grid: the cross product of the listed values
        description: Patch grid N x N (Fig. 4.6)
        source: thesis 003, Sec. 4.4
        grid: {grid: [1, 2, 4, 8]}
        paper: {"grid=2": {auroc: 0.876}}
      components:                # rows: named settings, in the order of the paper's table
        description: Component study (Table 4.4)
        rows:
          - {name: Full SQUID, set: {}, paper: {auroc: 0.876}}
          - {name: w/o Space-aware Memory, set: {space_aware: false}, paper: {auroc: 0.776}}

Distributions (the names Ray Tune gives them): ``choice: [values]``, ``grid: [values]``,
``uniform: [low, high]``, ``loguniform: [low, high]``, ``randint: [low, high]`` (``high`` excluded),
``quniform: [low, high, q]``. Every key must be a field of the method's ``Config`` (an unknown one is
an error that names the valid fields); an ablation may also hold ``set:`` overrides applied to all
its settings. ``paper`` holds the published figures (fractions, test split) printed beside ours.

This module imports no Ray: ``medood.platform.tune`` turns a ``SearchSpace`` into a Tune param space.
``check_values`` builds ``make_config(preset, point)`` for every grid point and a sample of the space,
so a value the method would refuse is caught before any trial starts.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint", "quniform")
PAPER_METRICS = ("auroc", "ap", "pixel_ap")  # pixel_ap: voxel-level AP pooled over the test set (MOOD)
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Distribution:
    """One axis of a search space: ``kind`` (one of ``DISTRIBUTIONS``) and its arguments."""

    kind: str
    args: tuple[Any, ...]

    @property
    def is_grid(self) -> bool:
        return self.kind == "grid"

    @property
    def is_log(self) -> bool:
        return self.kind == "loguniform"

    def values(self) -> list[Any] | None:
        """The finite set of values of ``choice`` / ``grid``; ``None`` for continuous ones."""
        return list(self.args) if self.kind in ("choice", "grid") else None

    def sample(self, rng: random.Random) -> Any:
        """One value, drawn the way Tune draws it (used to check the space without Ray)."""
        if self.kind in ("choice", "grid"):
            return rng.choice(self.args)
        if self.kind == "uniform":
            return rng.uniform(*self.args)
        if self.kind == "loguniform":
            low, high = self.args
            return math.exp(rng.uniform(math.log(low), math.log(high)))
        if self.kind == "randint":
            return rng.randrange(self.args[0], self.args[1])
        low, high, q = self.args
        return _quantize(rng.uniform(low, high), q)

    def extremes(self) -> list[Any]:
        """Values worth checking on every preset: each option, or both ends of a range."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        if self.kind == "quniform":
            low, high, q = self.args
            return [_quantize(low, q), _quantize(high, q)]
        return [self.args[0], self.args[1]]


@dataclass(frozen=True)
class Setting:
    """One row of an ablation: a label, the config overrides it means, and the paper's figures."""

    label: str
    overrides: dict[str, Any]
    paper: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Ablation:
    """A named grid that reproduces one of the paper's tables or sweeps."""

    name: str
    description: str
    source: str
    settings: tuple[Setting, ...]
    swept: tuple[str, ...]  # the config fields that vary between settings
    form: str  # "grid" (columns = swept fields) or "rows" (one "Setting" column)

    def setting(self, label: str) -> Setting:
        for s in self.settings:
            if s.label == label:
                return s
        raise ValueError(
            f"unknown setting {label!r} of ablation {self.name!r}; known: {', '.join(s.label for s in self.settings)}"
        )


@dataclass(frozen=True)
class SearchSpace:
    """A method's ``space`` (distributions or fixed values) and its named ``ablations``."""

    method: str
    space: dict[str, Distribution | Any]
    ablations: dict[str, Ablation]
    path: str = ""

    def ablation(self, name: str) -> Ablation:
        if name not in self.ablations:
            known = ", ".join(self.ablations) or "none"
            raise ValueError(f"unknown ablation {name!r} for method {self.method!r}; known: {known}")
        return self.ablations[name]

    @property
    def swept(self) -> tuple[str, ...]:
        """Fields of ``space`` that vary (distributions, not fixed values)."""
        return tuple(k for k, v in self.space.items() if isinstance(v, Distribution))

    def grid_points(self) -> list[dict[str, Any]]:
        """The cross product of the space's ``grid`` axes (one empty point if it has none)."""
        axes = {k: v.args for k, v in self.space.items() if isinstance(v, Distribution) and v.is_grid}
        return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]

    def sample(self, rng: random.Random) -> dict[str, Any]:
        """One point of the space: fixed values, a sample of each distribution (grid axes too)."""
        return {k: v.sample(rng) if isinstance(v, Distribution) else v for k, v in self.space.items()}


def path_for(method: str) -> Path:
    """Where a registered method's space file lives."""
    return HERE / f"{method}.yaml"


def available() -> list[str]:
    """Methods that have a space file."""
    return sorted(p.stem for p in HERE.glob("*.yaml"))


def load(method: str, path: str | Path | None = None) -> SearchSpace:
    """Read and structurally validate ``<method>.yaml`` (or ``path``) against the method's ``Config``."""
    from medood import methods

    cls = methods.get(method)
    path = Path(path) if path is not None else path_for(method)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no search space for method {method!r}; methods with one: {', '.join(available()) or 'none'}"
        )
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
    return parse(document, method, sorted(cls.config_fields()), source=str(path))


def parse(document: Any, method: str, fields: list[str], *, source: str = "<space>") -> SearchSpace:
    """Validate a space document (the parsed YAML) and build the ``SearchSpace``.

    ``fields`` are the names of the method's ``Config`` fields; any other key is an error naming them.
    """
    if not isinstance(document, dict):
        raise ValueError(f"{source}: expected a mapping with keys method, space, ablations")
    unknown = sorted(set(document) - {"method", "space", "ablations"})
    if unknown:
        raise ValueError(f"{source}: unknown top-level key(s) {unknown}; known: method, space, ablations")
    if document.get("method", method) != method:
        raise ValueError(f"{source}: written for method {document['method']!r}, loaded for {method!r}")
    where = f"{source}: space"
    raw_space = document.get("space") or {}
    if not isinstance(raw_space, dict):
        raise ValueError(f"{where}: expected a mapping of config field -> distribution or value")
    _check_fields(raw_space, fields, method, where)
    space = {key: _parse_axis(value, f"{where}.{key}") for key, value in raw_space.items()}
    raw_ablations = document.get("ablations") or {}
    if not isinstance(raw_ablations, dict):
        raise ValueError(f"{source}: ablations: expected a mapping of name -> ablation")
    ablations = {
        str(name): _parse_ablation(str(name), spec, fields, method, f"{source}: ablations.{name}")
        for name, spec in raw_ablations.items()
    }
    return SearchSpace(method=method, space=space, ablations=ablations, path=source)


def check_values(
    space: SearchSpace,
    preset: str | None,
    overrides: dict[str, Any] | None = None,
    *,
    samples: int = 16,
    seed: int = 0,
) -> None:
    """Build ``make_config(preset, overrides + point)`` for points of ``space.space``; raise on the first bad one.

    The points: every option of every axis alone, and ``samples`` random points of the whole space.
    """
    from medood import methods

    cls = methods.get(space.method)
    base = dict(overrides or {})
    points: list[dict[str, Any]] = []
    fixed = {k: v for k, v in space.space.items() if not isinstance(v, Distribution)}
    for key, axis in space.space.items():
        if isinstance(axis, Distribution):
            points.extend({**fixed, key: value} for value in axis.extremes())
    rng = random.Random(seed)
    points.extend(space.sample(rng) for _ in range(samples))
    points = points or [fixed]
    for point in points:
        try:
            cls.make_config(preset, {**base, **point})
        except ValueError as error:
            raise ValueError(
                f"{space.path}: space point {_describe(point)} is not valid for {space.method!r} "
                f"(preset {preset!r}): {error}"
            ) from None


def valid_settings(
    ablation: Ablation, method: str, preset: str | None, overrides: dict[str, Any] | None = None
) -> tuple[list[Setting], list[tuple[Setting, str]]]:
    """Split an ablation's settings into those ``make_config`` accepts under ``preset`` and those it refuses.

    A paper's grid can hold points a small preset cannot build (SQUID's 8 x 8 grid on the ``tiny``
    preset's 64-pixel images); ``medood tune`` runs the others and lists these with the reason.
    """
    from medood import methods

    cls = methods.get(method)
    good: list[Setting] = []
    bad: list[tuple[Setting, str]] = []
    for setting in ablation.settings:
        try:
            cls.make_config(preset, {**(overrides or {}), **setting.overrides})
        except ValueError as error:
            bad.append((setting, str(error)))
        else:
            good.append(setting)
    return good, bad


def format_value(value: Any) -> str:
    """How a config value appears in labels and tables: ``(1, 10)``, ``true``, ``0.0003``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(format_value(v) for v in value) + ")"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# -- helpers ------------------------------------------------------------------------------------


def _check_fields(mapping: dict[str, Any], fields: list[str], method: str, where: str) -> None:
    unknown = sorted(set(map(str, mapping)) - set(fields))
    if unknown:
        raise ValueError(
            f"{where}: {', '.join(map(repr, unknown))} is not a field of {method}'s Config; "
            f"valid fields: {', '.join(fields)}"
        )


def _parse_axis(value: Any, where: str) -> Distribution | Any:
    """A ``{kind: args}`` mapping becomes a ``Distribution``; anything else is a fixed value."""
    if not isinstance(value, dict):
        return _plain(value)
    if len(value) != 1:
        raise ValueError(f"{where}: a distribution is one of {', '.join(DISTRIBUTIONS)} with its arguments")
    kind, args = next(iter(value.items()))
    if kind not in DISTRIBUTIONS:
        raise ValueError(f"{where}: unknown distribution {kind!r}; known: {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, list) or not args:
        raise ValueError(f"{where}: {kind} takes a non-empty list, got {args!r}")
    args = [_plain(a) for a in args]
    if kind in ("choice", "grid"):
        return Distribution(kind, tuple(args))
    arity = 3 if kind == "quniform" else 2
    if len(args) != arity or not all(_is_number(a) for a in args):
        shape = "[low, high, q]" if kind == "quniform" else "[low, high]"
        raise ValueError(f"{where}: {kind} takes {shape} numbers, got {args!r}")
    low, high = args[0], args[1]
    if not low < high:
        raise ValueError(f"{where}: {kind} needs low < high, got {args!r}")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"{where}: loguniform needs low > 0, got {low!r}")
    if kind == "randint" and not (isinstance(low, int) and isinstance(high, int)):
        raise ValueError(f"{where}: randint takes integers [low, high), got {args!r}")
    if kind == "quniform" and args[2] <= 0:
        raise ValueError(f"{where}: quniform needs q > 0, got {args[2]!r}")
    return Distribution(kind, tuple(args))


def _parse_ablation(name: str, spec: Any, fields: list[str], method: str, where: str) -> Ablation:
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected a mapping with description, source, and grid or rows")
    allowed = {"description", "source", "grid", "rows", "set", "paper"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {', '.join(sorted(allowed))}")
    if ("grid" in spec) == ("rows" in spec):
        raise ValueError(f"{where}: give exactly one of grid (cross product of values) or rows (named settings)")
    fixed = spec.get("set") or {}
    if not isinstance(fixed, dict):
        raise ValueError(f"{where}.set: expected a mapping of config field -> value")
    _check_fields(fixed, fields, method, f"{where}.set")
    fixed = {k: _plain(v) for k, v in fixed.items()}
    if "grid" in spec:
        grid = spec["grid"]
        if not isinstance(grid, dict) or not grid:
            raise ValueError(f"{where}.grid: expected a mapping of config field -> list of values")
        _check_fields(grid, fields, method, f"{where}.grid")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"{where}.grid.{key}: expected a non-empty list of values, got {values!r}")
        swept = tuple(grid)
        settings = []
        for combo in itertools.product(*([_plain(v) for v in values] for values in grid.values())):
            point = dict(zip(swept, combo))
            label = ", ".join(f"{k}={format_value(v)}" for k, v in point.items())
            settings.append(Setting(label, {**fixed, **point}))
        paper = spec.get("paper") or {}
        if not isinstance(paper, dict):
            raise ValueError(f"{where}.paper: expected a mapping of setting label -> {{auroc: ..., ap: ...}}")
        labels = [s.label for s in settings]
        for label in paper:
            if label not in labels:
                raise ValueError(f"{where}.paper: no setting labelled {label!r}; settings: {', '.join(labels)}")
        settings = [
            Setting(s.label, s.overrides, _paper(paper.get(s.label), f"{where}.paper.{s.label}")) for s in settings
        ]
        form = "grid"
    else:
        if "paper" in spec:
            raise ValueError(f"{where}: with rows, give each row's paper figures in the row")
        rows = spec["rows"]
        if not isinstance(rows, list) or not rows:
            raise ValueError(f"{where}.rows: expected a non-empty list of {{name, set, paper}}")
        settings = []
        for i, row in enumerate(rows):
            at = f"{where}.rows[{i}]"
            if not isinstance(row, dict) or "name" not in row or not (set(row) <= {"name", "set", "paper"}):
                raise ValueError(f"{at}: expected a mapping with name, set and optionally paper")
            overrides = row.get("set") or {}
            if not isinstance(overrides, dict):
                raise ValueError(f"{at}.set: expected a mapping of config field -> value")
            _check_fields(overrides, fields, method, f"{at}.set")
            settings.append(
                Setting(
                    str(row["name"]),
                    {**fixed, **{k: _plain(v) for k, v in overrides.items()}},
                    _paper(row.get("paper"), f"{at}.paper"),
                )
            )
        labels = [s.label for s in settings]
        if len(set(labels)) != len(labels):
            raise ValueError(f"{where}.rows: row names must be unique, got {labels}")
        swept = tuple(sorted({k for s in settings for k in s.overrides} - set(fixed)))
        form = "rows"
    return Ablation(
        name=name,
        description=str(spec.get("description", "")),
        source=str(spec.get("source", "")),
        settings=tuple(settings),
        swept=swept,
        form=form,
    )


def _paper(values: Any, where: str) -> dict[str, float]:
    if values is None:
        return {}
    if not isinstance(values, dict) or not set(values) <= set(PAPER_METRICS):
        raise ValueError(f"{where}: expected a mapping with keys among {', '.join(PAPER_METRICS)}")
    for key, value in values.items():
        if not _is_number(value) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{where}.{key}: expected a fraction in [0, 1], got {value!r}")
    return {k: float(v) for k, v in values.items()}


def _plain(value: Any) -> Any:
    """YAML lists become tuples (hashable, what ``Config`` tuple fields hold)."""
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _quantize(value: float, q: float) -> float:
    # Tune's quniform rounds to the nearest multiple of q; round again to drop float noise (0.30000000000000004).
    return round(round(value / q) * q, 10)


def _describe(point: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in point.items()) + "}"


__all__ = [
    "DISTRIBUTIONS",
    "Ablation",
    "Distribution",
    "SearchSpace",
    "Setting",
    "available",
    "check_values",
    "format_value",
    "load",
    "parse",
    "path_for",
    "valid_settings",
]
