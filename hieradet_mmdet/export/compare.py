"""Comparing what an exported file computes with what the eager model computes (and the relative
error every comparison in this project is made with)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

SCORE_TOL = 1e-4
BOX_TOL = 0.5  # pixels
TOP = 20  # detections compared per image, best first


def as_float64(x, device=None) -> torch.Tensor:
    x = x.detach() if torch.is_tensor(x) else torch.as_tensor(np.asarray(x, dtype=np.float64))
    return x.to(device=device, dtype=torch.float64)


def rel_err(a, b) -> float:
    """max |a - b| / max |b|, in float64; tensors or arrays (two empty ones: 0)."""
    a = as_float64(a)
    b = as_float64(b, a.device)
    if b.numel() == 0:
        return 0.0 if a.numel() == 0 else float("inf")
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def match_detections(dets: np.ndarray, labels: np.ndarray, ref_boxes: np.ndarray, ref_scores: np.ndarray,
                     ref_labels: np.ndarray, top: int = TOP) -> dict:
    """Each of the ``top`` best real rows of one image's ``dets`` (K, 5) / ``labels`` paired with
    an unused reference detection of the same label whose score is within SCORE_TOL and box
    within BOX_TOL; the closest pairing's errors are reported. Returns counts and worst errors."""
    real = labels >= 0
    dets, labels = dets[real], labels[real]
    used = np.zeros(len(ref_scores), dtype=bool)
    worst_score = worst_box = 0.0
    unmatched = 0
    for det, label in zip(dets[:top], labels[:top]):
        candidates = np.nonzero((ref_labels == label) & ~used)[0]
        if len(candidates) == 0:
            unmatched += 1
            continue
        score_err = np.abs(ref_scores[candidates] - det[4])
        box_err = np.abs(ref_boxes[candidates] - det[:4]).max(axis=1)
        best = int(np.argmin(box_err + score_err))
        if score_err[best] > SCORE_TOL or box_err[best] > BOX_TOL:
            unmatched += 1
        else:
            used[candidates[best]] = True
        worst_score, worst_box = max(worst_score, float(score_err[best])), max(worst_box, float(box_err[best]))
    return {"compared": int(min(top, len(dets))), "unmatched": unmatched, "count": int(len(dets)),
            "reference_count": int(len(ref_scores)), "max_score_diff": worst_score, "max_box_diff": worst_box}


def summarise_matches(matches: Sequence[dict]) -> dict:
    return {"images": len(matches), "compared": sum(m["compared"] for m in matches),
            "unmatched": sum(m["unmatched"] for m in matches),
            "counts": [m["count"] for m in matches], "reference_counts": [m["reference_count"] for m in matches],
            "max_score_diff": max((m["max_score_diff"] for m in matches), default=0.0),
            "max_box_diff": max((m["max_box_diff"] for m in matches), default=0.0)}
