"""Evaluation runner: schedules the evaluators of ``config.eval`` on a dataset's splits.

Two entry points share one path:

* ``run_in_training``: the trainer's hook (``train.run_evals``); it passes the vision-tower
  apply function and the current params, already placed on its mesh.
* ``evaluate_checkpoint``: ``--mode eval`` and ``python -m evclip_jax.eval``; it loads a
  training workdir, an evclip checkpoint dir or an HF CLIP dir, and also runs the video
  anomaly evaluation (``evaluate_video_anomaly``).

Each split is embedded once (events, and paired images when retrieval or k-NN translation
needs them); zero-shot, retrieval and the few-shot ridge probe all reuse those embeddings.
Only ``fewshot_finetune`` runs the (fine-tuned) event tower again, once per support set.

``config.eval`` fields read here: ``evals``, ``batch_size``, ``rank_against``,
``heldout_classes``, ``fewshot_shots``, ``fewshot_seeds``, ``knn_k`` and ``checkpoint``
(``every_steps`` and ``at_end`` are the trainer's).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from evclip_jax.evaluate.anomaly import evaluate_anomaly
from evclip_jax.evaluate.common import (
    EmbedFn,
    _pad_batch,
    _to_host_any,
    batch_axes_of,
    collect_labels,
    embed_batches,
    embed_dataset,
)
from evclip_jax.evaluate.fewshot import (
    FinetuneFn,
    evaluate_fewshot,
    fewshot_metrics,
    fewshot_splits,
    sample_support,
)
from evclip_jax.evaluate.knn import knn_translate
from evclip_jax.evaluate.retrieval import recall_curve, retrieval_metrics
from evclip_jax.evaluate.zeroshot import zeroshot_metrics

EVAL_NAMES = ("zeroshot", "retrieval", "fewshot", "fewshot_finetune", "anomaly")
ZEROSHOT_KS = (1, 5)
RETRIEVAL_KS = (1, 5, 10)
RECALL_CURVE_MAX_K = 50
# Steps of the few-shot full fine-tune. No config field holds this yet (see make_finetune_fn).
FINETUNE_STEPS = 50
# Anomaly prompts when none are given: a project default, not taken from the paper.
DEFAULT_NORMAL_PROMPTS = ("a photo of a normal scene",)
DEFAULT_ABNORMAL_PROMPTS = ("a photo of an abnormal event",)
# Size of CLIP's BPE vocabulary: a text tower this large was trained on real tokens, so the
# hash tokenizer of the random demo models would give it meaningless ids.
CLIP_VOCAB_SIZE = 49408

PlotsData = dict[str, dict[str, dict]]


# ----------------------------------------------------------------------------- config parsing


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


def _rank_against(config) -> str:
    value = config.eval.rank_against
    if value not in ("all", "heldout"):
        raise ValueError(f"config.eval.rank_against={value!r}: expected 'all' or 'heldout'")
    return value


def _fewshot_settings(config) -> tuple[tuple[int, ...], tuple[int, ...]]:
    shots = tuple(int(n) for n in config.eval.fewshot_shots)
    if not shots or min(shots) < 1:
        raise ValueError(f"config.eval.fewshot_shots={tuple(config.eval.fewshot_shots)}: "
                         "expected positive shot counts")
    num_seeds = int(config.eval.fewshot_seeds)
    if num_seeds < 1:
        raise ValueError(f"config.eval.fewshot_seeds={num_seeds}: expected at least 1 seed")
    # Seeds 0..n-1, independent of config.seed, so runs share their support sets.
    return shots, tuple(range(num_seeds))


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class _Split:
    """Fresh passes over one split's eval-mode (padded, masked) global batches."""

    data_dir: str
    name: str
    manifest: dict
    batch_size: int
    image_size: int
    seed: int
    mesh: Mesh

    def __call__(self) -> Iterator[dict[str, jax.Array]]:
        from evclip_jax.data import pipeline

        ds = pipeline.make_dataset(self.data_dir, self.name, global_batch_size=self.batch_size,
                                   out_size=self.image_size, train=False, seed=self.seed)
        return pipeline.global_batches(ds, self.mesh, batch_axes=batch_axes_of(self.mesh))


