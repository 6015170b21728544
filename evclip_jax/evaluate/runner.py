"""Evaluation runner: schedules the evaluators of ``config.eval`` and writes their report.

Two entry points share one path, ``run_evaluators``:

* the trainer calls it every ``eval.every_steps`` and at the end, with its current params;
* ``--mode eval`` (``evaluate_checkpoint``) loads any model path (checkpoints.load_model).

Each split is embedded once (events, and paired images when retrieval or k-NN translation
needs them); zero-shot, retrieval and the few-shot ridge probe reuse those embeddings. The
evaluators themselves live in their own modules: zeroshot, retrieval, fewshot, finetune
(few-shot full fine-tuning), knn, video_anomaly (also on record splits) and
modality_retrieval (five-modality retrieval through the adapter).

``config.eval`` fields: ``evals``, ``batch_size``, ``rank_against``, ``heldout_classes``,
``fewshot_shots``, ``fewshot_seeds``, ``finetune_steps``, ``knn_k``, ``anomaly_videos``,
``anomaly_splits``, ``normal_prompts``, ``abnormal_prompts``, ``modalities``, ``query``,
``views`` and ``checkpoint`` (and ``config.adapter``)
(``every_steps`` and ``at_end`` are the trainer's). Each of ``eval.views`` (name -> a few of
those fields) is evaluated in turn, its metrics prefixed by its name.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from evclip_jax import adapter as adapter_lib
from evclip_jax import checkpoints, embed, prompts, sharding, step, text
from evclip_jax.checkpoint_files import options_from_config
from evclip_jax.data import records
from evclip_jax.evaluate.anomaly import evaluate_anomaly
from evclip_jax.evaluate.common import batch_axes_of, collect_labels, embed_batches, embed_dataset
from evclip_jax.evaluate.fewshot import fewshot_metrics, fewshot_splits
from evclip_jax.evaluate.finetune import fewshot_finetune
from evclip_jax.evaluate.knn import knn_translate
from evclip_jax.evaluate.modality_retrieval import evaluate_modalities, parse_modalities
from evclip_jax.evaluate.retrieval import cross_modal_retrieval
from evclip_jax.evaluate.settings import (
    RECALL_CURVE_MAX_K,
    RETRIEVAL_KS,
    ZEROSHOT_KS,
    check_eval_config,
    eval_views,
    fewshot_settings,
    parse_class_ids,
    parse_evals,
    rank_against_setting,
)
from evclip_jax.evaluate.video_anomaly import evaluate_video_anomaly
from evclip_jax.evaluate.zeroshot import zeroshot_metrics

PlotsData = dict[str, dict[str, dict]]


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
    representation: str
    mesh: Mesh

    def __call__(self) -> Iterator[dict[str, jax.Array]]:
        """One pass; process 0 shows a progress bar with an ETA (the pass's padded batch count
        is the dataset's cardinality)."""
        from evclip_jax.data import pipeline

        ds = pipeline.make_dataset(self.data_dir, self.name, global_batch_size=self.batch_size,
                                   out_size=self.image_size, train=False, seed=self.seed,
                                   representation=self.representation)
        batches = pipeline.global_batches(ds, self.mesh, batch_axes=batch_axes_of(self.mesh))
        total = int(ds.cardinality())
        return iter(tqdm(batches, total=total if total >= 0 else None, unit="batch",
                         desc=f"eval {self.name}", disable=jax.process_index() != 0))


def _open_split(config, data_dir, split: str, mesh: Mesh, class_names: Sequence[str],
                image_size: int) -> _Split:
    manifest = records.read_manifest(data_dir, split)  # names a missing dir/manifest/shard
    where = records.manifest_path(data_dir, split)
    if list(manifest["class_names"]) != list(class_names):
        raise ValueError(
            f"{where}: class_names {manifest['class_names'][:5]}... differ from the "
            f"{len(class_names)} classes of the class text embeddings ({list(class_names)[:5]}"
            "...); label ids would not match the prompts")
    if int(manifest["image_size"]) != image_size:
        raise ValueError(f"{where}: records are {manifest['image_size']} px; the vision tower "
                         f"takes {image_size} px")
    batch = int(config.eval.batch_size)
    shards = int(np.prod([mesh.shape[a] for a in batch_axes_of(mesh)]))
    if batch < 1 or batch % shards or batch % jax.process_count():
        raise ValueError(f"config.eval.batch_size={batch}: expected a positive multiple of the "
                         f"{shards} batch shards of the mesh and of {jax.process_count()} "
                         "processes")
    return _Split(os.fspath(data_dir), split, manifest, batch, image_size, int(config.seed),
                  config.data.representation, mesh)


# ----------------------------------------------------------------------------- the evaluators


@dataclasses.dataclass
class _Context:
    """What every evaluator of one run shares."""

    config: Any
    evals: tuple[str, ...]
    towers: Any
    params: dict  # placed: event_tower, image_tower (and text_tower)
    logit_scale: float
    class_text_emb: np.ndarray
    class_names: list[str]
    mesh: Mesh
    adapter: adapter_lib.Adapter | None = None  # into the space of config.eval.modalities
    # Hybrid prompts: unit query embeddings [Q, D] -> their class texts [Q, M, D] (each with
    # its content prompts), which zero-shot ranks against; class_text_emb is then the
    # learned context alone (retrieval, fine-tuning, modalities).
    query_text: Any = None


@functools.cache
def _embed_fn(vision):
    """One embed function per tower module, so repeated evaluations reuse its compile."""
    return functools.partial(embed.embed_vision, vision)


def _evaluate_splits(ctx: _Context, data_dir, image_size: int
                     ) -> tuple[dict[str, float], PlotsData]:
    """Embeds the eval split (and the few-shot support split) once; runs ctx.evals."""
    config = ctx.config
    text_emb = ctx.class_text_emb
    rank_against = rank_against_setting(config)
    eval_split = _open_split(config, data_dir, config.data.eval_split, ctx.mesh,
                             ctx.class_names, image_size)
    has_images = bool(eval_split.manifest.get("has_images", True))
    knn_k = int(config.eval.knn_k)
    if knn_k > 0 and not has_images:
        raise ValueError(f"config.eval.knn_k={knn_k} needs images, but split "
                         f"{config.data.eval_split!r} has none")
    need_images = has_images and (bool({"retrieval", "modalities"} & set(ctx.evals))
                                  or knn_k > 0)

    query = config.eval.query  # "events": the event tower; "images": the image tower
    tower_of = {"events": ctx.towers.event, "images": ctx.towers.vision}
    if set(ctx.evals) & {"zeroshot", "retrieval", "fewshot", "modalities"}:
        fns, params = {}, {}
        if query == "events":
            fns["events"], params["events"] = (_embed_fn(tower_of["events"]),
                                               ctx.params["event_tower"])
        if need_images or query == "images":
            fns["images"], params["images"] = (_embed_fn(tower_of["images"]),
                                               ctx.params["image_tower"])
        emb, labels = embed_batches(fns, eval_split(), ctx.mesh, params=params)
        event_emb = emb[query]
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
        query_text = text_emb if ctx.query_text is None else ctx.query_text(query_emb)
        values, details = zeroshot_metrics(query_emb, labels, query_text, eval_classes,
                                           rank_against, ZEROSHOT_KS, return_details=True)
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
                                    text_emb, eval_classes, rank_against)
        metrics.update({f"retrieval/{k}": v for k, v in values.items()})
        plots.setdefault("recall_at_k", {}).update(curves)
    if "modalities" in ctx.evals:
        text_ids = eval_classes if rank_against == "heldout" else np.arange(text_emb.shape[0])
        values, details = evaluate_modalities(
            query_emb[keep], labels[keep], emb["images"][keep] if need_images else None,
            text_emb[text_ids], text_ids, ctx.class_names,
            parse_modalities(config.eval.modalities), ctx.adapter, RETRIEVAL_KS,
            RECALL_CURVE_MAX_K)
        metrics.update({f"modalities/{k}": v for k, v in values.items()})
        plots.setdefault("recall_at_k", {}).update(
            {f"modalities {label}": c for label, c in details["recall_at_k"].items()})

    fewshot_wanted = [e for e in ("fewshot", "fewshot_finetune") if e in ctx.evals]
    if fewshot_wanted:
        shots, seeds = fewshot_settings(config)
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
            support_emb, support_labels = embed_dataset(
                _embed_fn(tower_of[query]), support_split(), ctx.mesh, input_key=query,
                params=ctx.params[f"{query[:-1]}_tower"])
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
            values, details = fewshot_finetune(
                config, ctx.towers, ctx.params["event_tower"], ctx.logit_scale, eval_split,
                support_split, same, support_labels, eval_classes, shots, seeds, text_emb,
                ctx.mesh)
            metrics.update({f"fewshot_finetune/{k}": v for k, v in values.items()})
            plots.setdefault("fewshot", {})["full fine-tune (L_pred)"] = details
    return metrics, plots


