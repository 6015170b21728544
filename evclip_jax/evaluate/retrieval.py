"""Cross-modal retrieval metrics (METHOD.md "Evaluation metrics"): R@K, mAP@1/5, MRR.

A key is relevant to a query when their class labels are equal. Keys are ranked by cosine
similarity, computed in float64 after L2-normalising both sides.

Tie rule: keys are ordered by a stable sort on descending similarity, so keys with exactly
equal similarity keep ascending key-index order (the lower key index ranks first). The
same rule is used by every metric here, by `zeroshot.top_k_accuracy` (lower class id first)
and by `knn.knn_translate` (lower pool index first).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh

from evclip_jax.embed import l2_normalize_f64 as l2_normalize
from evclip_jax.evaluate.common import (
    EmbedFn,
    check_embeddings,
    check_labels,
    embed_batches,
)

MAP_KS = (1, 5)  # METHOD.md / paper Table 4 report mAP@1 and mAP@5.

# Chunk so that one float64 similarity block plus its argsort stays around 256 MiB.
_CHUNK_ELEMENTS = 1 << 24


def _check_inputs(query_emb, query_labels, key_emb, key_labels):
    query_emb = check_embeddings("query_emb", query_emb)
    key_emb = check_embeddings("key_emb", key_emb, dim=query_emb.shape[1])
    if query_emb.shape[0] == 0 or key_emb.shape[0] == 0:
        raise ValueError(
            f"retrieval: need at least one query and one key, got {query_emb.shape[0]} "
            f"queries and {key_emb.shape[0]} keys"
        )
    query_labels = check_labels("query_labels", query_labels, query_emb.shape[0])
    key_labels = check_labels("key_labels", key_labels, key_emb.shape[0])
    return query_emb, query_labels, key_emb, key_labels


def ranked_relevance(
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    key_emb: np.ndarray,
    key_labels: np.ndarray,
    chunk_size: int | None = None,
) -> Iterator[np.ndarray]:
    """Yield bool [c, num_keys] blocks: rel[i, r] = key at rank r is relevant to query i.

    Queries are processed in chunks of `chunk_size` rows (default: sized to ~16M elements).
    """
    query_emb, query_labels, key_emb, key_labels = _check_inputs(
        query_emb, query_labels, key_emb, key_labels)
    q = l2_normalize(query_emb)
    k = l2_normalize(key_emb)
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // k.shape[0])
    for start in range(0, q.shape[0], chunk_size):
        sims = q[start:start + chunk_size] @ k.T
        # Stable sort of -sim: descending similarity, ties keep ascending key index.
        order = np.argsort(-sims, axis=1, kind="stable")
        yield key_labels[order] == query_labels[start:start + chunk_size, None]


def _metrics_from_relevance(rel: np.ndarray, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-query hit / AP / reciprocal-rank values from one ranked relevance block."""
    out = {}
    for k in ks:
        out[f"R@{k}"] = rel[:, :k].any(axis=1).astype(np.float64)
    for k in MAP_KS:
        top = rel[:, :k].astype(np.float64)
        hits = np.cumsum(top, axis=1)
        precision = hits / np.arange(1, top.shape[1] + 1)
        num_rel = hits[:, -1]
        ap = np.sum(precision * top, axis=1) / np.maximum(num_rel, 1.0)
        out[f"mAP@{k}"] = np.where(num_rel > 0, ap, 0.0)
    any_rel = rel.any(axis=1)
    first = np.argmax(rel, axis=1)  # index of the first True (0 when none; masked below)
    out["MRR"] = np.where(any_rel, 1.0 / (first + 1.0), 0.0)
    return out


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks: expected positive integers, got {ks}")
    return ks


