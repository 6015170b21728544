"""Zero-shot classification of event embeddings against class-prompt text embeddings.

Prompts (METHOD.md "Towers"): one template per dataset, optionally several (an ensemble)
and several names per class; every prompt embedding is normalised, averaged per class and
renormalised. N-ImageNet mini: pre-train on classes 0-79, evaluate on held-out 80-99; the
release ranks predictions against all 100 prompts (`rank_against="all"`, default), the other
option ranks against the 20 held-out prompts only (`rank_against="heldout"`).

Tie rule: classes with exactly equal similarity rank in ascending class-id order (the lower
id first), the same stable rule as `retrieval`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from jax.sharding import Mesh

from evclip_jax.embed import l2_normalize_f64 as l2_normalize
from evclip_jax.evaluate.common import (
    EmbedFn,
    check_embeddings,
    check_labels,
    embed_dataset,
)
from evclip_jax.evaluate.knn import knn_translate

DATASET_TEMPLATES = {
    "nimagenet": ("a photo of a {label}",),
    "ncaltech101": ("a point cloud image of a {label}",),
    "nmnist": ("The digit {label}",),
}

RankAgainst = Literal["all", "heldout"]


def top_k_accuracy(
    scores: np.ndarray,
    labels: np.ndarray,
    ks: Sequence[int] = (1, 5),
    candidate_classes: np.ndarray | None = None,
) -> dict[str, float]:
    """{"top{k}": fraction} for score matrix [n, C] whose column j is class candidate_classes[j].

    A sample is correct at k when its true class ranks in the first k, ranking by descending
    score with ties in column order (keep `candidate_classes` sorted so that means lower
    class id first). k larger than C counts every sample as correct.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(f"scores: expected a non-empty [n, C] matrix, got {scores.shape}")
    labels = check_labels("labels", labels, scores.shape[0])
    columns = _label_columns(labels, scores.shape[1], candidate_classes)
    rows = np.arange(scores.shape[0])
    true = scores[rows, columns][:, None]
    before = np.arange(scores.shape[1])[None, :] < columns[:, None]
    rank = np.sum(scores > true, axis=1) + np.sum((scores == true) & before, axis=1)
    out = {}
    for k in ks:
        if int(k) < 1:
            raise ValueError(f"ks: expected positive integers, got {tuple(ks)}")
        out[f"top{int(k)}"] = float(np.mean(rank < int(k)))
    return out


def _label_columns(labels: np.ndarray, num_columns: int, candidate_classes) -> np.ndarray:
    """Column of each label among the candidates; ValueError if a label is not a candidate."""
    if candidate_classes is None:
        candidate_classes = np.arange(num_columns)
    candidate_classes = np.asarray(candidate_classes, dtype=np.int64)
    if candidate_classes.shape != (num_columns,):
        raise ValueError(f"candidate_classes: expected {num_columns} ids, "
                         f"got shape {candidate_classes.shape}")
    order = np.argsort(candidate_classes, kind="stable")
    found = np.searchsorted(candidate_classes[order], labels).clip(0, num_columns - 1)
    ok = candidate_classes[order][found] == labels
    if not np.all(ok):
        raise ValueError(
            f"labels {np.unique(labels[~ok])[:10]} are not among the candidate classes")
    return order[found]