def _retrieval(event_emb, labels, image_emb, text_emb, eval_classes, rank_against
               ) -> tuple[dict[str, float], dict[str, dict]]:
    """All retrieval directions over the evaluated classes; recall@K curves for the report.

    Text keys for event->text are the class prompts ranked against (all, or the evaluated
    classes, as zero-shot); text queries are the evaluated classes' prompts only, so every
    query has relevant events.
    """
    text_ids = eval_classes if rank_against == "heldout" else np.arange(text_emb.shape[0])
    per_direction, curves = cross_modal_retrieval(
        event_emb, labels, image_emb, None, text_emb[text_ids], text_ids, RETRIEVAL_KS,
        text_query_classes=eval_classes, curve_max_k=RECALL_CURVE_MAX_K)
    metrics = {f"{d}/{k}": float(v) for d, values in per_direction.items()
               for k, v in values.items()}
    return metrics, {d.replace("_", " "): c for d, c in curves.items()}


def _prompt_embeddings(towers, text_params, tokenizer, prompts: Sequence[str], where: str
                       ) -> np.ndarray:
    ids = text.token_ids(prompts, towers.config.text, tokenizer, where)
    return np.asarray(embed.class_text_embeddings(towers.text, text_params, ids))


def _learned_prompts(config, towers, prompt_params, text_params, tokenizer,
                     class_names: Sequence[str], where: str):
    """Hybrid prompts: the class texts [M, D] of the learned context alone, and the function
    of unit query embeddings [Q, D] that gives each its class texts [Q, M, D]."""
    ids, context = prompts.prompt_inputs(config.data.prompt, class_names, towers.config.text,
                                         tokenizer, where)
    context_only = np.asarray(jax.device_get(jax.jit(
        lambda p, t: prompts.class_text(towers, p, t, ids, context))(prompt_params,
                                                                     text_params)))

    def query_text(queries: np.ndarray) -> np.ndarray:
        return prompts.per_query_class_text(
            towers, prompt_params, text_params, ids, context,
            embed.l2_normalize_f64(queries).astype(np.float32), int(config.eval.batch_size))

    return context_only, query_text


