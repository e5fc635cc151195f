"""Evaluation as the papers and the MOOD challenge do it: metrics, the MOOD submission, plots, report.

``evaluate(model_ref, data, split="test", out=...)``:

- sample level: AUROC, AP, and accuracy / F1 / sensitivity / specificity at the threshold chosen on
  the val split (F1-optimal; the checkpoint's own threshold when val has no labels), with 95%
  percentile-bootstrap intervals;
- pixel / voxel level, for methods with maps and cases with masks: AP and best Dice;
- 2D methods on volumes score slices; those are also pooled per volume (max over slices) and
  reported as ``case_*`` metrics;
- ``mood_dir``: the MOOD submission layout, ``pixel/<case>.nii.gz`` (values in [0, 1], the input
  case's shape and affine) and ``sample/<case>.nii.gz.txt`` (one value in [0, 1]); raw scores are
  mapped to [0, 1] by the checkpoint's calibration, a monotone sigmoid, as serving does;
- ``report.md``, ``metrics.json``, ROC and PR curves, and overlays of maps on a few cases.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medood.platform import checkpoint as ckpt
from medood.platform import metrics as M
from medood.platform.data.stream import read_cases, read_manifest, read_split, to_torch_batch

_SLICE_ID = re.compile(r"^(?P<case>.*)#(?P<axis>\d):(?P<index>\d+)$")


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
) -> dict[str, Any]:
    """Evaluate a checkpoint / run / best.json on a split; writes report.md, metrics.json and plots."""
    from medood.platform.jobs import ensure_ray

    ensure_ray()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = ckpt.load(model_ref)
    manifest = read_manifest(data)

    threshold, threshold_source = model.calibration.threshold, "checkpoint"
    val_counts = manifest["counts"].get("val", {})
    if split != "val" and int(val_counts.get("normal", 0)) and int(val_counts.get("abnormal", 0)):
        val = score_split(model, data, "val", batch_size=batch_size)
        y_val, s_val = val.arrays()
        known = y_val >= 0
        if M.has_both_classes(y_val[known]):
            threshold, threshold_source = M.choose_threshold(y_val[known], s_val[known]), "val split (max F1)"

    needs_volume_maps = mood_dir is not None
    scored = score_split(
        model, data, split, batch_size=batch_size, keep_maps=needs_volume_maps, keep_images=n_overlays
    )
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
    if scored.masks and scored.maps:
        results["pixel"] = pixel_metrics(scored)
    slice_view = any(_SLICE_ID.match(i) for i in scored.ids)
    if slice_view:
        case_ids, case_labels, case_scores = pool_cases(scored)
        results["case"] = sample_metrics(case_labels, case_scores, threshold, n_bootstrap=n_bootstrap)
        results["case"]["n"] = len(case_ids)
    if mood_dir is not None:
        results["mood_dir"] = str(write_mood(scored, read_cases(data, split), Path(mood_dir)))
    results["plots"] = write_plots(scored, labels, scores, out, n_overlays=n_overlays)
    (out / "metrics.json").write_text(json.dumps(results, indent=2, default=_json_default))
    (out / "report.md").write_text(render_report(results, model))
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


def pixel_metrics(scored: ScoredSplit) -> dict[str, Any]:
    ids = [i for i in scored.ids if i in scored.masks and i in scored.maps]
    masks = np.concatenate([scored.masks[i].reshape(-1) for i in ids])
    maps = np.concatenate([scored.maps[i].reshape(-1) for i in ids])
    out: dict[str, Any] = {"n_cases": len(ids), "n_abnormal_pixels": int(masks.sum())}
    if masks.any() and not masks.all():
        out["ap"] = M.pixel_average_precision(masks, maps)
        out["best_dice"], out["best_dice_threshold"] = M.best_dice(masks, maps)
    return out


def pool_cases(scored: ScoredSplit) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Slice scores -> one score per volume (max over its slices) and the volume label (any slice abnormal)."""
    labels: dict[str, int] = {}
    scores: dict[str, float] = defaultdict(lambda: -np.inf)
    for sample_id, label, score in zip(scored.ids, scored.labels, scored.scores):
        match = _SLICE_ID.match(sample_id)
        case = match["case"] if match else sample_id
        scores[case] = max(scores[case], score)
        labels[case] = max(labels.get(case, -1), label)
    ids = sorted(labels)
    return ids, np.array([labels[i] for i in ids]), np.array([scores[i] for i in ids])


def write_mood(scored: ScoredSplit, cases: dict[str, dict[str, Any]], mood_dir: Path) -> Path:
    """MOOD layout: pixel/<case>.nii.gz maps in the input's shape and affine, sample/<case>.nii.gz.txt."""
    import nibabel as nib
    from monai.transforms import Resize

    (mood_dir / "pixel").mkdir(parents=True, exist_ok=True)
    (mood_dir / "sample").mkdir(parents=True, exist_ok=True)
    volumes: dict[str, np.ndarray] = {}
    samples: dict[str, float] = defaultdict(float)
    for sample_id, score in zip(scored.ids, scored.scores):
        match = _SLICE_ID.match(sample_id)
        case = match["case"] if match else sample_id
        info = cases[case]
        shape = info["shape"]
        samples[case] = max(samples[case], float(score))
        if sample_id not in scored.maps:
            continue
        if case not in volumes:
            volumes[case] = np.zeros(shape, dtype=np.float32)
        prediction = scored.maps[sample_id]
        if match:
            axis, index = int(match["axis"]), int(match["index"])
            plane_shape = tuple(s for a, s in enumerate(shape) if a != axis)
            plane = np.asarray(Resize(plane_shape, mode="bilinear")(prediction[None]))[0]
            slicer = [slice(None)] * len(shape)
            slicer[axis] = index
            volumes[case][tuple(slicer)] = plane
        else:
            volumes[case] = np.asarray(Resize(shape, mode="trilinear" if len(shape) == 3 else "bilinear")(prediction[None]))[0]
    for case, value in samples.items():
        name = _mood_name(case)
        (mood_dir / "sample" / f"{name}.txt").write_text(f"{min(max(value, 0.0), 1.0):.6f}\n")
        if case in volumes:
            affine = cases[case]["affine"]
            image = nib.Nifti1Image(np.clip(volumes[case], 0.0, 1.0), affine if affine is not None else np.eye(4))
            nib.save(image, str(mood_dir / "pixel" / name))
    return mood_dir


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
    if "pixel" in results and "ap" in results["pixel"]:
        p = results["pixel"]
        lines += [
            f"## Pixel level ({p['n_cases']} cases with masks)",
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