def retrieval_metrics(
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    key_emb: np.ndarray,
    key_labels: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """R@K for K in `ks`, mAP@1, mAP@5 and MRR as fractions, averaged over all queries.

    R@K: share of queries with a relevant key in the top K. AP@K = sum_{k<=K} P@k * rel_k /
    (relevant keys in the top K), 0 when there are none. MRR: mean 1/rank of the first
    relevant key (a query with no relevant key at all contributes 0). Ties: see module doc.
    """
    ks = _check_ks(ks)
    sums: dict[str, float] = {}
    num_queries = 0
    for rel in ranked_relevance(query_emb, query_labels, key_emb, key_labels):
        for name, values in _metrics_from_relevance(rel, ks).items():
            sums[name] = sums.get(name, 0.0) + float(values.sum())
        num_queries += rel.shape[0]
    names = [f"R@{k}" for k in ks] + [f"mAP@{k}" for k in MAP_KS] + ["MRR"]
    return {name: sums[name] / num_queries for name in names}


def recall_curve(
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    key_emb: np.ndarray,
    key_labels: np.ndarray,
    max_k: int = 50,
) -> tuple[np.ndarray, np.ndarray]:
    """(ks = 1..min(max_k, num_keys), R@K for each K) for recall@K plots."""
    if max_k < 1:
        raise ValueError(f"max_k: expected a positive integer, got {max_k}")
    hits, num_queries = None, 0
    for rel in ranked_relevance(query_emb, query_labels, key_emb, key_labels):
        rel = rel[:, :max_k]
        # First-hit-by-rank-K indicator, summed over queries.
        block = np.logical_or.accumulate(rel, axis=1).sum(axis=0)
        hits = block if hits is None else hits + block
        num_queries += rel.shape[0]
    ks = np.arange(1, hits.shape[0] + 1)
    return ks, hits / num_queries


DIRECTIONS = ("event_to_image", "image_to_event", "event_to_text", "text_to_event")


def _directions(event_emb, event_labels, image_emb, image_labels, text_emb, text_labels,
                text_query_classes) -> list[tuple[str, tuple, tuple]]:
    """(direction, (query emb, labels), (key emb, labels)) of every direction with inputs."""
    out = []
    if image_emb is not None:
        images = (image_emb, event_labels if image_labels is None else image_labels)
        events = (event_emb, event_labels)
        out += [("event_to_image", events, images), ("image_to_event", images, events)]
    if text_emb is not None:
        text_emb = np.asarray(text_emb)
        text_labels = np.arange(text_emb.shape[0]) if text_labels is None else text_labels
        text_labels = np.asarray(text_labels)
        queries = (text_emb, text_labels)
        if text_query_classes is not None:
            rows = np.isin(text_labels, text_query_classes)
            queries = (text_emb[rows], text_labels[rows])
        out += [("event_to_text", (event_emb, event_labels), (text_emb, text_labels)),
                ("text_to_event", queries, (event_emb, event_labels))]
    if not out:
        raise ValueError("cross_modal_retrieval: pass image_emb and/or text_emb")
    return out


def cross_modal_retrieval(
    event_emb: np.ndarray,
    event_labels: np.ndarray,
    image_emb: np.ndarray | None = None,
    image_labels: np.ndarray | None = None,
    text_emb: np.ndarray | None = None,
    text_labels: np.ndarray | None = None,
    ks: Sequence[int] = (1, 5, 10),
    text_query_classes: Sequence[int] | None = None,
    curve_max_k: int = 0,
) -> dict[str, dict[str, float]] | tuple[dict[str, dict[str, float]], dict[str, dict]]:
    """Retrieval metrics for event->image, image->event, event->text and text->event.

    Image directions need `image_emb` (labels default to `event_labels`, i.e. the paired
    images of the same eval set); text directions need `text_emb`, one row per class prompt
    (labels default to 0..M-1); text queries can be limited to `text_query_classes` (so every
    query has relevant events). Returns {direction: retrieval_metrics(...)}; with
    `curve_max_k` > 0 also {direction: {"ks", "recall"}} recall@K curves for the report.
    """
    directions = _directions(event_emb, event_labels, image_emb, image_labels, text_emb,
                             text_labels, text_query_classes)
    metrics = {name: retrieval_metrics(*q, *k, ks) for name, q, k in directions}
    if curve_max_k <= 0:
        return metrics
    curves = {}
    for name, q, k in directions:
        ks_curve, recall = recall_curve(*q, *k, max_k=curve_max_k)
        curves[name] = {"ks": ks_curve, "recall": recall}
    return metrics, curves


def evaluate_retrieval(
    event_embed_fn: EmbedFn,
    batches: Iterable[Mapping[str, object]],
    image_embed_fn: EmbedFn | None = None,
    class_text_emb: np.ndarray | None = None,
    ks: Sequence[int] = (1, 5, 10),
    mesh: Mesh | None = None,
    curve_max_k: int = 50,
    return_details: bool = False,
    event_params: Any = None,
    image_params: Any = None,
) -> dict[str, float] | tuple[dict[str, float], dict[str, dict[str, np.ndarray]]]:
    """Embed "events" (and paired "images") of `batches`, then score all directions.

    Each embed function is called as `fn(x)`, or `fn(params, x)` when its params are given.

    Returns a flat dict {"event_to_image/R@1": ..., ...}. With `return_details`, also
    {direction: {"ks": ..., "recall": ...}} recall@K curves for `report.write_report`.
    """
    fns = {"events": event_embed_fn}
    if image_embed_fn is not None:
        fns["images"] = image_embed_fn
    params = {key: p for key, p in (("events", event_params), ("images", image_params))
              if p is not None and key in fns}
    embeddings, labels = embed_batches(fns, batches, mesh, params=params)
    per_direction, curves = cross_modal_retrieval(
        embeddings["events"], labels, embeddings.get("images"), None, class_text_emb, None, ks,
        curve_max_k=curve_max_k)
    metrics = {f"{d}/{name}": value
               for d, values in per_direction.items() for name, value in values.items()}
    return (metrics, curves) if return_details else metrics
