"""Evaluators (zero-shot, few-shot, retrieval, anomaly detection) and their metrics.

Each evaluator takes a jitted-or-not embed function `embed_fn(x [B, ...]) -> [B, D]` and an
iterable of batch dicts (the pipeline's batch contract, evclip_jax/data/pipeline.py:
"events"/"images", "labels", "mask"); `runner` only schedules them. The report writer lives in
`evclip_jax.evaluate.report` (imports matplotlib), which is not imported here.
"""

from evclip_jax.evaluate.anomaly import anomaly_scores, evaluate_anomaly, roc_auc
from evclip_jax.evaluate.common import (
    batches_from_arrays,
    collect_labels,
    data_mesh,
    embed_batches,
    embed_dataset,
)
from evclip_jax.evaluate.fewshot import (
    FewShotSplit,
    evaluate_fewshot,
    fewshot_metrics,
    fewshot_splits,
    ridge_probe_fit,
    ridge_probe_predict,
    sample_support,
)
from evclip_jax.evaluate.knn import knn_translate
from evclip_jax.evaluate.retrieval import (
    cross_modal_retrieval,
    evaluate_retrieval,
    recall_curve,
    retrieval_metrics,
)
from evclip_jax.evaluate.zeroshot import (
    DATASET_TEMPLATES,
    evaluate_zeroshot,
    top_k_accuracy,
    zeroshot_metrics,
)

__all__ = [
    "DATASET_TEMPLATES",
    "FewShotSplit",
    "anomaly_scores",
    "batches_from_arrays",
    "collect_labels",
    "cross_modal_retrieval",
    "data_mesh",
    "embed_batches",
    "embed_dataset",
    "evaluate_anomaly",
    "evaluate_fewshot",
    "evaluate_retrieval",
    "evaluate_zeroshot",
    "fewshot_metrics",
    "fewshot_splits",
    "knn_translate",
    "recall_curve",
    "retrieval_metrics",
    "ridge_probe_fit",
    "ridge_probe_predict",
    "roc_auc",
    "sample_support",
    "top_k_accuracy",
    "zeroshot_metrics",
]
