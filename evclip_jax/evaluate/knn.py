"""EZSR k-NN translation: move event embeddings into the image-embedding distribution.

Each event embedding is replaced by the similarity-weighted mean of its k nearest
neighbours (by cosine similarity) in a pool of image embeddings, before matching text.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from evclip_jax.embed import l2_normalize_f64 as l2_normalize
from evclip_jax.evaluate.common import check_embeddings

_CHUNK_ELEMENTS = 1 << 24


def knn_translate(
    event_emb: np.ndarray,
    image_pool: np.ndarray,
    k: int = 10,
    weighting: Literal["softmax", "cosine"] = "softmax",
    temperature: float = 0.01,
) -> np.ndarray:
    """float32 [n, D]: similarity-weighted mean of each event's k nearest pool images.

    Neighbours: the k largest cosine similarities s_1..s_k (ties: lower pool index first,
    as in retrieval). Weights: "softmax" = softmax(s / temperature) over the k neighbours;
    "cosine" = max(s, 0) / sum(max(s, 0)) (raw cosine weights; uniform if all are <= 0).
    The mean is taken over the L2-normalised pool vectors and is not renormalised
    (cosine matching downstream normalises). k, weighting and temperature are settings of
    this project, not values fixed by the EZSR paper.
    """
    event_emb = check_embeddings("event_emb", event_emb)
    image_pool = check_embeddings("image_pool", image_pool, dim=event_emb.shape[1])
    if not 1 <= k <= image_pool.shape[0]:
        raise ValueError(
            f"knn_translate: k must be in [1, pool size {image_pool.shape[0]}], got {k}")
    if weighting not in ("softmax", "cosine"):
        raise ValueError(f"knn_translate: weighting must be 'softmax' or 'cosine', "
                         f"got {weighting!r}")
    if weighting == "softmax" and not temperature > 0:
        raise ValueError(f"knn_translate: temperature must be > 0, got {temperature}")
    queries = l2_normalize(event_emb)
    pool = l2_normalize(image_pool)
    chunk = max(1, _CHUNK_ELEMENTS // pool.shape[0])
    out = np.empty(event_emb.shape, dtype=np.float64)
    for start in range(0, queries.shape[0], chunk):
        sims = queries[start:start + chunk] @ pool.T
        nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(sims, nearest, axis=1)
        if weighting == "softmax":
            logits = top / temperature
            weights = np.exp(logits - logits.max(axis=1, keepdims=True))
        else:
            weights = np.maximum(top, 0.0)
            weights[weights.sum(axis=1) == 0] = 1.0
        weights /= weights.sum(axis=1, keepdims=True)
        out[start:start + chunk] = np.einsum("nk,nkd->nd", weights, pool[nearest])
    return out.astype(np.float32)
