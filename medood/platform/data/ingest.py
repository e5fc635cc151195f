"""Ingest: a folder in a known layout becomes Parquet shards plus ``manifest.json``.

``ingest(layout, src, out)`` discovers the layout's cases, assigns each patient group to one split,
decodes every case once, and writes rows of ``SHARD_SCHEMA`` into zstd Parquet shards of bounded
size (``part-00000.parquet``, ...; each written under a temporary name and renamed). The manifest
records the schema version, the parameters, an input fingerprint, counts per split and label,
every shard's row count and sha256, the quarantine list and the reconciliation of files.

Splits (group-level, deterministic): groups are ordered by ``sha256(seed, pool, patient key)`` and
dealt into splits by count (largest remainder of the ``splits`` fractions), so no group is in two
splits and val and test each get at least one normal and one abnormal group whenever there are
enough. Layouts with official splits put cases in pools: ``train`` (all train), ``trainval``
(train/val by ``splits[0]:splits[1]``), ``valtest`` (val/test by ``splits[1]:splits[2]``), ``test``.
Train holds normal cases only: abnormal groups go to val/test, except a ``train_anomalies``
fraction of them (at least one when the fraction is positive) that is moved into train whole.
Groups with both normal and abnormal rows (a BraTS patient, a CheXpert patient with normal and
abnormal studies) are dealt like normal groups; in train their abnormal rows are dropped by rule
(counted in ``rows_dropped_by_rule``) unless the group is in the ``train_anomalies`` fraction.
Unlabeled groups go to train.

Accounting ("files seen"): the image files that ingest tried to read for a case (images and mask
files) are seen; each ends in a row or in quarantine, so ``files seen = files in rows + files
quarantined``. Label files a layout consumes (CSV, ``.txt``) are not images and are counted apart;
image files deliberately not used (another BraTS modality, CheXpert lateral views, abnormal cases
of a train group, image files outside the layout's folders) are counted as excluded per reason;
hidden and OS files (``.DS_Store``) and other non-image files are counted as other.

Re-running on unchanged input (same relative paths, sizes and modification times, same
parameters and salt) finds the manifest's input fingerprint unchanged and reports "up to date"
without rewriting; any rewrite produces byte-identical shards for identical input. Shards left
over from an earlier, larger ingest are removed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from medood.platform.data.layouts import (
    POOLS,
    Case,
    IngestError,
    LayoutContext,
    SourceFile,
    UsageError,
    get_layout,
    is_hidden,
    relative,
)
from medood.platform.data.privacy import Salt, pseudonymize, resolve_salt
from medood.platform.data.readers import DEFAULT_MAX_VOXELS, describe_error, image_format
from medood.platform.data.schema import GENERATION_FILE, SCHEMA_VERSION, SHARD_SCHEMA, SPLITS, Record
from medood.platform.storage import Location, location

__all__ = [
    "IngestError",
    "IngestReport",
    "QuarantineEntry",
    "UsageError",
    "assign_splits",
    "info",
    "info_tables",
    "ingest",
    "read_manifest",
]

MIB = 1024 * 1024
# Shards of at most 128 MiB give more files than CPUs on data sets of a few GiB (Ray Data reads one
# file per task), and row groups of 8 MiB hold one 128^3 float32 volume, so the first batch of a
# pass waits for one volume, not eight (issue 10).
DEFAULT_MAX_SHARD_BYTES = 128 * MIB
DEFAULT_ROW_GROUP_BYTES = 8 * MIB
MANIFEST = "manifest.json"
SHARD_PREFIX = "part-"
POOL_SPLITS: dict[str | None, tuple[str, ...]] = {
    None: ("train", "val", "test"),
    "train": ("train",),
    "trainval": ("train", "val"),
    "valtest": ("val", "test"),
    "val": ("val",),
    "test": ("test",),
}
RULE_TRAIN_ABNORMAL = "abnormal in a train group (train holds normal cases; see train_anomalies)"
NON_FINITE = "the image holds NaN or infinite values"


@dataclass(frozen=True)
class QuarantineEntry:
    """An input file that was not ingested: its path relative to the source folder, and why."""

    path: str
    reason: str


@dataclass
class IngestReport:
    """The outcome of one ``ingest`` call; ``manifest`` is what ``manifest.json`` holds."""

    out: Location  # the shards folder: a local path or ``s3://bucket/prefix`` (``str(out)``)
    manifest: dict[str, Any]
    up_to_date: bool = False
    strict: bool = False

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        return self.manifest["counts"]

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    @property
    def quarantine(self) -> list[QuarantineEntry]:
        return [QuarantineEntry(q["path"], q["reason"]) for q in self.manifest["quarantine"]]

    @property
    def reconciliation(self) -> dict[str, Any]:
        return self.manifest["reconciliation"]

    @property
    def failed(self) -> bool:
        """True in strict mode when anything was quarantined (the CLI then exits non-zero)."""
        return self.strict and bool(self.manifest["quarantine"])

    def summary(self) -> str:
        m = self.manifest
        rec = m["reconciliation"]
        head = "up to date" if self.up_to_date else "wrote"
        lines = [
            f"{head}: {self.out} ({m['rows']} rows in {len(m['shards'])} shards; layout {m['layout']}, dataset {m['dataset']})"
        ]
        for split in SPLITS:
            c = m["counts"][split]
            lines.append(
                f"  {split:<5} normal {c['normal']}, abnormal {c['abnormal']}, unlabeled {c['unlabeled']}"
                f" ({m['groups'][split]} groups)"
            )
        lines.append(
            f"files seen = files in rows + files quarantined: {rec['files_seen']} = "
            f"{rec['files_in_rows']} + {rec['files_quarantined']}"
        )
        for reason, n in sorted(rec["files_excluded"].items()):
            lines.append(f"  excluded {n}: {reason}")
        for rule, n in sorted(m["rows_dropped_by_rule"].items()):
            lines.append(f"  rows dropped {n}: {rule}")
        for entry in m["quarantine"][:20]:
            lines.append(f"  quarantined {entry['path']}: {entry['reason']}")
        if len(m["quarantine"]) > 20:
            lines.append(f"  ... and {len(m['quarantine']) - 20} more quarantined (see {MANIFEST})")
        return "\n".join(lines)


def ingest(
    layout: str,
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    seed: int = 0,
    splits: Sequence[float] = (0.8, 0.1, 0.1),
    train_anomalies: float = 0.0,
    strict: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    salt: str | None = None,
    dataset: str | None = None,
    progress: bool = True,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    **layout_options: Any,
) -> IngestReport:
    """Ingest ``src`` (in ``layout``) into shards and a manifest under ``out``.

    Per-file isolation: whatever a file holds, it ends in rows or in quarantine with a reason
    (which names a DICOM tag, never a header value), and the other files go on. Images whose
    header declares more than ``max_voxels`` voxels are refused before decoding (the limit
    ``medood serve`` uses too). ``UsageError`` (a ``ValueError``) is raised for bad arguments;
    ``IngestError`` for input that is not one file's fault (a file a label CSV lists that is
    missing, a label file that does not parse, duplicate ids). ``strict`` only marks the report:
    ``report.failed`` is true when anything was quarantined.

    For data written by ``medood.platform.data.synthetic`` (a ``generation.json`` at the root of
    ``src``), each row's meta holds the case's anomaly type as ``meta["anomaly"]`` ("normal" for
    normal cases), so evaluation can report results per anomaly type.
    """
    spec = get_layout(layout)
    unknown = sorted(set(layout_options) - set(spec.options))
    if unknown:
        allowed = ", ".join(sorted(spec.options)) or "none"
        raise UsageError(f"unknown option {unknown[0]!r} for layout {layout!r}; known: {allowed}")
    fractions = _check_splits(splits)
    if not 0.0 <= float(train_anomalies) <= 1.0:
        raise UsageError(f"train_anomalies must be in [0, 1], got {train_anomalies!r}")
    if int(max_shard_bytes) <= 0:
        raise UsageError(f"max_shard_bytes must be positive, got {max_shard_bytes!r}")
    if isinstance(max_voxels, bool) or int(max_voxels) < 1:
        raise UsageError(f"max_voxels must be a positive integer, got {max_voxels!r}")
    source_dir = Path(src).expanduser().resolve()
    out_dir = location(out)
    if not source_dir.is_dir():
        raise UsageError(f"source folder {source_dir} does not exist or is not a folder")
    if out_dir.is_local and out_dir.local_path() == source_dir:
        raise UsageError("out must differ from src")
    try:
        the_salt = resolve_salt(salt)
    except ValueError as error:
        raise UsageError(str(error)) from None
    params = _params(
        layout, layout_options, seed, fractions, train_anomalies, max_shard_bytes, dataset, the_salt
    )
    params["max_voxels"] = int(max_voxels)
    inputs = _walk(source_dir, out_dir.local_path() if out_dir.is_local else None)
    fingerprint = _fingerprint(params, source_dir, inputs)
    current = _current_manifest(out_dir)
    if current is not None and current.get("input_fingerprint") == fingerprint:
        return IngestReport(out_dir, current, up_to_date=True, strict=strict)

    context = LayoutContext(source_dir, lambda key: pseudonymize(key, the_salt), int(max_voxels))
    anomalies = _synthetic_anomalies(source_dir)
    found = spec.run(context, **layout_options)
    if not found.cases and not found.quarantined:
        raise IngestError(f"layout {layout!r} found no images under {source_dir}")
    _check_unique_case_ids(found.cases)
    assignment = assign_splits(found.cases, seed=seed, splits=fractions, train_anomalies=train_anomalies)

    out_dir.makedirs()
    # a crash from here on must not leave a manifest that vouches for half-written shards
    (out_dir / MANIFEST).unlink(missing_ok=True)
    name = dataset or layout
    writer = ShardWriter(out_dir, int(max_shard_bytes))
    tally = _Tally(excluded=list(found.excluded))
    for source, reason in found.quarantined:
        tally.quarantine_files([source], reason)
    cases = sorted(found.cases, key=lambda c: c.id)
    try:
        with _progress(progress, len(cases), f"ingest {layout}") as advance:
            for case in cases:
                advance()
                split, keep_anomalies = assignment[case.id]
                group = pseudonymize(case.group_key, the_salt)
                _ingest_case(case, split, keep_anomalies, group, name, writer, tally, source_dir, anomalies)
        shards = writer.close()
    except BaseException:
        writer.abort()  # no half-written temporary shard is left behind
        raise
    _remove_stale(out_dir, {s["path"] for s in shards})

    quarantined = {p: r for p, r in tally.quarantine.items() if p not in tally.in_rows}
    reconciliation = _reconcile(
        inputs, tally.seen, tally.in_rows, quarantined, tally.excluded, found.label_files, layout
    )
    counts = tally.counts
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "dataset": name,
        "layout": layout,
        "params": params,
        "input_fingerprint": fingerprint,
        "rows": sum(sum(c.values()) for c in counts.values()),
        "counts": {s: {**dict(counts[s]), "total": sum(counts[s].values())} for s in SPLITS},
        "groups": {s: len(tally.groups[s]) for s in SPLITS},
        "rows_dropped_by_rule": dict(sorted(tally.dropped.items())),
        "shards": shards,
        "quarantine": sorted(
            (
                {"path": tally.displays.get(p, relative(p, source_dir)), "reason": r}
                for p, r in quarantined.items()
            ),
            key=lambda q: q["path"],
        ),
        "reconciliation": reconciliation,
    }
    (out_dir / MANIFEST).write_bytes((json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return IngestReport(out_dir, manifest, up_to_date=False, strict=strict)


def assign_splits(
    cases: Sequence[Case],
    *,
    seed: int = 0,
    splits: Sequence[float] = (0.8, 0.1, 0.1),
    train_anomalies: float = 0.0,
) -> dict[str, tuple[str, bool]]:
    """Split per case id, and whether that case's group keeps its abnormal rows in train.

    Units are (official pool, patient key); see the module docstring for the rules.
    """
    weights = dict(zip(SPLITS, _check_splits(splits), strict=True))
    units: dict[tuple[str | None, str], list[Case]] = defaultdict(list)
    for case in cases:
        if case.pool not in POOLS:
            raise ValueError(f"{case.id}: unknown split pool {case.pool!r}")
        units[(case.pool, case.group_key)].append(case)
    by_stratum: dict[tuple[str | None, str], list[tuple[str, tuple[str | None, str]]]] = defaultdict(list)
    for unit, members in units.items():
        pool, key = unit
        order = hashlib.sha256(f"{seed}\x00{pool}\x00{key}".encode()).hexdigest()
        by_stratum[(pool, _stratum(members))].append((order, unit))
    decided: dict[tuple[str | None, str], tuple[str, bool]] = {}
    for (pool, stratum), entries in sorted(by_stratum.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        ordered = [unit for _, unit in sorted(entries)]
        allowed = POOL_SPLITS[pool]
        if stratum == "unlabeled":
            target = next(s for s in ("train", "test", "val") if s in allowed)
            decided.update({unit: (target, False) for unit in ordered})
            continue
        if stratum == "abnormal":
            moved = _fraction_count(train_anomalies, len(ordered)) if "train" in allowed else 0
            decided.update({unit: ("train", True) for unit in ordered[:moved]})
            rest = ordered[moved:]
            evaluation = tuple(s for s in allowed if s != "train")
            if not evaluation:  # an official train-only pool: its abnormal cases are excluded by rule
                decided.update({unit: ("train", False) for unit in rest})
                continue
            for unit, split in zip(rest, _deal(len(rest), evaluation, weights), strict=True):
                decided[unit] = (split, False)
            continue
        dealt = list(zip(ordered, _deal(len(ordered), allowed, weights), strict=True))
        in_train = [unit for unit, split in dealt if split == "train"]
        keep = (
            set(in_train[: _fraction_count(train_anomalies, len(in_train))]) if stratum == "mixed" else set()
        )
        decided.update({unit: (split, unit in keep) for unit, split in dealt})
    return {case.id: decided[(case.pool, case.group_key)] for case in cases}


def read_manifest(shards_dir: str | os.PathLike[str] | Location) -> dict[str, Any]:
    """The ``manifest.json`` of a shards folder (a local path or ``s3://bucket/prefix``)."""
    folder = location(shards_dir)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {folder}; run `medood ingest` first")
    return json.loads(path.read_text())


def info(shards_dir: str | os.PathLike[str] | Location) -> dict[str, Any]:
    """Counts per split and label, shards, quarantine summary and reconciliation of a shards folder.

    Reads ``manifest.json``; without one (shards copied without it) counts come from the shards.
    """
    folder = location(shards_dir)
    shard_files = folder.listdir(f"{SHARD_PREFIX}*.parquet")
    if not (folder / MANIFEST).is_file():
        if not shard_files:
            raise FileNotFoundError(f"no {MANIFEST} or {SHARD_PREFIX}*.parquet in {folder}")
        return _info_from_shards(folder, shard_files)
    manifest = read_manifest(folder)
    listed = [s["path"] for s in manifest["shards"]]
    reasons = Counter(q["reason"] for q in manifest["quarantine"])
    return {
        "path": str(folder),
        "dataset": manifest["dataset"],
        "layout": manifest["layout"],
        "schema_version": manifest["schema_version"],
        "rows": manifest["rows"],
        "counts": manifest["counts"],
        "groups": manifest["groups"],
        "shards": len(listed),
        "bytes": sum(s["bytes"] for s in manifest["shards"]),
        "missing_shards": [p for p in listed if not (folder / p).is_file()],
        "unlisted_shards": [p for p in shard_files if p not in listed],
        "quarantine": {"files": len(manifest["quarantine"]), "by_reason": dict(reasons.most_common())},
        "rows_dropped_by_rule": manifest["rows_dropped_by_rule"],
        "reconciliation": manifest["reconciliation"],
        "params": manifest["params"],
    }


def info_tables(summary: dict[str, Any]) -> list[Any]:
    """Rich tables for ``info``'s dict: counts per split and label, then the quarantine summary."""
    from rich.table import Table

    counts = Table(title=f"{summary.get('dataset') or '?'} — {summary['path']}")
    for column in ("split", "normal", "abnormal", "unlabeled", "total", "groups"):
        counts.add_column(column, justify="left" if column == "split" else "right")
    for split in SPLITS:
        c = summary["counts"].get(split, {})
        counts.add_row(
            split,
            *(str(c.get(k, 0)) for k in ("normal", "abnormal", "unlabeled", "total")),
            str(summary.get("groups", {}).get(split, "")),
        )
    tables: list[Any] = [counts]
    rec = summary.get("reconciliation")
    if rec:
        files = Table(title="files")
        files.add_column("files seen = in rows + quarantined")
        files.add_column("excluded", justify="right")
        files.add_column("label files", justify="right")
        files.add_column("other", justify="right")
        files.add_row(
            f"{rec['files_seen']} = {rec['files_in_rows']} + {rec['files_quarantined']}",
            str(sum(rec["files_excluded"].values())),
            str(rec["label_files"]),
            str(rec["other_files"]),
        )
        tables.append(files)
    by_reason = summary.get("quarantine", {}).get("by_reason", {})
    if by_reason:
        quarantine = Table(title=f"quarantine ({summary['quarantine']['files']} files)")
        quarantine.add_column("files", justify="right")
        quarantine.add_column("reason")
        for reason, n in by_reason.items():
            quarantine.add_row(str(n), reason)
        tables.append(quarantine)
    return tables


# --- one case ----------------------------------------------------------------------------------------


@dataclass
class _Tally:
    """What happened to every file and row during one ingest."""

    excluded: list[tuple[Path, str]] = field(default_factory=list)
    quarantine: dict[Path, str] = field(default_factory=dict)
    displays: dict[Path, str] = field(default_factory=dict)
    seen: set[Path] = field(default_factory=set)
    in_rows: set[Path] = field(default_factory=set)
    dropped: Counter[str] = field(default_factory=Counter)
    counts: dict[str, Counter[str]] = field(
        default_factory=lambda: {s: Counter({"normal": 0, "abnormal": 0, "unlabeled": 0}) for s in SPLITS}
    )
    groups: dict[str, set[str]] = field(default_factory=lambda: {s: set() for s in SPLITS})
    row_sources: dict[str, str] = field(default_factory=dict)

    def see(self, files: Sequence[SourceFile]) -> None:
        for f in files:
            self.seen.add(f.path)
            self.displays[f.path] = f.display

    def quarantine_files(self, files: Sequence[SourceFile], reason: str) -> None:
        self.see(files)
        for f in files:
            self.quarantine.setdefault(f.path, reason)


def _ingest_case(
    case: Case,
    split: str,
    keep_anomalies: bool,
    group: str,
    dataset: str,
    writer: ShardWriter,
    tally: _Tally,
    src: Path,
    anomalies: dict[str, str] | None = None,
) -> None:
    """Read one case and write its rows, or record why its files are excluded or quarantined.

    Nothing a file holds escapes as an exception: decoding, checking and building the rows all
    happen before the first row is written, and any failure quarantines the case's files.
    """
    if split == "train" and case.label == 1 and not case.mixed and not keep_anomalies:
        tally.excluded.extend((f.path, RULE_TRAIN_ABNORMAL) for f in case.files)
        return
    tally.see(case.files)
    try:
        loaded = case.load()
        kept, dropped = [], Counter(loaded.dropped)
        for item in loaded.items:
            if split == "train" and item.label == 1 and not keep_anomalies:
                dropped[RULE_TRAIN_ABNORMAL] += 1
            else:
                kept.append(item)
        rows = []
        for item in kept:
            if not _finite(item.image.array):
                raise ValueError(NON_FINITE)
            meta = {**item.image.meta, **item.meta}
            if anomalies is not None and case.files[0].display in anomalies:
                meta["anomaly"] = anomalies[case.files[0].display]
            record = Record(
                id=item.id,
                dataset=dataset,
                split=split,
                label=item.label,
                group=group,
                image=item.image.array,
                mask=item.mask,
                spacing=item.image.spacing,
                affine=item.image.affine,
                meta=meta,
            )
            rows.append((item, record.to_row()))
    except IngestError:
        raise
    except Exception as error:  # corrupt, truncated, unsupported, too large: quarantine and go on
        tally.quarantine_files(case.files, _sanitize(describe_error(error), case, src))
        return
    tally.dropped.update(dropped)
    if not rows:
        rules = ", ".join(sorted(loaded.dropped)) or RULE_TRAIN_ABNORMAL
        tally.quarantine_files(case.files, f"no rows left after rules ({rules})")
        return
    for item, row in rows:
        if item.id in tally.row_sources:
            raise IngestError(
                f"duplicate id {item.id!r}: from {tally.row_sources[item.id]} and {case.files[0].display}"
            )
        tally.row_sources[item.id] = case.files[0].display
        writer.add(row)
        tally.counts[split][{0: "normal", 1: "abnormal", None: "unlabeled"}[item.label]] += 1
        tally.groups[split].add(group)
    tally.in_rows.update(f.path for f in case.files)


def _finite(array: Any) -> bool:
    return array.dtype.kind not in "fc" or bool(np.isfinite(array).all())


def _synthetic_anomalies(src: Path) -> dict[str, str] | None:
    """File (relative to ``src``) -> anomaly type, from a synthetic data set's ``generation.json``."""
    path = src / GENERATION_FILE
    if not path.is_file():
        return None
    try:
        cases = json.loads(path.read_text())["cases"]
        return {str(c["file"]): str(c.get("anomaly") or "normal") for c in cases}
    except Exception:  # not ours, or damaged: rows simply carry no anomaly type
        return None


# --- shard writing -----------------------------------------------------------------------------------


class ShardWriter:
    """Packs rows into ``part-NNNNN.parquet`` files of at most ``max_shard_bytes`` of row data.

    A row larger than the bound gets a shard of its own. Rows are flushed in row groups of about
    ``row_group_bytes`` (at least one row), so memory stays bounded whatever the shard size.
    """

    def __init__(
        self, out: Location, max_shard_bytes: int, row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES
    ) -> None:
        self.out = out
        # A shard is written to a local temporary file, then renamed into a local ``out`` or uploaded
        # to object storage (where it appears whole); its size and sha256 come from the local file.
        self._staging = out.local_path() if out.is_local else Path(tempfile.mkdtemp(prefix="medood-ingest-"))
        self.max_shard_bytes = max_shard_bytes
        self.row_group_bytes = min(row_group_bytes, max_shard_bytes)
        self.shards: list[dict[str, Any]] = []
        self._buffer: list[dict[str, Any]] = []
        self._buffer_bytes = 0
        self._shard_bytes = 0
        self._shard_rows = 0
        self._writer: pq.ParquetWriter | None = None

    def add(self, row: dict[str, Any]) -> None:
        size = len(row["image"]) + len(row["mask"] or b"") + len(row["meta"]) + 256
        if self._shard_rows and self._shard_bytes + size > self.max_shard_bytes:
            self._finish_shard()
        self._buffer.append(row)
        self._buffer_bytes += size
        self._shard_bytes += size
        self._shard_rows += 1
        if self._buffer_bytes >= self.row_group_bytes:
            self._flush()

    def close(self) -> list[dict[str, Any]]:
        if self._shard_rows:
            self._finish_shard()
        self._drop_staging()
        return self.shards

    def _drop_staging(self) -> None:
        if not self.out.is_local:
            shutil.rmtree(self._staging, ignore_errors=True)

    def abort(self) -> None:
        """Drop the shard being written (its temporary file); finished shards stay."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._temporary().unlink(missing_ok=True)
        self._buffer = []
        self._drop_staging()

    def _temporary(self) -> Path:
        return self._staging / f".{self._name()}.tmp"

    def _name(self) -> str:
        return f"{SHARD_PREFIX}{len(self.shards):05d}.parquet"

    def _flush(self) -> None:
        if not self._buffer:
            return
        if self._writer is None:
            self._writer = pq.ParquetWriter(
                self._temporary(),
                SHARD_SCHEMA,
                compression="zstd",
                use_dictionary=["dataset", "split", "group", "dtype"],
                write_statistics=["id", "dataset", "split", "label", "group", "dtype"],
            )
        table = pa.Table.from_pylist(self._buffer, schema=SHARD_SCHEMA)
        self._writer.write_table(table, row_group_size=len(self._buffer))
        self._buffer = []
        self._buffer_bytes = 0

    def _finish_shard(self) -> None:
        self._flush()
        assert self._writer is not None
        self._writer.close()
        self._writer = None
        temporary = self._temporary()
        shard = {
            "path": self._name(),
            "rows": self._shard_rows,
            "bytes": temporary.stat().st_size,
            "sha256": _sha256_file(temporary),
        }
        (self.out / self._name()).upload(temporary)
        self.shards.append(shard)
        self._shard_bytes = 0
        self._shard_rows = 0


# --- helpers -----------------------------------------------------------------------------------------


def _check_splits(splits: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(s) for s in splits)
    if len(values) != 3 or any(v < 0 or math.isnan(v) for v in values) or abs(sum(values) - 1.0) > 1e-6:
        shown = ",".join(str(s) for s in splits)
        raise UsageError(
            f"splits must be three non-negative fractions (train,val,test) summing to 1, got {shown}"
        )
    return values  # type: ignore[return-value]


def _stratum(cases: list[Case]) -> str:
    labels = {c.label for c in cases if not c.mixed}
    if any(c.mixed for c in cases) or {0, 1} <= labels:
        return "mixed"
    if 1 in labels:
        return "abnormal"
    if 0 in labels:
        return "normal"
    return "unlabeled"


def _fraction_count(fraction: float, n: int) -> int:
    if fraction <= 0 or n == 0:
        return 0
    return min(n, max(1, round(fraction * n)))


def _deal(n: int, allowed: tuple[str, ...], weights: dict[str, float]) -> list[str]:
    """``n`` split names in order: counts by largest remainder, then at least one per weighted split.

    Priority for the at-least-one rule is train, test, val; a split gives one away only while it
    keeps one itself.
    """
    if n == 0 or not allowed:
        return []
    w = [weights[s] for s in allowed]
    total = sum(w)
    if total <= 0:
        return [allowed[-1]] * n
    quotas = [n * x / total for x in w]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(allowed)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    for split in ("train", "test", "val"):
        if split not in allowed or weights[split] <= 0:
            continue
        i = allowed.index(split)
        if counts[i] == 0:
            donors = [j for j in range(len(allowed)) if counts[j] > 1]
            if not donors:
                break
            j = max(donors, key=lambda d: (counts[d], -d))
            counts[j] -= 1
            counts[i] += 1
    return [split for split, count in zip(allowed, counts, strict=True) for _ in range(count)]


def _check_unique_case_ids(cases: Sequence[Case]) -> None:
    first: dict[str, Case] = {}
    for case in cases:
        if case.id in first:
            raise IngestError(
                f"duplicate id {case.id!r}: from {first[case.id].files[0].display} and {case.files[0].display}"
            )
        first[case.id] = case


def _params(
    layout: str,
    options: dict[str, Any],
    seed: int,
    splits: tuple[float, float, float],
    train_anomalies: float,
    max_shard_bytes: int,
    dataset: str | None,
    salt: Salt,
) -> dict[str, Any]:
    try:
        from importlib.metadata import version

        medood_version = version("medood")
    except Exception:  # not installed (running from a checkout)
        medood_version = "unknown"
    source = "user" if salt.source in ("argument", "MEDOOD_SALT") else "secret file (~/.medood/salt)"
    return {
        "layout": layout,
        "options": {
            k: options[k]
            if isinstance(options[k], (bool, int, float, str)) or options[k] is None
            else str(options[k])
            for k in sorted(options)
        },
        "seed": int(seed),
        "splits": list(splits),
        "train_anomalies": float(train_anomalies),
        "max_shard_bytes": int(max_shard_bytes),
        "dataset": dataset or layout,
        "salt": {"source": source, "fingerprint": salt.fingerprint},
        "schema_version": SCHEMA_VERSION,
        "medood_version": medood_version,
    }


def _walk(src: Path, out: Path | None) -> list[tuple[Path, os.stat_result]]:
    """Every regular file under ``src`` (hidden ones included, a local ``out`` excluded), sorted."""
    files = []
    for root, dirs, names in os.walk(src):
        root_path = Path(root)
        dirs[:] = sorted(d for d in dirs if (root_path / d).resolve() != out)
        for name in sorted(names):
            path = root_path / name
            try:
                stat = path.stat()
            except OSError:
                continue
            if path.is_file():
                files.append((path, stat))
    return sorted(files, key=lambda f: f[0])


def _fingerprint(params: dict[str, Any], src: Path, inputs: list[tuple[Path, os.stat_result]]) -> str:
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for path, stat in inputs:
        digest.update(f"{relative(path, src)}\x00{stat.st_size}\x00{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _current_manifest(out: Location) -> dict[str, Any] | None:
    """The manifest in ``out`` if it and every shard it lists are intact, else None."""
    try:
        manifest = read_manifest(out)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    for shard in manifest.get("shards", []):
        path = out / shard["path"]
        if not path.is_file() or path.size() != shard["bytes"]:
            return None
    return manifest


def _remove_stale(out: Location, keep: set[str]) -> None:
    for name in out.listdir(f"{SHARD_PREFIX}*.parquet"):
        if name not in keep:
            (out / name).unlink()
    for name in out.listdir(f".{SHARD_PREFIX}*.tmp"):
        (out / name).unlink()


def _reconcile(
    inputs: list[tuple[Path, os.stat_result]],
    seen: set[Path],
    in_rows: set[Path],
    quarantined: dict[Path, str],
    excluded: list[tuple[Path, str]],
    label_files: list[Path],
    layout: str,
) -> dict[str, Any]:
    excluded_reasons: dict[Path, str] = {}
    for path, reason in excluded:
        if path not in seen:
            excluded_reasons.setdefault(path, reason)
    labels = set(label_files)
    other = 0
    for path, _ in inputs:
        if path in seen or path in excluded_reasons or path in labels:
            continue
        if is_hidden([path.name]) or image_format(path) is None:
            other += 1
        else:
            excluded_reasons[path] = f"not part of the {layout!r} layout's folders"
    return {
        "files_seen": len(seen),
        "files_in_rows": len(in_rows),
        "files_quarantined": len(quarantined),
        "balanced": len(seen) == len(in_rows) + len(quarantined),
        "files_excluded": dict(sorted(Counter(excluded_reasons.values()).items())),
        "label_files": len(labels),
        "other_files": other,
    }


def _sanitize(reason: str, case: Case, src: Path) -> str:
    """Keep source paths (which may hold patient ids, as RSNA's do) out of quarantine reasons."""
    for f in case.files:
        reason = reason.replace(str(f.path), f.display).replace(f.path.name, Path(f.display).name)
    return reason.replace(str(src), "<src>")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def _info_from_shards(folder: Location, shard_files: list[str]) -> dict[str, Any]:
    counts = {s: Counter({"normal": 0, "abnormal": 0, "unlabeled": 0}) for s in SPLITS}
    groups: dict[str, set[str]] = {s: set() for s in SPLITS}
    datasets: set[str] = set()
    for name in shard_files:
        table = pq.read_table(
            (folder / name).path, columns=["dataset", "split", "label", "group"], filesystem=folder.filesystem
        )
        for row in table.to_pylist():
            key = {0: "normal", 1: "abnormal", None: "unlabeled"}[row["label"]]
            counts[row["split"]][key] += 1
            groups[row["split"]].add(row["group"])
            datasets.add(row["dataset"])
    return {
        "path": str(folder),
        "dataset": ", ".join(sorted(datasets)),
        "layout": None,
        "schema_version": SCHEMA_VERSION,
        "rows": sum(sum(c.values()) for c in counts.values()),
        "counts": {s: {**dict(counts[s]), "total": sum(counts[s].values())} for s in SPLITS},
        "groups": {s: len(groups[s]) for s in SPLITS},
        "shards": len(shard_files),
        "bytes": sum((folder / n).size() for n in shard_files),
        "missing_shards": [],
        "unlisted_shards": shard_files,
        "quarantine": {"files": 0, "by_reason": {}},
        "rows_dropped_by_rule": {},
        "reconciliation": None,
        "params": None,
    }


class _progress:
    """A rich progress bar over cases when ``enabled``; yields a callable that advances it."""

    def __init__(self, enabled: bool, total: int, description: str) -> None:
        self.enabled = enabled
        self.total = total
        self.description = description
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
        )
        self._bar.__enter__()
        self._task = self._bar.add_task(self.description, total=self.total)
        return lambda: self._bar.advance(self._task)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