def _open_split(config, data_dir, split: str, mesh: Mesh, class_names: Sequence[str],
                image_size: int | None) -> _Split:
    from evclip_jax.data import tfrecords

    manifest = tfrecords.read_manifest(data_dir, split)  # names a missing dir/manifest/shard
    where = tfrecords.manifest_path(data_dir, split)
    if list(manifest["class_names"]) != list(class_names):
        raise ValueError(
            f"{where}: class_names {manifest['class_names'][:5]}... differ from the "
            f"{len(class_names)} classes of the class text embeddings ({list(class_names)[:5]}"
            "...); label ids would not match the prompts")
    size = int(manifest["image_size"]) if image_size is None else int(image_size)
    if int(manifest["image_size"]) != size:
        raise ValueError(f"{where}: records are {manifest['image_size']} px; the vision tower "
                         f"takes {size} px")
    batch = int(config.eval.batch_size)
    shards = int(np.prod([mesh.shape[a] for a in batch_axes_of(mesh)]))
    if batch < 1 or batch % shards or batch % jax.process_count():
        raise ValueError(f"config.eval.batch_size={batch}: expected a positive multiple of the "
                         f"{shards} batch shards of the mesh and of {jax.process_count()} "
                         "processes")
    return _Split(os.fspath(data_dir), split, manifest, batch, size, int(config.seed), mesh)


# ----------------------------------------------------------------------------- the evaluators


@dataclasses.dataclass
class _Context:
    """What every evaluator of one run shares."""

    config: Any
    evals: tuple[str, ...]
    embed_fn: EmbedFn
    event_params: Any
    image_params: Any
    class_text_emb: np.ndarray
    class_names: list[str]
    mesh: Mesh
    towers: Any = None
    logit_scale: float | None = None
    finetune_steps: int = FINETUNE_STEPS


def _evaluate_splits(ctx: _Context, data_dir, image_size: int | None
                     ) -> tuple[dict[str, float], PlotsData]:
    """Embeds the eval split (and the few-shot support split) once; runs ctx.evals."""
    config = ctx.config
    text = np.asarray(jax.device_get(ctx.class_text_emb), np.float32)
    if text.ndim != 2 or text.shape[0] != len(ctx.class_names):
        raise ValueError(f"class_text_emb has shape {text.shape}; expected one row per class "
                         f"({len(ctx.class_names)} class names)")
    rank_against = _rank_against(config)
    eval_split = _open_split(config, data_dir, config.data.eval_split, ctx.mesh,
                             ctx.class_names, image_size)
    has_images = bool(eval_split.manifest.get("has_images", True))
    knn_k = int(config.eval.knn_k)
    if knn_k > 0 and not has_images:
        raise ValueError(f"config.eval.knn_k={knn_k} needs images, but split "
                         f"{config.data.eval_split!r} has none")
    need_images = has_images and ("retrieval" in ctx.evals or knn_k > 0)

    if set(ctx.evals) & {"zeroshot", "retrieval", "fewshot"}:
        fns = {"events": ctx.embed_fn}
        params = {"events": ctx.event_params}
        if need_images:
            fns["images"] = ctx.embed_fn
            params["images"] = ctx.image_params
        emb, labels = embed_batches(fns, eval_split(), ctx.mesh, params=params)
        event_emb = emb["events"]
    else:  # fewshot_finetune alone runs its own towers; it needs the labels only
        emb, event_emb, labels = {}, None, collect_labels(eval_split())
    heldout = parse_class_ids(config.eval.heldout_classes, len(ctx.class_names))
    eval_classes = np.unique(labels) if heldout is None else heldout
    keep = np.isin(labels, eval_classes)
    if not keep.any():
        raise ValueError(f"config.eval.heldout_classes={config.eval.heldout_classes!r}: split "
                         f"{config.data.eval_split!r} has no samples of these classes")

    query_emb = event_emb
    if knn_k > 0 and event_emb is not None:
        pool = emb["images"]
        if knn_k > pool.shape[0]:
            raise ValueError(f"config.eval.knn_k={knn_k}: larger than the {pool.shape[0]} "
                             f"image embeddings of split {config.data.eval_split!r}")
        query_emb = knn_translate(event_emb, pool, knn_k)

    metrics: dict[str, float] = {}
    plots: PlotsData = {}
    names = np.asarray(ctx.class_names, dtype=object)
    if "zeroshot" in ctx.evals:
        values, details = zeroshot_metrics(query_emb, labels, text, eval_classes, rank_against,
                                           ZEROSHOT_KS, return_details=True)
        metrics.update({f"zeroshot/{k}": float(v) for k, v in values.items()})
        rows = list(names[details["class_ids"]])
        plots.setdefault("per_class_accuracy", {})["zeroshot"] = {
            "class_names": rows, "accuracy": details["per_class_accuracy"]}
        plots.setdefault("confusion_matrix", {})["zeroshot"] = {
            "class_names": rows, "matrix": details["confusion"],
            "column_names": list(names[details["candidate_ids"]])}
    if "retrieval" in ctx.evals:
        values, curves = _retrieval(query_emb[keep], labels[keep],
                                    emb["images"][keep] if need_images else None,
                                    text, eval_classes, rank_against)
        metrics.update({f"retrieval/{k}": v for k, v in values.items()})
        plots.setdefault("recall_at_k", {}).update(curves)

    fewshot_wanted = [e for e in ("fewshot", "fewshot_finetune") if e in ctx.evals]
    if fewshot_wanted:
        shots, seeds = _fewshot_settings(config)
        same = config.data.train_split == config.data.eval_split
        support_split = eval_split if same else _open_split(
            config, data_dir, config.data.train_split, ctx.mesh, ctx.class_names,
            eval_split.image_size)
        if same:
            logging.warning("few-shot: config.data.train_split == eval_split (%r); support "
                            "samples come from it and the rest are the queries",
                            config.data.eval_split)
            support_emb, support_labels = event_emb, labels
        elif "fewshot" in ctx.evals:
            support_emb, support_labels = embed_dataset(ctx.embed_fn, support_split(),
                                                        ctx.mesh, params=ctx.event_params)
        else:
            support_emb, support_labels = None, collect_labels(support_split())
        where = f"config.data.train_split={config.data.train_split!r}"
        if "fewshot" in ctx.evals:
            try:
                splits = fewshot_splits(support_labels, shots, seeds,
                                        None if same else labels, eval_classes)
            except ValueError as e:
                raise ValueError(f"{where}: few-shot support: {e}") from e
            values, details = fewshot_metrics(event_emb, labels, splits, support_emb,
                                              support_labels, return_details=True)
            metrics.update({f"fewshot/{k}": v for k, v in values.items()})
            plots.setdefault("fewshot", {})["ridge probe"] = details
        if "fewshot_finetune" in ctx.evals:
            values, details = _fewshot_finetune(ctx, eval_split, support_split, same,
                                                support_labels, eval_classes, shots, seeds,
                                                text)
            metrics.update({f"fewshot_finetune/{k}": v for k, v in values.items()})
            plots.setdefault("fewshot", {})["full fine-tune (L_pred)"] = details
    return metrics, plots