def _anomaly_on_splits(config, towers, event_params, normal: np.ndarray, abnormal: np.ndarray,
                       logit_scale: float, data_dir, mesh: Mesh
                       ) -> tuple[dict[str, float], dict[str, dict]]:
    """Anomaly AUC of each record split of ``config.eval.anomaly_splits`` (labels 0 normal, 1
    anomalous), read and embedded through the eval pipeline like any other split."""
    metrics: dict[str, float] = {}
    roc: dict[str, dict] = {}
    for name in config.eval.anomaly_splits:
        manifest = records.read_manifest(data_dir, name)
        if len(manifest["class_names"]) != 2:
            raise ValueError(
                f"{records.manifest_path(data_dir, name)}: classes {manifest['class_names']}; "
                "config.eval.anomaly_splits expects two (0 normal, 1 anomalous), as "
                "tools/video_to_events.py --format tfrecords writes")
        split = _open_split(config, data_dir, name, mesh, manifest["class_names"],
                            towers.config.vision.image_size)
        values, details = evaluate_anomaly(_embed_fn(towers.event), split(), normal, abnormal,
                                           logit_scale, mesh, return_details=True,
                                           params=event_params)
        metrics.update({f"anomaly/{name}/{k}": float(v) for k, v in values.items()})
        roc[f"anomaly {name}"] = details
    return metrics, roc


