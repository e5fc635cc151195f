"""Evaluation as the papers and the MOOD challenge do it: metrics, the MOOD submission, plots, report.

``evaluate(model_ref, data, split="test", out=...)``:

- sample level: AUROC, AP, and accuracy / F1 / sensitivity / specificity at the checkpoint's
  threshold (chosen on the val split during training by its rule, Youden's J by default;
  ``threshold_rule`` re-chooses it on val), with 95% percentile-bootstrap intervals;
- 2D methods on volumes score slices; those are also pooled per volume (max over slices) and
  reported as ``case`` metrics;
- per anomaly type (when the shards record it, as the embedded data sets do): case-level AUROC of
  that type's cases against all normal cases, and its voxel AP;
- pixel / voxel level, for methods with maps: AP and best Dice over every voxel of every case in the
  input's own space, pooled as the MOOD challenge scores them (normal cases count with empty
  masks). They are computed on exactly the maps the MOOD submission holds (``case_maps``), for 2D
  methods on volumes too (slice maps resized to the input's plane and stacked);
- ``mood_dir``: the MOOD submission layout, ``pixel/<case>.nii.gz`` (values in [0, 1], the input
  case's shape and affine) and ``sample/<case>.nii.gz.txt`` (one value in [0, 1]); raw scores are
  mapped to [0, 1] by the checkpoint's calibration (a strictly monotone map), as serving does;
- ``report.md``, ``metrics.json``, ``scores.csv`` (one row per case), ROC and PR curves, and
  overlays of maps on a few cases.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medood.platform import checkpoint as ckpt
from medood.platform import metrics as M
from medood.platform import storage
from medood.platform.data.stream import (
    SLICE_ID,
    InputSpec,
    case_map,
    read_cases,
    read_manifest,
    read_split,
    to_torch_batch,
)


@dataclass
class ScoredSplit:
    """Scores of every sample (image, slice or volume) of one split, calibrated to [0, 1]."""

    ids: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # id -> calibrated map (spatial), kept on demand
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.labels, dtype=np.int64), np.asarray(self.scores, dtype=np.float64)


def score_split(
    model: ckpt.LoadedModel,
    data: str | Path,
    split: str,
    *,
    batch_size: int = 16,
    keep_maps: bool = False,
    keep_images: int = 0,
    device: str | torch.device = "cpu",
) -> ScoredSplit:
    """Score a split with a loaded model, through the same streaming and preprocessing as training."""
    out = ScoredSplit()
    method = model.method.to(device).eval()
    dataset = read_split(data, split, model.input_spec, training=False, batch_size=4)
    kept_images: dict[int, int] = defaultdict(int)  # per label, so overlays can show both classes
    for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
        tb = to_torch_batch(batch, device)
        with torch.no_grad():
            scores = method.score(tb)
        raw = scores.sample.float().cpu().numpy()
        calibrated = model.calibration.sample(raw)
        maps = None if scores.map is None else model.calibration.map(scores.map.float().cpu().numpy())
        for i, sample_id in enumerate(tb["id"]):
            out.ids.append(sample_id)
            out.labels.append(int(batch["label"][i]))
            out.raw.append(float(raw[i]))
            out.scores.append(float(calibrated[i]))
            has_mask = bool(batch["has_mask"][i])
            if maps is not None and (keep_maps or has_mask):
                out.maps[sample_id] = maps[i, 0].astype(np.float32)
            if has_mask:
                out.masks[sample_id] = batch["mask"][i, 0].astype(np.uint8)
            label = int(batch["label"][i])
            if maps is not None and kept_images[label] < keep_images:
                out.images[sample_id] = batch["image"][i, 0].astype(np.float32)
                out.maps.setdefault(sample_id, maps[i, 0].astype(np.float32))
                kept_images[label] += 1
    return out


def evaluate(
    model_ref: str | Path,
    data: str | Path,
    *,
    split: str = "test",
    out: str | Path = "runs/eval",
    mood_dir: str | Path | None = None,
    n_bootstrap: int = 1000,
    n_overlays: int = 3,
    batch_size: int = 16,
    threshold_rule: str | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint / run / best.json on a split; writes report.md, metrics.json and plots.

    ``model_ref``, ``data``, ``out`` and ``mood_dir`` may each be a local path or an ``s3://`` URI; the
    files for ``out`` and ``mood_dir`` are written locally first and uploaded at the end (see ``storage``).
    """
    from medood.platform.jobs import ensure_ray

    ensure_ray()
    out_location = storage.location(out)
    mood_location = None if mood_dir is None else storage.location(mood_dir)
    model = ckpt.load(model_ref)
    threshold, threshold_source = model.calibration.threshold, f"checkpoint: {model.calibration.threshold_rule}"
    if threshold_rule is not None:
        if threshold_rule not in M.THRESHOLD_RULES:
            raise ValueError(f"unknown threshold rule {threshold_rule!r}; known: {', '.join(M.THRESHOLD_RULES)}")
        if not int(read_manifest(data)["counts"].get("val", {}).get("total", 0)):
            raise ValueError(f"{data}: no val split to choose a threshold on; drop --threshold-rule to use the checkpoint's")
        y_val, s_val = score_split(model, data, "val", batch_size=batch_size).arrays()
        known = y_val >= 0
        threshold, rule = M.choose_threshold(y_val[known], s_val[known], threshold_rule)
        threshold_source = f"val split: {rule}"

    scored = score_split(model, data, split, batch_size=batch_size, keep_maps=True, keep_images=n_overlays)
    results: dict[str, Any] = {
        "model": model.name,
        "checkpoint": model.path,
        "split": split,
        "threshold": threshold,
        "threshold_source": threshold_source,
        "n_samples": len(scored.ids),
    }
    labels, scores = scored.arrays()
    results["sample"] = sample_metrics(labels, scores, threshold, n_bootstrap=n_bootstrap)
    case_ids, case_labels, case_scores = pool_cases(scored)
    if any(SLICE_ID.match(i) for i in scored.ids):
        results["case"] = sample_metrics(case_labels, case_scores, threshold, n_bootstrap=n_bootstrap)
    cases = read_cases(data, split, masks=True)
    volumes = case_maps(scored, cases, model.input_spec) if scored.maps else {}
    if volumes and any(cases[c]["mask"] is not None for c in volumes):
        results["pixel"] = pixel_metrics(volumes, cases)
    types = {c: anomaly_type(cases[c]) for c in case_ids}
    per_type = per_type_metrics(case_ids, case_labels, case_scores, types, volumes, cases)
    if per_type:
        results["per_type"] = per_type
    if mood_location is not None:
        samples = dict(zip(case_ids, case_scores.tolist()))
        with storage.staged_folder(mood_location) as staged:
            write_mood(volumes, samples, cases, staged)
        results["mood_dir"] = mood_location.uri
    with storage.staged_folder(out_location) as staged:
        write_scores_csv(staged / "scores.csv", case_ids, case_labels, case_scores, types, threshold)
        results["plots"] = write_plots(scored, labels, scores, staged, n_overlays=n_overlays)
        (staged / "metrics.json").write_text(json.dumps(results, indent=2, default=_json_default))
        (staged / "report.md").write_text(render_report(results, model))
    return results