def _retrieval(event_emb, labels, image_emb, text, eval_classes, rank_against
               ) -> tuple[dict[str, float], dict[str, dict]]:
    """All retrieval directions over the evaluated classes; recall@K curves for the report.

    Text keys for event->text are the class prompts ranked against (all, or the evaluated
    classes, as zero-shot); text queries are the evaluated classes' prompts only, so every
    query has relevant events.
    """
    text_ids = eval_classes if rank_against == "heldout" else np.arange(text.shape[0])
    events = (event_emb, labels)
    directions = []  # (name, (query emb, labels), (key emb, labels))
    if image_emb is not None:
        images = (image_emb, labels)
        directions += [("event_to_image", events, images), ("image_to_event", images, events)]
    directions += [("event_to_text", events, (text[text_ids], text_ids)),
                   ("text_to_event", (text[eval_classes], eval_classes), events)]
    metrics, curves = {}, {}
    for direction, q, k in directions:
        for name, value in retrieval_metrics(*q, *k, RETRIEVAL_KS).items():
            metrics[f"{direction}/{name}"] = float(value)
        ks, recall = recall_curve(*q, *k, max_k=RECALL_CURVE_MAX_K)
        curves[direction.replace("_", " ")] = {"ks": ks, "recall": recall}
    return metrics, curves


# ----------------------------------------------------------------------------- fine-tuning


def _fewshot_finetune(ctx: _Context, eval_split: _Split, support_split: _Split, same: bool,
                      support_labels: np.ndarray, eval_classes: np.ndarray,
                      shots: Sequence[int], seeds: Sequence[int], text: np.ndarray):
    """Few-shot top-1 after fine-tuning a copy of the event tower on each support set."""
    if ctx.towers is None:
        raise ValueError("eval 'fewshot_finetune' needs the towers (run_in_training(..., "
                         "towers=...)) to fine-tune the event tower")
    where = f"config.data.train_split={ctx.config.data.train_split!r}"
    try:
        # The support sets evaluate_fewshot will draw (fewshot_splits samples them this way).
        needed = np.unique(np.concatenate([
            sample_support(support_labels, n, seed, eval_classes)
            for n in shots for seed in seeds]))
    except ValueError as e:
        raise ValueError(f"{where}: few-shot support: {e}") from e
    pool = _gather_rows(support_split(), needed)
    init = {"event_tower": ctx.event_params, "logit_scale": ctx.logit_scale}
    finetune_fn = make_finetune_fn(ctx.config, ctx.towers, init, pool, text,
                                   ctx.finetune_steps, pool_indices=needed, mesh=ctx.mesh)
    support_batches = [{"labels": support_labels, "mask": np.ones(support_labels.shape, bool)}]
    return evaluate_fewshot(None, eval_split, shots, seeds,
                            support_batches=None if same else support_batches,
                            classes=eval_classes, finetune_fn=finetune_fn, mesh=ctx.mesh,
                            return_details=True)