def run_evaluators(config, towers, params: Mapping[str, Any], tokenizer, data_dir, mesh: Mesh,
                   *, where: str, report_dir: str | os.PathLike | None = None,
                   adapter: adapter_lib.Adapter | None = None) -> dict[str, float]:
    """The evaluators of ``config.eval.evals``: a flat metrics dict.

    ``params``: {event_tower, image_tower, text_tower, logit_scale} (host or placed arrays);
    ``tokenizer`` encodes the prompts (None: the hash tokenizer of random models; ``where``
    names the model in that error). With ``report_dir``, metrics.json, report.md and plots
    are written there (process 0); ``adapter`` maps events into the space of the
    ``modalities`` files. Keys: "zeroshot/top1|top5|num_samples",
    "retrieval/<query>_to_<key>/R@K|mAP@K|MRR", "fewshot/<N>shot/top1[_std]",
    "fewshot_finetune/<N>shot/top1[_std]", "anomaly/<dataset or split>/auc",
    "modalities/event_to_<modality>/R@K|mAP@K|MRR", "modalities/cross/top1|share/<modality>".
    """
    evals = check_eval_config(config)
    if not evals:
        return {}
    rules = step.sharding_rules(config)
    towers_only = {k: params[k] for k in ("event_tower", "image_tower", "text_tower")}
    with jax.set_mesh(mesh), flax.linen.logical_axis_rules(rules):
        placed = step.place_params(towers_only, towers, mesh, rules)
    logit_scale = float(jax.device_get(params["logit_scale"]))
    metrics: dict[str, float] = {}
    plots: PlotsData = {}
    with jax.set_mesh(mesh):
        for name, view_config in eval_views(config):
            view_evals = tuple(e for e in parse_evals(view_config.eval.evals) if e != "anomaly")
            if not view_evals:
                continue
            split = view_config.data.eval_split
            class_names = records.read_manifest(data_dir, split)["class_names"]
            if "text_prompts" in params:  # hybrid prompts, as trained
                text_emb, query_text = _learned_prompts(
                    config, towers, params["text_prompts"], placed["text_tower"], tokenizer,
                    class_names, where)
            else:
                text_emb, query_text = _prompt_embeddings(
                    towers, placed["text_tower"], tokenizer,
                    text.class_prompts(config.data.prompt, class_names), where), None
            ctx = _Context(view_config, view_evals, towers, placed, logit_scale, text_emb,
                           list(class_names), mesh, adapter, query_text)
            values, view_plots = _evaluate_splits(ctx, data_dir,
                                                  towers.config.vision.image_size)
            prefix = f"{name}/" if name else ""
            metrics.update({prefix + k: v for k, v in values.items()})
            for kind, entries in view_plots.items():
                plots.setdefault(kind, {}).update(
                    {f"{name} {label}" if name else label: d for label, d in entries.items()})
        if "anomaly" in evals:
            normal, abnormal = (
                _prompt_embeddings(towers, placed["text_tower"], tokenizer, list(prompts), where)
                for prompts in (config.eval.normal_prompts, config.eval.abnormal_prompts))
            if list(config.eval.anomaly_videos):
                if towers.config.event_encoder != "vit":
                    raise ValueError(
                        "config.eval.anomaly_videos: Eq. 1 frames, which the temporal event "
                        "encoder does not take; give its videos as eventbind records "
                        "(config.eval.anomaly_splits)")
                values, roc = evaluate_video_anomaly(
                    towers, placed["event_tower"], normal, abnormal, logit_scale,
                    list(config.eval.anomaly_videos), batch_size=int(config.eval.batch_size),
                    mesh=mesh)
                metrics.update(values)
                plots.setdefault("roc", {}).update(roc["roc"])
            values, roc = _anomaly_on_splits(config, towers, placed["event_tower"], normal,
                                             abnormal, logit_scale, data_dir, mesh)
            metrics.update(values)
            plots.setdefault("roc", {}).update(roc)
    if report_dir is not None and jax.process_index() == 0:
        from evclip_jax.evaluate.report import write_report

        write_report(metrics, report_dir, plots)
    return metrics