def sample_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float, *, n_bootstrap: int = 1000) -> dict:
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    known = labels >= 0
    labels, scores = labels[known], scores[known]
    out: dict[str, Any] = {"n": int(len(labels)), "n_abnormal": int((labels == 1).sum())}
    if not M.has_both_classes(labels):
        out["note"] = "needs both normal and abnormal cases for ranking metrics"
        return out
    for name, fn in (("auroc", M.auroc), ("ap", M.average_precision)):
        out[name] = fn(labels, scores)
        out[f"{name}_ci95"] = M.bootstrap_interval(fn, labels, scores, n_resamples=n_bootstrap)
    for name, fn in (
        ("accuracy", M.accuracy),
        ("f1", M.f1),
        ("sensitivity", M.sensitivity),
        ("specificity", M.specificity),
    ):
        out[name] = fn(labels, scores, threshold)
        out[f"{name}_ci95"] = M.bootstrap_interval(
            lambda y, s, fn=fn: fn(y, s, threshold), labels, scores, n_resamples=n_bootstrap
        )
    return out


def case_maps(
    scored: ScoredSplit, cases: dict[str, dict[str, Any]], spec: InputSpec
) -> dict[str, np.ndarray]:
    """Calibrated anomaly maps in each case's input space (``stream.case_map``): what the MOOD
    submission holds. Slices never scored stay 0."""
    per_case: dict[str, list[tuple[str, np.ndarray]]] = defaultdict(list)
    for sample_id in scored.ids:
        if sample_id in scored.maps:
            match = SLICE_ID.match(sample_id)
            per_case[match["case"] if match else sample_id].append((sample_id, scored.maps[sample_id]))
    return {
        case: np.clip(case_map(samples, cases[case]["shape"], spec), 0.0, 1.0) for case, samples in per_case.items()
    }