def zeroshot_metrics(
    event_emb: np.ndarray,
    labels: np.ndarray,
    class_text_emb: np.ndarray,
    eval_classes: Iterable[int] | None = None,
    rank_against: RankAgainst = "all",
    ks: Sequence[int] = (1, 5),
    return_details: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[str, np.ndarray]]:
    """Top-k zero-shot accuracy of embeddings against class text embeddings [M, D], or
    against each sample's own class texts [n, M, D] (hybrid prompts, whose content prompts
    come from the sample's embedding; prompts.per_query_class_text).

    `eval_classes`: keep only samples of these class ids (default: all samples).
    `rank_against`: "all" ranks against all M prompts (release), "heldout" only against the
    `eval_classes` prompts. Metrics: {"top1", "top5", "num_samples"}. Details (for the
    report): "class_ids", "per_class_accuracy" (top-1, NaN for a class without samples),
    "candidate_ids", "confusion" [len(class_ids), len(candidate_ids)] counts (rows: true,
    columns: predicted), "labels", "predictions".
    """
    event_emb = check_embeddings("event_emb", event_emb)
    per_sample = np.ndim(class_text_emb) == 3
    if per_sample:
        class_text_emb = np.asarray(class_text_emb)
        n, dim = event_emb.shape
        if class_text_emb.shape[::2] != (n, dim) or not np.all(np.isfinite(class_text_emb)):
            raise ValueError(f"class_text_emb: expected finite per-sample class texts [{n}, M, "
                             f"{dim}], got shape {class_text_emb.shape}")
    else:
        class_text_emb = check_embeddings("class_text_emb", class_text_emb, event_emb.shape[1])
    labels = check_labels("labels", labels, event_emb.shape[0])
    num_classes = class_text_emb.shape[-2]
    if eval_classes is None:
        if rank_against == "heldout":
            raise ValueError("rank_against='heldout' needs eval_classes (the held-out ids)")
        eval_ids = np.unique(labels)
    else:
        eval_ids = np.unique(np.asarray(list(eval_classes), dtype=np.int64))
        if eval_ids.size == 0:
            raise ValueError("eval_classes is empty")
        keep = np.isin(labels, eval_ids)
        event_emb, labels = event_emb[keep], labels[keep]
        if per_sample:
            class_text_emb = class_text_emb[keep]
    if labels.size == 0:
        raise ValueError(f"zeroshot: no samples with a label in eval_classes {eval_ids}")
    if eval_ids.min() < 0 or eval_ids.max() >= num_classes:
        raise ValueError(
            f"zeroshot: class ids must be in [0, {num_classes}) (rows of class_text_emb), "
            f"got ids up to {eval_ids.max()}")
    if rank_against == "all":
        candidates = np.arange(num_classes)
    elif rank_against == "heldout":
        candidates = eval_ids
    else:
        raise ValueError(f"rank_against: expected 'all' or 'heldout', got {rank_against!r}")
    if per_sample:
        sims = np.einsum("nd,ncd->nc", l2_normalize(event_emb),
                         l2_normalize(class_text_emb[:, candidates]))
    else:
        sims = l2_normalize(event_emb) @ l2_normalize(class_text_emb[candidates]).T
    metrics = top_k_accuracy(sims, labels, ks, candidates)
    metrics["num_samples"] = float(labels.size)
    if not return_details:
        return metrics
    predictions = candidates[np.argmax(sims, axis=1)]  # first max = lower class id on ties
    rows = np.searchsorted(eval_ids, labels)
    cols = np.searchsorted(candidates, predictions)
    confusion = np.zeros((eval_ids.size, candidates.size), dtype=np.int64)
    np.add.at(confusion, (rows, cols), 1)
    correct = np.bincount(rows, weights=predictions == labels, minlength=eval_ids.size)
    counts = np.bincount(rows, minlength=eval_ids.size)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(counts > 0, correct / counts, np.nan)
    details = {
        "class_ids": eval_ids,
        "per_class_accuracy": per_class,
        "candidate_ids": candidates,
        "confusion": confusion,
        "labels": labels,
        "predictions": predictions,
    }
    return metrics, details


def evaluate_zeroshot(
    embed_fn: EmbedFn,
    batches: Iterable[Mapping[str, object]],
    class_text_emb: np.ndarray,
    eval_classes: Iterable[int] | None = None,
    rank_against: RankAgainst = "all",
    ks: Sequence[int] = (1, 5),
    knn_pool: np.ndarray | None = None,
    knn_k: int = 10,
    knn_weighting: Literal["softmax", "cosine"] = "softmax",
    knn_temperature: float = 0.01,
    mesh: Mesh | None = None,
    input_key: str = "events",
    return_details: bool = False,
    params: Any = None,
) -> dict[str, float] | tuple[dict[str, float], dict[str, np.ndarray]]:
    """Embed `batches` with `embed_fn(x)` (or `embed_fn(params, x)`) and score zero-shot top-k.

    Metrics and details as in `zeroshot_metrics`. With `knn_pool` (image embeddings [P, D])
    the event embeddings first go through EZSR k-NN translation (`knn.knn_translate`).
    """
    event_emb, labels = embed_dataset(embed_fn, batches, mesh, input_key, params=params)
    if knn_pool is not None:
        event_emb = knn_translate(event_emb, knn_pool, knn_k, knn_weighting, knn_temperature)
    return zeroshot_metrics(event_emb, labels, class_text_emb, eval_classes, rank_against, ks,
                            return_details)