def _gather_rows(batches, indices: np.ndarray, keys: Sequence[str] = ("events", "labels")
                 ) -> dict[str, np.ndarray]:
    """Host copies of the unmasked rows `indices` (in pass order) of a batch iterable."""
    indices = np.asarray(indices, np.int64)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    offset = 0
    for batch in batches:
        mask = _to_host_any(batch["mask"]).astype(bool)
        count = int(mask.sum())
        wanted = indices[(indices >= offset) & (indices < offset + count)] - offset
        if wanted.size:
            rows = np.flatnonzero(mask)[wanted]
            for k in keys:
                parts[k].append(_to_host_any(batch[k])[rows])
        offset += count
    if offset <= indices.max(initial=-1):
        raise ValueError(f"support index {indices.max()} beyond the {offset} samples of the "
                         "support split")
    return {k: np.concatenate(v) for k, v in parts.items()}


def make_finetune_fn(
    config,
    towers,
    init_params: Mapping[str, Any],
    support_batches_arrays: Mapping[str, np.ndarray],
    class_text_emb,
    steps: int,
    *,
    pool_indices: np.ndarray | None = None,
    mesh: Mesh | None = None,
) -> FinetuneFn:
    """A few-shot `finetune_fn(support_indices, *, shots, seed) -> predict_fn` (fewshot.py).

    For each support set, a copy of the event tower (``init_params["event_tower"]``, with
    ``init_params["logit_scale"]``, default ``config.loss.logit_scale_init``) is trained for
    `steps` full-batch updates of ``train.make_train_step`` with L_pred alone (METHOD.md
    "Fine-tuning"; ct = zs = kl = 0, pred = 1, ``config.loss.pred_form``) and AdamW from
    ``train.make_optimizer``: the config's peak learning rate (optim.base_lr x batch_size /
    256) decayed by a cosine over the `steps`, after the schedule's one warm-up step at
    lr 0 (which only primes Adam's moments). ``predict_fn(x)`` returns s * e t^T [B, M] with
    the fine-tuned tower and s.

    `support_batches_arrays`: {"events" [n, S, S, 3] tower input, "labels" [n]}; row r is the
    support pool's sample ``pool_indices[r]`` (default r), the index space of
    ``support_indices``. The trainable copy is placed by ``train.place_params`` on a
    (data, fsdp, tensor) mesh: `mesh` if it has those axes, else one over the devices of
    `mesh` (default: of the init params).
    """
    from evclip_jax import train

    if steps < 0:
        raise ValueError(f"finetune steps: expected >= 0, got {steps}")
    events = np.asarray(support_batches_arrays["events"], np.float32)
    pool_labels = np.asarray(support_batches_arrays["labels"]).astype(np.int32)
    pool_indices = (np.arange(pool_labels.shape[0]) if pool_indices is None
                    else np.asarray(pool_indices, np.int64))
    if not (events.shape[0] == pool_labels.shape[0] == pool_indices.shape[0]):
        raise ValueError(f"support arrays: events {events.shape[0]}, labels "
                         f"{pool_labels.shape[0]} and pool_indices {pool_indices.shape[0]} rows "
                         "differ")
    text = jnp.asarray(jax.device_get(class_text_emb), jnp.float32)
    loss = dict(config.loss.to_dict(), ct_weight=0.0, zs_weight=0.0, kl_weight=0.0,
                pred_weight=1.0)
    step_fn, tx = _finetune_step(towers, _items(loss), _items(config.optim.to_dict()),
                                 int(config.batch_size), steps)
    mesh = _trainer_mesh(mesh, init_params["event_tower"])
    rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.sharding_rules)
    scale_init = init_params.get("logit_scale")
    scale_init = config.loss.logit_scale_init if scale_init is None else scale_init
    vision = towers.vision

    def finetune_fn(support_indices, *, shots: int, seed: int):
        rows = np.searchsorted(pool_indices, support_indices)
        if (np.any(rows >= pool_indices.size)
                or np.any(pool_indices[rows.clip(0, pool_indices.size - 1)] != support_indices)):
            raise ValueError("finetune_fn: support indices outside the gathered support pool")
        batch = {
            "events": events[rows],
            "labels": pool_labels[rows],
            # L_pred never uses the image side; a teacher embedding skips the image tower.
            "teacher_emb": np.zeros((rows.size, text.shape[1]), np.float32),
        }
        trainable = {
            # A copy: the step donates its state, and the caller's params must survive.
            "event_tower": jax.tree.map(lambda x: jnp.array(x, copy=True),
                                        init_params["event_tower"]),
            "log_tau_ct": jnp.asarray(math.log(config.loss.tau_ct_init), jnp.float32),
            "logit_scale": jnp.asarray(scale_init, jnp.float32),
        }
        state = train.init_state(train.place_params(trainable, towers, mesh, rules), tx)
        step_metrics = None
        for _ in range(steps + 1 if steps else 0):
            state, step_metrics = step_fn(state, {}, text, batch)
        if step_metrics is not None:
            logging.info("few-shot fine-tune (%d-shot, seed %d): L_pred %.4f after %d steps",
                         shots, seed, float(step_metrics["loss"]), steps)
        return functools.partial(_predict, vision, state.params, text)

    return finetune_fn


