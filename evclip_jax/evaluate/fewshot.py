"""Few-shot evaluation (METHOD.md "Fine-tuning"): N labelled samples per class, several seeds.

Support samples come from a train split (`support_batches`), or, when only one split is
given, from that split, with evaluation on the rest (support and query are disjoint by
construction and asserted). Default classifier: a closed-form ridge-regression linear probe
on frozen embeddings. Full fine-tuning with L_pred is the trainer's: pass it as `finetune_fn`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from evclip_jax.embed import l2_normalize_f64 as l2_normalize
from evclip_jax.evaluate.common import (
    EmbedFn,
    check_embeddings,
    check_labels,
    collect_labels,
    embed_dataset,
)

Batches = Iterable[Mapping[str, object]]
# finetune_fn(support_indices, *, shots, seed) -> predict_fn; see evaluate_fewshot.
FinetuneFn = Callable[..., Callable[[jax.Array], jax.Array]]


@dataclasses.dataclass(frozen=True)
class FewShotSplit:
    """One seeded N-shot split: `support` indexes the support pool, `query` the eval set."""

    shots: int
    seed: int
    support: np.ndarray
    query: np.ndarray


def sample_support(
    labels: np.ndarray,
    shots: int,
    seed: int,
    classes: Iterable[int] | None = None,
) -> np.ndarray:
    """Sorted indices of exactly `shots` samples of each class (default: every class present).

    Deterministic per seed (np.random.default_rng(seed) draws one permutation; each class
    takes its first `shots` members in that order), so for one seed the 1-shot support is a
    subset of the 2-shot support, and so on. ValueError if a class has fewer samples.
    """
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if shots < 1:
        raise ValueError(f"shots: expected a positive integer, got {shots}")
    class_ids = np.unique(labels) if classes is None else np.unique(np.asarray(list(classes)))
    if class_ids.size == 0:
        raise ValueError("sample_support: no classes to sample from")
    counts = np.array([np.sum(labels == c) for c in class_ids])
    short = class_ids[counts < shots]
    if short.size:
        raise ValueError(
            f"sample_support: classes {short[:10].tolist()} have fewer than {shots} samples "
            f"(counts {counts[counts < shots][:10].tolist()})")
    perm = np.random.default_rng(seed).permutation(labels.size)
    perm = perm[np.isin(labels[perm], class_ids)]
    # Group by class, keeping the random order inside each class.
    grouped = perm[np.argsort(labels[perm], kind="stable")]
    grouped_labels = labels[grouped]
    first = np.searchsorted(grouped_labels, grouped_labels)  # start of each row's class run
    position = np.arange(grouped.size) - first
    return np.sort(grouped[position < shots])


def fewshot_splits(
    support_labels: np.ndarray,
    shots: Sequence[int] = (1, 2, 5),
    seeds: Sequence[int] = (0, 1, 2),
    eval_labels: np.ndarray | None = None,
    classes: Iterable[int] | None = None,
) -> list[FewShotSplit]:
    """Seeded support/query splits for every (shots, seed).

    With `eval_labels` (a separate eval split) the query set is every eval sample of the
    evaluated classes; without it, support and query share `support_labels` and the query
    set is the rest (disjointness asserted). `classes` defaults to the classes present in
    the support pool.
    """
    support_labels = np.asarray(support_labels).astype(np.int64).reshape(-1)
    class_ids = (np.unique(support_labels) if classes is None
                 else np.unique(np.asarray(list(classes), dtype=np.int64)))
    if not seeds:
        raise ValueError("fewshot_splits: expected at least one seed")
    query_labels = support_labels if eval_labels is None else np.asarray(eval_labels)
    in_classes = np.flatnonzero(np.isin(query_labels, class_ids))
    splits = []
    for n in shots:
        for seed in seeds:
            support = sample_support(support_labels, int(n), int(seed), class_ids)
            if eval_labels is None:
                query = np.setdiff1d(in_classes, support)
                assert np.intersect1d(query, support).size == 0
            else:
                query = in_classes
            if query.size == 0:
                raise ValueError(f"fewshot_splits: no query samples left for {n}-shot, "
                                 f"seed {seed}")
            splits.append(FewShotSplit(int(n), int(seed), support, query))
    return splits


def ridge_probe_fit(
    features: np.ndarray,
    labels: np.ndarray,
    classes: np.ndarray,
    l2_reg: float = 1e-2,
) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form ridge regression onto one-hot targets: (W [D, C], b [C]), float64.

    Features are L2-normalised; the bias is unregularised (fit on centred X and Y):
    W = (Xc^T Xc + l2_reg I)^-1 Xc^T Yc, b = mean(Y) - mean(X) W. Column j is class
    classes[j]. Solved in the dual form Xc^T (Xc Xc^T + l2_reg I)^-1 Yc when n < D (same W).
    """
    x = l2_normalize(check_embeddings("features", features))
    labels = check_labels("labels", labels, x.shape[0])
    classes = np.asarray(classes, dtype=np.int64)
    if not l2_reg > 0:
        raise ValueError(f"l2_reg: expected > 0, got {l2_reg}")
    y = (labels[:, None] == classes[None, :]).astype(np.float64)
    if not np.all(y.sum(axis=1) == 1):
        raise ValueError("ridge_probe_fit: every label must be one of `classes`")
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - x_mean, y - y_mean
    n, d = xc.shape
    if n < d:
        weights = xc.T @ np.linalg.solve(xc @ xc.T + l2_reg * np.eye(n), yc)
    else:
        weights = np.linalg.solve(xc.T @ xc + l2_reg * np.eye(d), xc.T @ yc)
    return weights, y_mean - x_mean @ weights


