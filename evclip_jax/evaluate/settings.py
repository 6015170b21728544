"""The settings of ``config.eval``: evaluator names, class-id lists, few-shot settings, eval
views, and the check of every view's settings that runs before any compute."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from evclip_jax import adapter as adapter_lib
from evclip_jax.evaluate.modality_retrieval import parse_modalities

EVAL_NAMES = ("zeroshot", "retrieval", "fewshot", "fewshot_finetune", "anomaly", "modalities")
ZEROSHOT_KS = (1, 5)
RETRIEVAL_KS = (1, 5, 10)
RECALL_CURVE_MAX_K = 50


def parse_evals(spec: str, field: str = "config.eval.evals") -> tuple[str, ...]:
    """The evaluator names of a comma string ("zeroshot,retrieval"), in order, deduplicated."""
    names = tuple(dict.fromkeys(n.strip() for n in str(spec).split(",") if n.strip()))
    unknown = [n for n in names if n not in EVAL_NAMES]
    if unknown:
        raise ValueError(f"{field}={spec!r}: unknown evaluator(s) {unknown}; expected a comma "
                         f"list of {', '.join(EVAL_NAMES)}")
    return names


def parse_class_ids(spec: str, num_classes: int,
                    field: str = "config.eval.heldout_classes") -> np.ndarray | None:
    """Sorted class ids of "80-99" (inclusive range), "3,5,7" or "0-4,9"; None for ""."""
    spec = str(spec).strip()
    if not spec:
        return None
    ids: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-"))
                if hi < lo:
                    raise ValueError
                ids.extend(range(lo, hi + 1))
            else:
                ids.append(int(part))
        except ValueError:
            raise ValueError(f"{field}={spec!r}: expected class ids like '80-99' or '0-4,9'"
                             ) from None
    out = np.unique(np.asarray(ids, dtype=np.int64))
    if out.min() < 0 or out.max() >= num_classes:
        raise ValueError(f"{field}={spec!r}: class ids must be in [0, {num_classes}) (the "
                         f"manifest has {num_classes} classes)")
    return out


def rank_against_setting(config) -> str:
    value = config.eval.rank_against
    if value not in ("all", "heldout"):
        raise ValueError(f"config.eval.rank_against={value!r}: expected 'all' or 'heldout'")
    return value


def fewshot_settings(config) -> tuple[tuple[int, ...], tuple[int, ...]]:
    shots = tuple(int(n) for n in config.eval.fewshot_shots)
    if not shots or min(shots) < 1:
        raise ValueError(f"config.eval.fewshot_shots={tuple(config.eval.fewshot_shots)}: "
                         "expected positive shot counts")
    num_seeds = int(config.eval.fewshot_seeds)
    if num_seeds < 1:
        raise ValueError(f"config.eval.fewshot_seeds={num_seeds}: expected at least 1 seed")
    # Seeds 0..n-1, independent of config.seed, so runs share their support sets.
    return shots, tuple(range(num_seeds))


# A view's keys and the config fields they replace for that view.
VIEW_FIELDS = {"split": ("data", "eval_split"), "classes": ("eval", "heldout_classes"),
               "rank_against": ("eval", "rank_against"), "evals": ("eval", "evals"),
               "support_split": ("data", "train_split"), "query": ("eval", "query")}


def eval_views(config) -> list[tuple[str, Any]]:
    """[(name, config)] of ``config.eval.views`` (name -> {split, classes, rank_against, evals,
    support_split, query}, each defaulting to the main fields); one unnamed view without."""
    if not config.eval.views:
        return [("", config)]
    out = []
    for name, view in config.eval.views.items():
        unknown = sorted(set(view) - set(VIEW_FIELDS))
        if unknown:
            raise ValueError(f"config.eval.views.{name}: unknown key(s) {unknown}; expected "
                             f"some of {sorted(VIEW_FIELDS)}")
        view_config = copy.deepcopy(config)
        for key, value in view.items():
            section, field = VIEW_FIELDS[key]
            view_config[section][field] = value
        out.append((name, view_config))
    return out


def check_eval_config(config) -> tuple[str, ...]:
    """The evaluators of every view of config.eval, each setting checked before any compute."""
    evals = ()
    for _, view_config in eval_views(config):
        evals += tuple(e for e in _check_view(view_config) if e not in evals)
    return evals


def _check_view(config) -> tuple[str, ...]:
    evals = parse_evals(config.eval.evals)
    if config.eval.query not in ("events", "images"):
        raise ValueError(f"config.eval.query={config.eval.query!r}: expected 'events' (the "
                         "event tower on the events) or 'images' (the image tower on the images)")
    if config.eval.query == "images" and {"retrieval", "fewshot_finetune", "modalities"
                                          } & set(evals):
        raise ValueError("config.eval.query='images': retrieval, fewshot_finetune and "
                         "modalities need the event tower (query 'events')")
    rank_against_setting(config)
    if {"fewshot", "fewshot_finetune"} & set(evals):
        fewshot_settings(config)
    if "anomaly" in evals:
        if not list(config.eval.anomaly_videos) and not list(config.eval.anomaly_splits):
            raise ValueError("config.eval.evals includes 'anomaly', which needs "
                             "config.eval.anomaly_videos (<name>_frames.npz files of "
                             "tools/video_to_events.py, optionally as dataset=path) or "
                             "config.eval.anomaly_splits (record splits of config.data.dir)")
        if not list(config.eval.normal_prompts) or not list(config.eval.abnormal_prompts):
            raise ValueError("config.eval.normal_prompts / abnormal_prompts: need at least one "
                             "prompt each for 'anomaly'")
    if "modalities" in evals:
        parse_modalities(config.eval.modalities)
        adapter_lib.check_adapter_config(config.adapter)
    if int(config.eval.finetune_steps) < 0:
        raise ValueError(f"config.eval.finetune_steps={config.eval.finetune_steps}: expected "
                         ">= 0")
    return evals
