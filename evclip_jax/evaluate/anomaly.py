"""Video anomaly detection (paper Sec. 4.1): text-prompt anomaly score per event instance.

Event instances come from video (`evclip_jax.events.synthesis.video_to_event_frames`: 16
differenced frames stacked into one event frame, instance label = majority vote, 1 =
anomaly). This module only consumes the resulting batches; converting stacked counts into
the event tower's input is the embed function's job.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from jax.sharding import Mesh

from evclip_jax.embed import l2_normalize_f64 as l2_normalize
from evclip_jax.evaluate.common import EmbedFn, check_embeddings, embed_dataset

# s = exp(logit_scale); CLIP clamps s at 100 (log 4.6). A value this large is almost
# certainly s itself passed by mistake.
_MAX_LOG_SCALE = 10.0


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve, labels 1 = anomaly (positive), 0 = normal.

    Mann-Whitney U with average ranks, so tied scores count one half:
    AUC = (sum of positive ranks - P (P + 1) / 2) / (P N). Raises ValueError when only one
    class is present (the AUC is undefined).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(
            f"roc_auc: scores has {scores.shape[0]} entries, labels {labels.shape[0]}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("roc_auc: scores contain NaN or inf")
    if not np.all(np.isin(labels, (0, 1))):
        raise ValueError(f"roc_auc: labels must be 0 (normal) or 1 (anomaly), got "
                         f"{np.unique(labels)[:10]}")
    positive = labels.astype(bool)
    num_pos = int(positive.sum())
    num_neg = positive.size - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError(
            f"roc_auc: need both normal (0) and anomalous (1) labels, got {num_pos} anomalous "
            f"and {num_neg} normal")
    # Average (mid) ranks, 1-based: a run of tied values occupying ranks a..b gets (a+b)/2.
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts).astype(np.float64)
    ranks = ((ends - counts + 1.0 + ends) / 2.0)[inverse]
    u = ranks[positive].sum() - num_pos * (num_pos + 1) / 2.0
    return float(u / (num_pos * num_neg))


def anomaly_scores(
    event_emb: np.ndarray,
    normal_text_emb: np.ndarray,
    abnormal_text_emb: np.ndarray,
    logit_scale: float,
) -> np.ndarray:
    """Anomaly probability per event instance, float64 [n].

    Softmax over the concatenated [normal prompts, abnormal prompts] of s * e t^T with
    normalised e, t and s = exp(logit_scale) (CLIP's stored log scale, METHOD.md L_zs),
    then the summed probability of the abnormal prompts. Each text argument is [P, D] or [D].
    """
    event_emb = check_embeddings("event_emb", event_emb)
    dim = event_emb.shape[1]
    normal = check_embeddings("normal_text_emb", np.atleast_2d(normal_text_emb), dim)
    abnormal = check_embeddings("abnormal_text_emb", np.atleast_2d(abnormal_text_emb), dim)
    if normal.shape[0] == 0 or abnormal.shape[0] == 0:
        raise ValueError("anomaly_scores: need at least one normal and one abnormal prompt")
    logit_scale = float(logit_scale)
    if not np.isfinite(logit_scale) or logit_scale > _MAX_LOG_SCALE:
        raise ValueError(
            f"logit_scale is log(s) (CLIP's parameter, about 4.6 for s=100); got "
            f"{logit_scale}. Pass the log of the multiplier.")
    texts = l2_normalize(np.concatenate([normal, abnormal]))
    logits = np.exp(logit_scale) * (l2_normalize(event_emb) @ texts.T)
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    return probs[:, normal.shape[0]:].sum(axis=1)


def evaluate_anomaly(
    embed_fn: EmbedFn,
    batches: Iterable[Mapping[str, object]],
    normal_text_emb: np.ndarray,
    abnormal_text_emb: np.ndarray,
    logit_scale: float,
    mesh: Mesh | None = None,
    input_key: str = "events",
    return_details: bool = False,
    params: Any = None,
) -> dict[str, float] | tuple[dict[str, float], dict[str, np.ndarray]]:
    """ROC AUC of `anomaly_scores` over one dataset's event instances ("labels": 1 = anomaly).

    `embed_fn(x)`, or `embed_fn(params, x)` when `params` is given.

    Returns {"auc", "num_instances", "num_anomalous"}; with `return_details`, also
    {"scores", "labels"} for the ROC plot in `report.write_report`.
    """
    event_emb, labels = embed_dataset(embed_fn, batches, mesh, input_key, params=params)
    scores = anomaly_scores(event_emb, normal_text_emb, abnormal_text_emb, logit_scale)
    metrics = {
        "auc": roc_auc(scores, labels),
        "num_instances": float(labels.shape[0]),
        "num_anomalous": float(np.sum(labels == 1)),
    }
    if return_details:
        return metrics, {"scores": scores, "labels": labels}
    return metrics