def ridge_probe_predict(
    features: np.ndarray, weights: np.ndarray, bias: np.ndarray, classes: np.ndarray
) -> np.ndarray:
    """Predicted class ids (argmax of X W + b; ties: the lower column)."""
    x = l2_normalize(check_embeddings("features", features, weights.shape[0]))
    return np.asarray(classes)[np.argmax(x @ weights + bias, axis=1)]


def _summarise(accuracies: dict[int, list[float]]) -> tuple[dict[str, float], dict]:
    """Mean and population std (ddof=0) over seeds per shot count."""
    metrics, shots = {}, sorted(accuracies)
    for n in shots:
        metrics[f"{n}shot/top1"] = float(np.mean(accuracies[n]))
        metrics[f"{n}shot/top1_std"] = float(np.std(accuracies[n]))
    details = {
        "shots": np.asarray(shots),
        "mean": np.asarray([metrics[f"{n}shot/top1"] for n in shots]),
        "std": np.asarray([metrics[f"{n}shot/top1_std"] for n in shots]),
        "per_seed": {n: np.asarray(accuracies[n]) for n in shots},
    }
    return metrics, details


def fewshot_metrics(
    eval_features: np.ndarray,
    eval_labels: np.ndarray,
    splits: Sequence[FewShotSplit],
    support_features: np.ndarray | None = None,
    support_labels: np.ndarray | None = None,
    l2_reg: float = 1e-2,
    return_details: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict]:
    """Ridge-probe top-1 per split, as {"{N}shot/top1": mean, "{N}shot/top1_std": std}.

    `support_features/labels` default to the eval arrays (single-split mode). The probe's
    classes are the support classes, so predictions range over exactly the evaluated classes.
    """
    eval_features = check_embeddings("eval_features", eval_features)
    eval_labels = check_labels("eval_labels", eval_labels, eval_features.shape[0])
    if support_features is None:
        support_features, support_labels = eval_features, eval_labels
    support_features = check_embeddings("support_features", support_features,
                                        eval_features.shape[1])
    support_labels = check_labels("support_labels", support_labels, support_features.shape[0])
    accuracies: dict[int, list[float]] = {}
    for split in splits:
        classes = np.unique(support_labels[split.support])
        weights, bias = ridge_probe_fit(support_features[split.support],
                                        support_labels[split.support], classes, l2_reg)
        predicted = ridge_probe_predict(eval_features[split.query], weights, bias, classes)
        accuracies.setdefault(split.shots, []).append(
            float(np.mean(predicted == eval_labels[split.query])))
    metrics, details = _summarise(accuracies)
    return (metrics, details) if return_details else metrics