# ----------------------------------------------------------------------------- --mode eval


def _data_dir_for_eval(config, workdir: Path, image_size: int) -> Path | None:
    if not set(parse_evals(config.eval.evals)) - {"anomaly"} and not config.eval.anomaly_splits:
        return None
    if not config.data.dir and config.data.synthetic.enabled:
        from evclip_jax.data import prepare

        return prepare.prepare_data(config, workdir, image_size)  # the demo's <workdir>/data
    if not config.data.dir:
        raise ValueError("config.data.dir: empty; expected a dir of TFRecord shards with "
                         f"{config.data.eval_split}.manifest.json")
    data_dir = Path(config.data.dir)
    if not data_dir.is_dir():
        raise ValueError(f"config.data.dir: {data_dir} does not exist (expected "
                         f"{config.data.eval_split}.manifest.json and TFRecord shards)")
    return data_dir


def evaluate_checkpoint(config, workdir: str | os.PathLike,
                        out_dir: str | os.PathLike | None = None) -> dict[str, float]:
    """--mode eval: every evaluator of config.eval on a model; returns the flat metrics.

    The model is ``config.eval.checkpoint`` (a training workdir, an evclip dir or an HF dir),
    or ``workdir`` when that is empty. Writes metrics.json, report.md, PNG plots and
    TensorBoard scalars to ``out_dir`` (default workdir/eval).
    """
    workdir = Path(workdir)
    field = "config.eval.checkpoint" if config.eval.checkpoint else "--workdir"
    path = Path(config.eval.checkpoint or workdir)
    evals = check_eval_config(config)
    clip_config, params, tok_dir = checkpoints.load_model(
        path, field, options=options_from_config(config.model.checkpoint_file))
    step_no = checkpoints.latest_step(path) if checkpoints.is_workdir(path) else 0
    towers = step.make_towers(config, clip_config)
    base = path if checkpoints.is_workdir(path) else workdir
    data_dir = _data_dir_for_eval(config, base, clip_config.vision.image_size)
    out = Path(out_dir) if out_dir is not None else workdir / "eval"
    mesh = sharding.make_mesh(**config.mesh)
    adapter = (adapter_lib.adapter_for_model(config, path, clip_config.projection_dim)
               if "modalities" in evals else None)
    metrics = run_evaluators(config, towers, params, text.load_tokenizer(tok_dir), data_dir,
                             mesh, where=str(path), report_dir=out, adapter=adapter)
    if jax.process_index() == 0:
        from clu import metric_writers

        writer = metric_writers.create_default_writer(str(out / "tensorboard"))
        writer.write_scalars(step_no or 0, metrics)
        writer.flush()
        writer.close()
        logging.info("evaluated %s (step %s): %s", path, step_no, out / "report.md")
    return metrics


def format_metrics(metrics: Mapping[str, float]) -> str:
    """A plain-text two-column table of flat metrics, sorted by name."""
    if not metrics:
        return "(no metrics)"
    width = max(len(k) for k in metrics)
    line = "-" * (width + 14)
    rows = [f"{k:<{width}}  {v:>10.4f}" for k, v in sorted(metrics.items())]
    return "\n".join([line, *rows, line])
