"""The train step and its set-up: state, optimizer, placement on the mesh, the jitted step.

``setup`` is the one sequence that turns (config, towers, params, mesh) into a placed state, the
frozen towers and the jitted step; the trainer, the few-shot fine-tune and the benchmark tool
all build their step through it (or through the functions it calls), from the same config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from evclip_jax import objectives, sharding
from evclip_jax.data import device_prep
from evclip_jax.models.towers import Towers


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict  # the objective's trainable towers and temperatures
    opt_state: optax.OptState


def make_towers(config, clip_config) -> Towers:
    m = config.model
    return Towers(clip_config, dtype=jnp.dtype(m.dtype), attention_impl=m.attention_impl or None,
                  remat=m.remat)


def sharding_rules(config) -> tuple:
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.sharding_rules)


# ----------------------------------------------------------------------------- optimizer


def _decays(path, _) -> bool:
    """Weight decay on weight matrices only: not biases, LayerNorm, embeddings or temperatures."""
    names = [getattr(k, "key", "") for k in path]
    return names[-1] == "kernel" and "embeddings" not in names


def make_optimizer(config, total_steps: int, warmup_steps: int):
    """AdamW, lr = base_lr * global_batch / 256, linear warm-up then cosine to zero."""
    o = config.optim
    peak = o.base_lr * config.batch_size / 256
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, peak, max(warmup_steps, 1), max(total_steps, warmup_steps + 1), end_value=0.0)
    parts = []
    if o.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                             mask=lambda p: jax.tree_util.tree_map_with_path(_decays, p)))
    return optax.chain(*parts), schedule


# ----------------------------------------------------------------------------- the step


def make_train_step(objective: objectives.Objective, towers: Towers, loss_cfg, tx, schedule,
                    seed: int = 0, input_prep: device_prep.InputPrep | None = None,
                    gathered: jax.sharding.Sharding | None = None):
    """(state, frozen, classes, batch) -> (state, metrics).

    ``jax.grad`` is taken with respect to ``state.params`` alone, so the frozen towers get no
    gradient and no optimizer state. ``input_prep``: the batch is the input pipeline's
    integers, made the towers' inputs (augmented) on the device first
    (``device_prep.prepare``); None: the batch holds tower inputs already. ``gathered``: as
    ``objectives.make_loss_fn`` takes it.
    """
    loss_fn = objectives.make_loss_fn(objective, towers, loss_cfg, seed, gathered)

    def train_step(state: TrainState, frozen: dict, classes, batch: dict):
        if input_prep is not None:
            batch = device_prep.prepare(batch, input_prep)
        batch = {k: v for k, v in batch.items() if k != "mask"}
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, frozen, classes, batch, state.step)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, **terms, "grad_norm": optax.global_norm(grads),
                   "lr": schedule(state.step)}
        if "log_tau_ct" in state.params:
            metrics["tau_ct"] = jnp.exp(state.params["log_tau_ct"])
        if "logit_scale" in state.params:
            metrics["logit_scale_exp"] = jnp.exp(state.params["logit_scale"])
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


# ----------------------------------------------------------------------------- placement


def place_params(tree: dict, towers: Towers, mesh: Mesh, rules) -> dict:
    """device_put each tower by its logical-axis sharding; scalars are replicated."""
    axes = towers.logical_axes()
    out = {}
    for name, sub in tree.items():
        if name in objectives.TOWERS:
            shard = sharding.tree_shardings(sub, axes[name], mesh, rules)
            out[name] = jax.tree.map(jax.device_put, sub, shard)
        else:
            out[name] = jax.device_put(sub, sharding.replicated(mesh))
    return out


def init_state(trainable: dict, tx) -> TrainState:
    """State whose optimizer moments are laid out like the params they follow."""
    mesh = jax.tree.leaves(trainable)[0].sharding.mesh
    abstract = jax.eval_shape(tx.init, trainable)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, p: p.sharding, abstract, trainable,
        transform_non_params=lambda _: sharding.replicated(mesh))
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(trainable)
    step = jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))
    return TrainState(step, trainable, opt_state)


def _shardings_of(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def jit_train_step(train_step, state: TrainState, frozen: dict, classes, mesh: Mesh):
    """jit with the state's, frozen towers' and classes' shardings (batches arrive sharded by
    the pipeline); the state is donated."""
    state_sh = _shardings_of(state)
    return jax.jit(
        train_step,
        in_shardings=(state_sh, _shardings_of(frozen), _shardings_of(classes), None),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


@dataclasses.dataclass
class Setup:
    """Everything a loop needs to take steps."""

    state: TrainState
    frozen: dict
    classes: Any  # an array, or (hybrid prompts) a dict of arrays: objectives.make_loss_fn
    step_fn: Any  # jitted (state, frozen, classes, batch) -> (state, metrics)


def setup(config, towers: Towers, params: dict, classes, mesh: Mesh, *, total_steps: int,
          warmup_steps: int, input_prep: device_prep.InputPrep | None = None) -> Setup:
    """The objective's state and frozen towers placed on ``mesh`` and its jitted step.

    ``params`` are model params ({image_tower, event_tower, text_tower, logit_scale}, host or
    device); ``classes`` as objectives.make_loss_fn takes it; ``input_prep`` as
    ``make_train_step`` takes it (the trainer's, for the pipeline's integer batches).
    """
    objective = objectives.get(config.objective)
    objectives.check_loss_config(objective, config.loss)
    rules = sharding_rules(config)
    tx, schedule = make_optimizer(config, total_steps, warmup_steps)
    with jax.set_mesh(mesh), flax.linen.logical_axis_rules(rules):
        frozen = place_params({k: params[k] for k in objective.frozen}, towers, mesh, rules)
        trainable = place_params(objectives.initial_trainable(objective, params, config.loss),
                                 towers, mesh, rules)
        state = init_state(trainable, tx)
    classes = jax.tree.map(lambda x: jax.device_put(np.asarray(jax.device_get(x)),
                                                    sharding.replicated(mesh)), classes)
    gathered = sharding.replicated(mesh) if config.loss.gather_embeddings else None
    train_step = make_train_step(objective, towers, config.loss, tx, schedule, config.seed,
                                 input_prep, gathered)
    step_fn = jit_train_step(train_step, state, frozen, classes, mesh)
    return Setup(state, frozen, classes, step_fn)