def _reiterable(batches, name: str) -> Callable[[], Batches]:
    """A factory of fresh passes over `batches` (a re-iterable or a zero-arg callable)."""
    if callable(batches):
        return batches
    if iter(batches) is batches:
        raise ValueError(
            f"{name}: a one-shot iterator cannot be read more than once; pass a list, a "
            "re-iterable dataset, or a zero-argument callable returning fresh batches")
    return lambda: batches


def evaluate_fewshot(
    embed_fn: EmbedFn,
    batches: Batches | Callable[[], Batches],
    shots: Sequence[int] = (1, 2, 5),
    seeds: Sequence[int] = (0, 1, 2),
    support_batches: Batches | Callable[[], Batches] | None = None,
    classes: Iterable[int] | None = None,
    l2_reg: float = 1e-2,
    finetune_fn: FinetuneFn | None = None,
    mesh: Mesh | None = None,
    input_key: str = "events",
    return_details: bool = False,
    params: Any = None,
) -> dict[str, float] | tuple[dict[str, float], dict]:
    """Few-shot top-1 (mean and std over `seeds`) for each N in `shots`.

    Support samples are drawn per (N, seed) with `fewshot_splits` from `support_batches`
    (a train split) or, if None, from `batches` with evaluation on the remaining samples.
    `classes` restricts the evaluated classes (e.g. N-ImageNet held-out 80-99).

    Default: ridge probe on frozen embeddings from `embed_fn(x)` (or `embed_fn(params, x)`),
    one embedding pass over each split.
    With `finetune_fn`, each split instead calls

        predict_fn = finetune_fn(support_indices, shots=N, seed=seed)

    where `support_indices` (int64, sorted) index the unmasked samples of the support pool in
    iteration order, and `predict_fn(inputs [B, ...]) -> class scores [B, C]` (column j =
    class id j, e.g. s * e t^T after fine-tuning with L_pred) is run over the eval batches;
    the prediction is the argmax over the evaluated classes. `embed_fn` and `params` are
    unused then, and `batches` must be re-iterable (a list, a dataset object, or a zero-arg
    callable).
    """
    if finetune_fn is None:
        eval_batches = batches() if callable(batches) else batches
        eval_emb, eval_labels = embed_dataset(embed_fn, eval_batches, mesh, input_key,
                                              params=params)
        if support_batches is None:
            support_emb, support_labels = eval_emb, eval_labels
            splits = fewshot_splits(eval_labels, shots, seeds, None, classes)
        else:
            pool = support_batches() if callable(support_batches) else support_batches
            support_emb, support_labels = embed_dataset(embed_fn, pool, mesh, input_key,
                                                        params=params)
            splits = fewshot_splits(support_labels, shots, seeds, eval_labels, classes)
        return fewshot_metrics(eval_emb, eval_labels, splits, support_emb, support_labels,
                               l2_reg, return_details)

    eval_passes = _reiterable(batches, "batches")
    if support_batches is None:
        support_labels = collect_labels(eval_passes())
        splits = fewshot_splits(support_labels, shots, seeds, None, classes)
    else:
        pool = support_batches() if callable(support_batches) else support_batches
        support_labels = collect_labels(pool)
        splits = fewshot_splits(support_labels, shots, seeds,
                                collect_labels(eval_passes()), classes)
    accuracies: dict[int, list[float]] = {}
    for split in splits:
        predict_fn = finetune_fn(split.support, shots=split.shots, seed=split.seed)
        scores, labels = embed_dataset(predict_fn, eval_passes(), mesh, input_key)
        eval_classes = np.unique(support_labels[split.support])
        if scores.ndim != 2 or scores.shape[1] <= eval_classes.max():
            raise ValueError(
                f"finetune_fn's predict_fn returned shape {scores.shape}; expected class "
                f"scores [B, C] with C > {eval_classes.max()}")
        predicted = eval_classes[np.argmax(scores[split.query][:, eval_classes], axis=1)]
        accuracies.setdefault(split.shots, []).append(
            float(np.mean(predicted == labels[split.query])))
    metrics, details = _summarise(accuracies)
    return (metrics, details) if return_details else metrics