def _items(d: Mapping) -> tuple:
    """A hashable form of a (nested) config dict."""
    return tuple(sorted((k, _items(v) if isinstance(v, Mapping) else
                         tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


@functools.lru_cache(maxsize=8)
def _finetune_step(towers, loss_items: tuple, optim_items: tuple, batch_size: int,
                   steps: int):
    """(jitted L_pred train step, optimizer), cached so that repeated evaluations (every
    eval.every_steps, or several shot counts) reuse the compile."""
    from evclip_jax import train

    cfg = ml_collections.ConfigDict({"optim": dict(optim_items), "batch_size": batch_size})
    tx, schedule = train.make_optimizer(cfg, steps + 1, 1)
    step = train.make_train_step(towers, ml_collections.ConfigDict(dict(loss_items)), tx,
                                 schedule)
    return jax.jit(step, donate_argnums=(0,)), tx


@functools.partial(jax.jit, static_argnums=0)
def _predict(vision, params: dict, text: jax.Array, x: jax.Array) -> jax.Array:
    """s * e t^T: class scores of the (fine-tuned) event tower, s = exp(logit_scale)."""
    e = _vision_embed(vision, params["event_tower"], x)
    e = e / jnp.linalg.norm(e, axis=-1, keepdims=True)
    return jnp.exp(params["logit_scale"]) * e @ text.T


def _trainer_mesh(mesh: Mesh | None, params: Any) -> Mesh:
    """A (data, fsdp, tensor) mesh: `mesh` itself, or one over its (or the params') devices."""
    from evclip_jax import sharding

    if mesh is not None and set(sharding.MESH_AXES) <= set(mesh.axis_names):
        return mesh
    if mesh is not None:
        devices = list(mesh.devices.flat)
    else:
        leaf_sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
        if isinstance(leaf_sharding, NamedSharding):
            devices = list(leaf_sharding.mesh.devices.flat)
        elif leaf_sharding is not None:
            devices = sorted(leaf_sharding.device_set, key=lambda d: d.id)
        else:
            devices = jax.devices()[:1]
    return sharding.make_mesh(devices=devices)


# ----------------------------------------------------------------------------- the hook


def run_in_training(
    config,
    embed_fn: EmbedFn,
    event_params: Any,
    image_params: Any,
    class_text_emb,
    data_dir: str | os.PathLike,
    mesh: Mesh,
    class_names: Sequence[str],
    report_dir: str | os.PathLike | None = None,
    *,
    towers: Any = None,
    logit_scale: float | None = None,
    finetune_steps: int = FINETUNE_STEPS,
) -> dict[str, float]:
    """The evaluators of ``config.eval.evals`` on ``config.data.eval_split``: a flat dict.

    `embed_fn(params, x) -> [B, D]` float32 is the vision tower; `event_params` /
    `image_params` are its event and image weights; `class_text_emb` [M, D] (normalised)
    has one row per class id of the manifest (`class_names`). Batches are sharded over the
    batch axes of `mesh` ("data", "fsdp" of the trainer's mesh, or a 1-D mesh's axis).
    "anomaly" is skipped here (it needs video files: `evaluate_checkpoint`);
    "fewshot_finetune" needs `towers` (and uses `logit_scale`, default the config's init).
    With `report_dir`, metrics.json, report.md and plots are written there (process 0).
    Keys: "zeroshot/top1|top5|num_samples", "retrieval/<query>_to_<key>/R@K|mAP@K|MRR",
    "fewshot/<N>shot/top1[_std]", "fewshot_finetune/<N>shot/top1[_std]".
    """
    evals = parse_evals(config.eval.evals)
    if "anomaly" in evals:
        logging.info("eval 'anomaly' runs in evaluate_checkpoint only (it needs video files)")
        evals = tuple(e for e in evals if e != "anomaly")
    if not evals:
        return {}
    ctx = _Context(config, evals, embed_fn, event_params, image_params, class_text_emb,
                   list(class_names), mesh, towers, logit_scale, finetune_steps)
    image_size = None if towers is None else towers.config.vision.image_size
    metrics, plots = _evaluate_splits(ctx, data_dir, image_size)
    if report_dir is not None and jax.process_index() == 0:
        from evclip_jax.evaluate.report import write_report

        write_report(metrics, report_dir, plots)
    return metrics


# ----------------------------------------------------------------------------- video anomaly


def _vision_embed(vision, params, x):
    return vision.apply({"params": params}, x).astype(jnp.float32)


def prompt_token_ids(model, prompts: Sequence[str]) -> np.ndarray:
    """Token ids of `prompts`: the checkpoint's tokenizer, else ``train.hash_tokenize`` (the
    tokenizer-less random demo models; refused for a CLIP-sized vocabulary)."""
    from evclip_jax import train

    if model.tokenizer is not None:
        return model.tokenize(list(prompts))
    if model.config.text.vocab_size >= CLIP_VOCAB_SIZE:
        raise ValueError(f"{model.tokenizer_dir}: no tokenizer files (vocab.json + merges.txt "
                         "or tokenizer.json) to encode the prompts of this CLIP text tower")
    return train.hash_tokenize(list(prompts), model.config.text)


def _text_embeddings(model, prompts: Sequence[str]) -> np.ndarray:
    ids = prompt_token_ids(model, prompts)
    emb = np.asarray(model.encode_text(ids), np.float64)
    return (emb / np.linalg.norm(emb, axis=-1, keepdims=True)).astype(np.float32)


def group_video_files(paths: Sequence[str] | Mapping[str, Sequence[str]]
                      ) -> dict[str, list[str]]:
    """{dataset: [files]}: a mapping as given; a list of "name=path" or plain paths (plain
    paths form the dataset "videos")."""
    if isinstance(paths, Mapping):
        return {str(k): [os.fspath(p) for p in v] for k, v in paths.items()}
    groups: dict[str, list[str]] = {}
    for entry in paths:
        entry = os.fspath(entry)
        name, sep, path = entry.partition("=")
        if not sep:
            name, path = "videos", entry
        groups.setdefault(name, []).append(path)
    return groups


def load_video_frames(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(Eq. 1 frames float32 [N, H, W] = counts / (max + 1) per frame, labels int64 [N]) of a
    ``<name>_frames.npz`` written by tools/video_to_events.py (with --labels)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: event-frame file not found (expected a <name>_frames.npz of "
                         "tools/video_to_events.py)")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "event_frames" not in data or "instance_labels" not in data:
                raise ValueError(f"{path}: expected keys event_frames and instance_labels "
                                 f"(convert the video with --labels), got {sorted(data)}")
            counts = np.asarray(data["event_frames"], np.float32)
            labels = np.asarray(data["instance_labels"])
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from e
    if counts.ndim != 3 or labels.shape != (counts.shape[0],):
        raise ValueError(f"{path}: event_frames {counts.shape} and instance_labels "
                         f"{labels.shape}; expected [N, H, W] and [N]")
    if not np.all(np.isin(labels, (0, 1))):
        raise ValueError(f"{path}: instance_labels must be 0 (normal) or 1 (anomalous), got "
                         f"{np.unique(labels)[:10]}")
    # Paper Eq. 1 normalisation, per event frame.
    frames = counts / (counts.max(axis=(1, 2), keepdims=True) + 1.0)
    return frames, labels.astype(np.int64)


def _video_batches(paths: Sequence[str], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Full-size (padded, masked) batches of each file's frames; files may differ in size."""
    for path in paths:
        frames, labels = load_video_frames(path)
        for start in range(0, frames.shape[0], batch_size):
            yield _pad_batch({"events": frames[start:start + batch_size],
                              "labels": labels[start:start + batch_size],
                              "mask": np.ones(min(batch_size, frames.shape[0] - start), bool)},
                             batch_size)


def evaluate_video_anomaly(
    model,
    frames_npz_paths: Sequence[str] | Mapping[str, Sequence[str]],
    normal_prompts: Sequence[str] = DEFAULT_NORMAL_PROMPTS,
    abnormal_prompts: Sequence[str] = DEFAULT_ABNORMAL_PROMPTS,
    *,
    batch_size: int = 64,
    mesh: Mesh | None = None,
    event_params: Any = None,
    return_details: bool = False,
) -> dict[str, float] | tuple[dict[str, float], PlotsData]:
    """Video anomaly detection (paper Sec. 4.1): ROC AUC per dataset of event-frame files.

    Each file's event frames (counts of 16 stacked frame differences) are normalised per
    frame by Eq. 1 (counts / (max + 1)), resized to the tower's image size (bilinear,
    antialiased, on device; a non-square video is stretched, not cropped), encoded by the
    event tower and scored by `anomaly.anomaly_scores` (softmax of s * e t^T over the normal
    and abnormal prompts; s = exp(model.logit_scale)). A dataset is a list of files pooled
    into one AUC (`group_video_files`). Keys "anomaly/<dataset>/auc|num_instances|
    num_anomalous"; details: the "roc" plot data.
    """
    groups = group_video_files(frames_npz_paths)
    if not groups or not all(groups.values()):
        raise ValueError("evaluate_video_anomaly: expected at least one event-frame file")
    if not normal_prompts or not abnormal_prompts:
        raise ValueError("evaluate_video_anomaly: need at least one normal and one abnormal "
                         "prompt")
    normal = _text_embeddings(model, normal_prompts)
    abnormal = _text_embeddings(model, abnormal_prompts)
    size = model.config.vision.image_size
    vision = model.towers.vision
    params = model.params["event_tower"] if event_params is None else event_params
    if mesh is not None and event_params is None:
        params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    logit_scale = float(jax.device_get(model.logit_scale))

    def embed(p, frames):
        from evclip_jax.api import events_to_tower_input

        frames = jax.image.resize(frames, (frames.shape[0], size, size), "linear",
                                  antialias=True)
        return _vision_embed(vision, p, events_to_tower_input(frames))

    shards = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in batch_axes_of(mesh)]))
    batch_size = -(-int(batch_size) // shards) * shards
    metrics: dict[str, float] = {}
    roc: dict[str, dict] = {}
    for name, paths in groups.items():
        values, details = evaluate_anomaly(embed, _video_batches(paths, batch_size), normal,
                                           abnormal, logit_scale, mesh, return_details=True,
                                           params=params)
        metrics.update({f"anomaly/{name}/{k}": float(v) for k, v in values.items()})
        roc[f"anomaly {name}"] = details
    return (metrics, {"roc": roc}) if return_details else metrics


# ----------------------------------------------------------------------------- --mode eval


def load_for_eval(path: str | os.PathLike, field: str = "config.eval.checkpoint"):
    """(EventCLIP, step, is_training_workdir) of a training workdir, evclip dir or HF dir."""
    from evclip_jax import convert, train
    from evclip_jax.api import EventCLIP

    path = Path(path)
    if not path.exists():
        raise ValueError(f"{field}: {path} does not exist; expected a training workdir, an "
                         "evclip checkpoint dir or an HF CLIP dir")
    if convert.is_evclip_dir(path / "init"):
        model = train.load_trained(path)
        steps = [int(p.name) for p in (path / "checkpoints").iterdir() if p.name.isdigit()]
        return model, max(steps, default=0), True
    if convert.is_evclip_dir(path) or (path / "config.json").is_file():
        return EventCLIP.from_pretrained(path), 0, False
    raise ValueError(f"{field}: {path} is neither a training workdir (init/ + checkpoints/), "
                     "an evclip checkpoint dir (evclip.json) nor an HF CLIP dir (config.json)")


def _data_dir_for_eval(config, base: Path, image_size: int) -> Path:
    from evclip_jax import train

    if not config.data.dir and config.data.synthetic.enabled:
        return train.prepare_data(config, base, image_size)  # the demo's <workdir>/data
    if not config.data.dir:
        raise ValueError("config.data.dir: empty; expected a dir of TFRecord shards with "
                         f"{config.data.eval_split}.manifest.json")
    data_dir = Path(config.data.dir)
    if not data_dir.is_dir():
        raise ValueError(f"config.data.dir: {data_dir} does not exist (expected "
                         f"{config.data.eval_split}.manifest.json and TFRecord shards)")
    return data_dir


def class_prompts(config, class_names: Sequence[str]) -> list[str]:
    """config.data.prompt filled with each class name, exactly as the trainer does."""
    if "{label}" not in config.data.prompt:
        raise ValueError(f"config.data.prompt={config.data.prompt!r}: expected a '{{label}}' "
                         "placeholder")
    return [config.data.prompt.format(label=name) for name in class_names]


def evaluate_checkpoint(
    config,
    workdir: str | os.PathLike,
    *,
    out_dir: str | os.PathLike | None = None,
    anomaly_videos: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    normal_prompts: Sequence[str] = DEFAULT_NORMAL_PROMPTS,
    abnormal_prompts: Sequence[str] = DEFAULT_ABNORMAL_PROMPTS,
    finetune_steps: int = FINETUNE_STEPS,
) -> dict[str, float]:
    """--mode eval: the evaluators of config.eval on a checkpoint; returns the flat metrics.

    The checkpoint is ``config.eval.checkpoint`` (training workdir -> ``train.load_trained``,
    evclip or HF dir -> ``EventCLIP.from_pretrained``), or `workdir` when that is empty.
    Writes metrics.json, report.md, PNG plots and TensorBoard scalars to `out_dir` (default
    workdir/eval). "anomaly" needs `anomaly_videos` (``<name>_frames.npz`` files; see
    `evaluate_video_anomaly`).
    """
    from evclip_jax import sharding, train

    workdir = Path(workdir)
    field = "config.eval.checkpoint" if config.eval.checkpoint else "--workdir"
    ckpt = Path(config.eval.checkpoint or workdir)
    evals = parse_evals(config.eval.evals)
    if "anomaly" in evals and not anomaly_videos:
        raise ValueError("config.eval.evals includes 'anomaly', which needs event-frame files "
                         "(<name>_frames.npz of tools/video_to_events.py): run python -m "
                         "evclip_jax.eval --videos ...")
    model, step, is_workdir = load_for_eval(ckpt, field)
    out = Path(out_dir) if out_dir is not None else workdir / "eval"
    mesh = sharding.make_mesh(**config.mesh)
    rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.sharding_rules)
    towers = model.towers
    image_size = model.config.vision.image_size

    import flax

    metrics: dict[str, float] = {}
    plots: PlotsData = {}
    split_evals = tuple(e for e in evals if e != "anomaly")
    with jax.set_mesh(mesh), flax.linen.logical_axis_rules(rules):
        placed = train.place_params({k: model.params[k] for k in ("event_tower", "image_tower")},
                                    towers, mesh, rules)
        if split_evals:
            from evclip_jax.data import tfrecords

            data_dir = _data_dir_for_eval(config, ckpt if is_workdir else workdir, image_size)
            try:
                class_names = tfrecords.read_manifest(data_dir,
                                                      config.data.eval_split)["class_names"]
            except ValueError as e:
                raise ValueError(f"config.data.dir / eval_split: {e}") from e
            ids = prompt_token_ids(model, class_prompts(config, class_names))
            text = np.asarray(train.class_text_embeddings(towers, model.params["text_tower"],
                                                          ids))
            vision = towers.vision

            def embed(params, x):
                return _vision_embed(vision, params, x)

            ctx = _Context(config, split_evals, embed, placed["event_tower"],
                           placed["image_tower"], text, list(class_names), mesh, towers,
                           float(jax.device_get(model.logit_scale)), finetune_steps)
            metrics, plots = _evaluate_splits(ctx, data_dir, image_size)
        if "anomaly" in evals:
            values, roc = evaluate_video_anomaly(
                model, anomaly_videos, normal_prompts, abnormal_prompts,
                batch_size=int(config.eval.batch_size), mesh=mesh,
                event_params=placed["event_tower"], return_details=True)
            metrics.update(values)
            plots.update(roc)

    if jax.process_index() == 0:
        from clu import metric_writers

        from evclip_jax.evaluate.report import write_report

        write_report(metrics, out, plots)
        writer = metric_writers.create_default_writer(str(out / "tensorboard"))
        writer.write_scalars(step, metrics)
        writer.flush()
        writer.close()
        logging.info("evaluated %s (step %d): %s", ckpt, step, out / "report.md")
    return metrics


def format_metrics(metrics: Mapping[str, float]) -> str:
    """A plain-text two-column table of flat metrics, sorted by name."""
    if not metrics:
        return "(no metrics)"
    width = max(len(k) for k in metrics)
    line = "-" * (width + 14)
    rows = [f"{k:<{width}}  {v:>10.4f}" for k, v in sorted(metrics.items())]
    return "\n".join([line, *rows, line])