def pixel_metrics(volumes: dict[str, np.ndarray], cases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Voxel AP and best Dice over every voxel of every case, in input space (the MOOD challenge's way).

    Cases without a mask (normal cases in most layouts) count with an empty mask.
    """
    ids = sorted(volumes)
    masks = np.concatenate([_mask_of(cases[i], volumes[i].shape).reshape(-1) for i in ids])
    maps = np.concatenate([volumes[i].reshape(-1) for i in ids])
    out: dict[str, Any] = {"n_cases": len(ids), "n_voxels": int(masks.size), "n_abnormal_voxels": int(masks.sum())}
    if masks.any() and not masks.all():
        out["ap"] = M.pixel_average_precision(masks, maps)
        out["best_dice"], out["best_dice_threshold"] = M.best_dice(masks, maps)
    return out


def anomaly_type(case: dict[str, Any]) -> str:
    """A case's anomaly type as the shards record it (``meta["anomaly"]``), ``normal`` or ``unknown``."""
    if case["label"] == 0:
        return "normal"
    kind = case.get("meta", {}).get("anomaly")
    return str(kind) if kind else ("unknown" if case["label"] == 1 else "unlabelled")


def per_type_metrics(
    case_ids: list[str],
    case_labels: np.ndarray,
    case_scores: np.ndarray,
    types: dict[str, str],
    volumes: dict[str, np.ndarray],
    cases: dict[str, dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Per anomaly type: case-level AUROC of its cases against all normal cases, and its voxel AP."""
    kinds = sorted({types[c] for c, y in zip(case_ids, case_labels) if y == 1} - {"unknown"})
    if not kinds:
        return {}
    normal = [i for i, y in enumerate(case_labels) if y == 0]
    out: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        chosen = [i for i, c in enumerate(case_ids) if types[c] == kind and case_labels[i] == 1]
        index = normal + chosen
        entry: dict[str, Any] = {"n": len(chosen)}
        if normal:
            entry["auroc"] = M.auroc(case_labels[index], case_scores[index])
        with_maps = [case_ids[i] for i in index if case_ids[i] in volumes]
        if with_maps and any(cases[c]["mask"] is not None for c in with_maps):
            entry["pixel_ap"] = pixel_metrics({c: volumes[c] for c in with_maps}, cases).get("ap")
        out[kind] = entry
    return out


def write_scores_csv(
    path: Path, case_ids: list[str], labels: np.ndarray, scores: np.ndarray, types: dict[str, str], threshold: float
) -> None:
    """One row per case: id, label, anomaly type, calibrated score, and the call at the threshold."""
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label", "anomaly", "score", "predicted_abnormal"])
        for case, label, score in zip(case_ids, labels.tolist(), scores.tolist()):
            writer.writerow([case, label, types.get(case, ""), f"{score:.6f}", int(score >= threshold)])


def pool_cases(scored: ScoredSplit) -> tuple[list[str], np.ndarray, np.ndarray]:
    """One score per case: a slice's volume gets the max over its slices, with label = any slice abnormal."""
    labels: dict[str, int] = {}
    scores: dict[str, float] = defaultdict(lambda: -np.inf)
    for sample_id, label, score in zip(scored.ids, scored.labels, scored.scores):
        match = SLICE_ID.match(sample_id)
        case = match["case"] if match else sample_id
        scores[case] = max(scores[case], score)
        labels[case] = max(labels.get(case, -1), label)
    ids = sorted(labels)
    return ids, np.array([labels[i] for i in ids], dtype=np.int64), np.array([scores[i] for i in ids], dtype=np.float64)


def write_mood(
    volumes: dict[str, np.ndarray], samples: dict[str, float], cases: dict[str, dict[str, Any]], mood_dir: Path
) -> Path:
    """MOOD layout: pixel/<case>.nii.gz maps (``case_maps``) in the input's shape and affine, sample/<case>.nii.gz.txt."""
    import nibabel as nib

    (mood_dir / "pixel").mkdir(parents=True, exist_ok=True)
    (mood_dir / "sample").mkdir(parents=True, exist_ok=True)
    for case, value in samples.items():
        name = _mood_name(case)
        (mood_dir / "sample" / f"{name}.txt").write_text(f"{min(max(value, 0.0), 1.0):.6f}\n")
        if case in volumes:
            affine = cases[case]["affine"]
            image = nib.Nifti1Image(volumes[case].astype(np.float32), affine if affine is not None else np.eye(4))
            nib.save(image, str(mood_dir / "pixel" / name))
    return mood_dir


def _mask_of(case: dict[str, Any], shape: tuple[int, ...]) -> np.ndarray:
    mask = case.get("mask")
    return np.zeros(shape, dtype=bool) if mask is None else np.asarray(mask) > 0


def write_plots(scored: ScoredSplit, labels: np.ndarray, scores: np.ndarray, out: Path, *, n_overlays: int) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    plots: dict[str, Any] = {}
    known = labels >= 0
    if M.has_both_classes(labels[known]):
        fpr, tpr, _ = roc_curve(labels[known], scores[known])
        precision, recall, _ = precision_recall_curve(labels[known], scores[known])
        for name, (x, y, xl, yl) in {
            "roc.png": (fpr, tpr, "false positive rate", "true positive rate"),
            "pr.png": (recall, precision, "recall", "precision"),
        }.items():
            fig, ax = plt.subplots(figsize=(4, 4))
            ax.plot(x, y)
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(out / name, dpi=100)
            plt.close(fig)
            plots[name.removesuffix(".png")] = name
    overlays = []
    for wanted in (1, 0):
        chosen = [i for i, y in zip(scored.ids, scored.labels) if y == wanted and i in scored.images and i in scored.maps]
        for sample_id in chosen[:n_overlays]:
            name = f"overlay_{'abnormal' if wanted else 'normal'}_{len(overlays):02d}.png"
            _overlay(scored, sample_id, out / name, plt)
            overlays.append(name)
    plots["overlays"] = overlays
    return plots


def render_report(results: dict[str, Any], model: ckpt.LoadedModel) -> str:
    lines = [
        f"# Evaluation: {model.name} on the {results['split']} split",
        "",
        f"- checkpoint: `{results['checkpoint']}`",
        f"- samples scored: {results['n_samples']}",
        f"- threshold: {results['threshold']:.4f} (from {results['threshold_source']}; scores calibrated to [0, 1])",
        "",
    ]
    for level in ("sample", "case"):
        if level not in results:
            continue
        m = results[level]
        lines += [f"## {level.capitalize()} level ({m['n']} cases, {m['n_abnormal']} abnormal)", ""]
        if "auroc" not in m:
            lines += [m.get("note", ""), ""]
            continue
        lines += ["| metric | value | 95% CI |", "| --- | --- | --- |"]
        for key in ("auroc", "ap", "accuracy", "f1", "sensitivity", "specificity"):
            low, high = m[f"{key}_ci95"]
            lines.append(f"| {key} | {m[key]:.4f} | {low:.4f} - {high:.4f} |")
        lines.append("")
    if results.get("per_type"):
        lines += ["## Per anomaly type (case level, each type against all normal cases)", "", "| type | cases | AUROC | voxel AP |", "| --- | --- | --- | --- |"]
        for kind, m in results["per_type"].items():
            auroc = f"{m['auroc']:.3f}" if "auroc" in m else "-"
            ap = f"{m['pixel_ap']:.3f}" if m.get("pixel_ap") is not None else "-"
            lines.append(f"| {kind} | {m['n']} | {auroc} | {ap} |")
        lines.append("")
    if "pixel" in results and "ap" in results["pixel"]:
        p = results["pixel"]
        lines += [
            f"## Voxel level (all {p['n_voxels']} voxels of {p['n_cases']} cases in input space, as MOOD scores them)",
            "",
            "| metric | value |",
            "| --- | --- |",
            f"| AP | {p['ap']:.4f} |",
            f"| best Dice | {p['best_dice']:.4f} (at {p['best_dice_threshold']:.3f}) |",
            "",
        ]
    plots = results.get("plots", {})
    if "roc" in plots:
        lines += ["## Curves", "", f"![ROC]({plots['roc']}) ![PR]({plots['pr']})", ""]
    if plots.get("overlays"):
        lines += ["## Anomaly maps", ""] + [f"![{name}]({name})" for name in plots["overlays"]] + [""]
    if "mood_dir" in results:
        lines += [f"MOOD submission written to `{results['mood_dir']}`.", ""]
    return "\n".join(lines)


def _overlay(scored: ScoredSplit, sample_id: str, path: Path, plt: Any) -> None:
    image, amap = scored.images[sample_id], scored.maps[sample_id]
    mask = scored.masks.get(sample_id)
    if image.ndim == 3:  # middle slice of a volume
        middle = image.shape[2] // 2
        image, amap = image[..., middle], amap[..., middle]
        mask = None if mask is None else mask[..., middle]
    fig, axes = plt.subplots(1, 2, figsize=(6, 3))
    axes[0].imshow(image, cmap="gray")
    axes[0].set_title("input")
    axes[1].imshow(image, cmap="gray")
    axes[1].imshow(amap, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    if mask is not None and mask.any():
        axes[1].contour(mask, levels=[0.5], colors="white", linewidths=0.8)
    axes[1].set_title(f"anomaly map, score {scored.scores[scored.ids.index(sample_id)]:.2f}")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(sample_id, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _mood_name(case: str) -> str:
    name = Path(case).name
    return name if name.endswith((".nii.gz", ".nii")) else f"{name}.nii.gz"


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
