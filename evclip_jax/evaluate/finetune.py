"""Few-shot full fine-tuning: for each support set, a copy of the event tower trained with
L_pred (the ``finetune`` objective) through the trainer's own step, then class scores.

``fewshot_finetune`` is the entry the runner calls; ``make_finetune_fn`` builds the
``finetune_fn`` that ``fewshot.evaluate_fewshot`` takes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from evclip_jax import embed, objectives, sharding, step
from evclip_jax.evaluate.common import to_host
from evclip_jax.evaluate.fewshot import FinetuneFn, evaluate_fewshot, sample_support


def gather_rows(batches: Iterable[Mapping[str, Any]], indices: np.ndarray,
                keys: Sequence[str] = ("events", "labels")) -> dict[str, np.ndarray]:
    """Host copies of the unmasked rows ``indices`` (in pass order) of a batch iterable."""
    indices = np.asarray(indices, np.int64)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    offset = 0
    for batch in batches:
        mask = to_host(batch["mask"]).astype(bool)
        count = int(mask.sum())
        wanted = indices[(indices >= offset) & (indices < offset + count)] - offset
        if wanted.size:
            rows = np.flatnonzero(mask)[wanted]
            for k in keys:
                parts[k].append(to_host(batch[k])[rows])
        offset += count
    if offset <= indices.max(initial=-1):
        raise ValueError(f"support index {indices.max()} beyond the {offset} samples of the "
                         "support split")
    return {k: np.concatenate(v) for k, v in parts.items()}


def make_finetune_fn(config, towers, init_params: Mapping[str, Any],
                     pool: Mapping[str, np.ndarray], class_text_emb, steps: int, *,
                     pool_indices: np.ndarray | None = None, mesh: Mesh | None = None
                     ) -> FinetuneFn:
    """``finetune_fn(support_indices, *, shots, seed) -> predict_fn`` (see fewshot.py).

    For each support set a copy of ``init_params["event_tower"]`` (with
    ``init_params["logit_scale"]``) is trained for ``steps`` full-batch updates of the
    ``finetune`` objective (L_pred, ``config.loss.pred_form``) with the config's optimizer: its
    peak learning rate decayed by a cosine over the ``steps``, after the schedule's one warm-up
    step at lr 0 (which only primes Adam's moments). ``predict_fn(x)`` returns s * e t^T.

    ``pool``: {"events" tower input, "labels" [n]}; row r is the support pool's sample
    ``pool_indices[r]`` (default r), the index space of ``support_indices``.
    """
    if steps < 0:
        raise ValueError(f"config.eval.finetune_steps={steps}: expected >= 0")
    events = np.asarray(pool["events"], np.float32)
    pool_labels = np.asarray(pool["labels"]).astype(np.int32)
    pool_indices = (np.arange(pool_labels.shape[0]) if pool_indices is None
                    else np.asarray(pool_indices, np.int64))
    if not events.shape[0] == pool_labels.shape[0] == pool_indices.shape[0]:
        raise ValueError(f"support pool: events {events.shape[0]}, labels "
                         f"{pool_labels.shape[0]} and pool_indices {pool_indices.shape[0]} rows "
                         "differ")
    text = jnp.asarray(jax.device_get(class_text_emb), jnp.float32)
    step_fn, tx = _finetune_step(towers, _frozen_items(config.loss.to_dict()),
                                 _frozen_items(config.optim.to_dict()), int(config.batch_size),
                                 steps)
    mesh = mesh if mesh is not None and set(sharding.MESH_AXES) <= set(mesh.axis_names) \
        else sharding.make_mesh(devices=list(mesh.devices.flat) if mesh else jax.devices()[:1])
    rules = step.sharding_rules(config)

    def finetune_fn(support_indices, *, shots: int, seed: int) -> Callable:
        rows = np.searchsorted(pool_indices, support_indices)
        if (np.any(rows >= pool_indices.size)
                or np.any(pool_indices[rows.clip(0, pool_indices.size - 1)] != support_indices)):
            raise ValueError("finetune_fn: support indices outside the gathered support pool")
        batch = {"events": events[rows], "labels": pool_labels[rows]}
        trainable = {  # the finetune objective's params; a copy, as the step donates them
            "event_tower": jax.tree.map(lambda x: jnp.array(x, copy=True),
                                        init_params["event_tower"]),
            "logit_scale": jnp.asarray(init_params["logit_scale"], jnp.float32)}
        with jax.set_mesh(mesh), flax.linen.logical_axis_rules(rules):
            state = step.init_state(step.place_params(trainable, towers, mesh, rules), tx)
        metrics = None
        for _ in range(steps + 1 if steps else 0):
            state, metrics = step_fn(state, {}, text, batch)
        if metrics is not None:
            logging.info("few-shot fine-tune (%d-shot, seed %d): L_pred %.4f after %d steps",
                         shots, seed, float(metrics["loss"]), steps)
        return functools.partial(_predict, towers.event, state.params, text)

    return finetune_fn


def _frozen_items(d: Mapping) -> tuple:
    """A hashable form of a (nested) config dict."""
    return tuple(sorted((k, _frozen_items(v) if isinstance(v, Mapping) else
                         tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


@functools.lru_cache(maxsize=8)
def _finetune_step(towers, loss_items: tuple, optim_items: tuple, batch_size: int, steps: int):
    """(jitted finetune-objective step, optimizer), cached so that repeated evaluations reuse
    the compile."""
    cfg = ml_collections.ConfigDict({"optim": dict(optim_items), "batch_size": batch_size})
    tx, schedule = step.make_optimizer(cfg, steps + 1, 1)
    train_step = step.make_train_step(objectives.get("finetune"), towers,
                                      ml_collections.ConfigDict(dict(loss_items)), tx, schedule)
    return jax.jit(train_step, donate_argnums=(0,)), tx


@functools.partial(jax.jit, static_argnums=0)
def _predict(vision, params: dict, text: jax.Array, x: jax.Array) -> jax.Array:
    """s * e t^T: class scores of the fine-tuned event tower, s = exp(logit_scale)."""
    e = embed.l2_normalize(embed.embed_vision(vision, params["event_tower"], x))
    return jnp.exp(params["logit_scale"]) * e @ text.T


def fewshot_finetune(config, towers, event_params, logit_scale, eval_split, support_split,
                     same: bool, support_labels: np.ndarray, eval_classes: np.ndarray,
                     shots: Sequence[int], seeds: Sequence[int], text: np.ndarray,
                     mesh: Mesh):
    """Few-shot top-1 (metrics, plot details) after fine-tuning per support set.

    ``eval_split`` / ``support_split`` are zero-argument callables giving fresh passes.
    """
    where = f"config.data.train_split={config.data.train_split!r}"
    try:
        # The support sets evaluate_fewshot will draw (fewshot_splits samples them this way).
        needed = np.unique(np.concatenate([
            sample_support(support_labels, n, seed, eval_classes)
            for n in shots for seed in seeds]))
    except ValueError as e:
        raise ValueError(f"{where}: few-shot support: {e}") from e
    pool = gather_rows(support_split(), needed)
    init = {"event_tower": event_params, "logit_scale": logit_scale}
    finetune_fn = make_finetune_fn(config, towers, init, pool, text,
                                   int(config.eval.finetune_steps), pool_indices=needed,
                                   mesh=mesh)
    support_batches = [{"labels": support_labels, "mask": np.ones(support_labels.shape, bool)}]
    return evaluate_fewshot(None, eval_split, shots, seeds,
                            support_batches=None if same else support_batches,
                            classes=eval_classes, finetune_fn=finetune_fn, mesh=mesh,
                            return_details=True)
