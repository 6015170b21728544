"""Pretraining and fine-tuning of the event tower, top to bottom: mesh, state, step, loop, evals.

The image and text towers are frozen: they are a separate argument of the step that is never
differentiated, they have no optimizer state, and they are written once into ``workdir/init``
(an evclip checkpoint dir), not into every step's checkpoint. The trainable params are the
event tower, ``log_tau_ct`` (L_ct temperature, paper: learnable, init 1) and ``logit_scale``
(L_zs / L_pred scale, init log(1/0.07)).

TensorFlow (tf.data) and clu are imported inside ``train_and_evaluate`` only, so the step can
be built and benchmarked where TensorFlow is not installed.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import signal
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from evclip_jax import convert, losses, sharding
from evclip_jax.api import l2_normalize
from evclip_jax.models.clip import CLIPConfig, TowerConfig, Towers

FROZEN = ("image_tower", "text_tower")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; nothing was saved after it."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict  # event_tower, log_tau_ct, logit_scale
    opt_state: optax.OptState


# ----------------------------------------------------------------------------- model set-up


def is_workdir(path: str | Path) -> bool:
    """A training workdir: frozen towers in init/, the trained event tower in checkpoints/."""
    return convert.is_evclip_dir(Path(path) / "init")


def model_config(config) -> CLIPConfig:
    """The CLIP architecture: from the checkpoint when one is given, else from config.model."""
    m = config.model
    if m.checkpoint:
        path = Path(m.checkpoint)
        if is_workdir(path):
            return convert.load_evclip_config(path / "init")
        if convert.is_evclip_dir(path):
            return convert.load_evclip_config(path)
        return convert.load_hf_config(path)
    if not m.allow_random_init:
        raise ValueError("config.model.checkpoint: empty; give an HF CLIP dir, an evclip "
                         "checkpoint dir or a training workdir (or set model.allow_random_init "
                         "for a random CLIP built from model.vision and model.text)")
    return CLIPConfig(vision=TowerConfig(**m.vision), text=TowerConfig(**m.text),
                      projection_dim=m.vision.projection_dim)


def make_towers(config, clip_config: CLIPConfig) -> Towers:
    return Towers(clip_config, dtype=jnp.dtype(config.model.dtype),
                  attention_impl=config.model.attention_impl or None, remat=config.model.remat)


def initial_params(config, towers: Towers) -> dict:
    """{image_tower, event_tower, text_tower, logit_scale} from the checkpoint or at random."""
    if config.model.checkpoint:
        if is_workdir(config.model.checkpoint):  # e.g. fine-tuning a pretrained event tower
            return jax.device_get(load_trained(config.model.checkpoint).params)
        _, params = convert.load_any(config.model.checkpoint)
        return params
    return jax.device_get(towers.init(jax.random.key(config.seed)))


def trainable_from(params: dict, config) -> dict:
    return {
        "event_tower": params["event_tower"],
        "log_tau_ct": jnp.asarray(math.log(config.loss.tau_ct_init), jnp.float32),
        "logit_scale": jnp.asarray(config.loss.logit_scale_init, jnp.float32),
    }


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


def make_loss_fn(towers: Towers, loss_cfg):
    """(params, frozen, class_text_emb, batch) -> (L, {term: value}) over the global batch.

    A batch with ``teacher_emb`` skips the image tower; a batch with ``caption_ids`` runs the
    frozen text tower on its captions (image-caption data) instead of using the class text
    embeddings. Frozen outputs enter under stop_gradient.
    """
    vision, text = towers.vision, towers.text
    lc = loss_cfg

    def embed(tower, params, x):
        return tower.apply({"params": params}, x).astype(jnp.float32)

    def loss_fn(params, frozen, class_text_emb, batch):
        e_raw = embed(vision, params["event_tower"], batch["events"])
        if "teacher_emb" in batch:
            v_raw = batch["teacher_emb"].astype(jnp.float32)
        else:
            v_raw = embed(vision, frozen["image_tower"], batch["images"])
        v_raw = jax.lax.stop_gradient(v_raw)
        e, v = l2_normalize(e_raw), l2_normalize(v_raw)
        if "caption_ids" in batch:
            t = l2_normalize(embed(text, frozen["text_tower"], batch["caption_ids"]))
            labels = jnp.arange(t.shape[0])
        else:
            t, labels = class_text_emb, batch["labels"]
        t = jax.lax.stop_gradient(t)
        terms = {}
        if lc.ct_weight:
            terms["loss_ct"] = (lc.ct_weight, losses.loss_ct(
                e, v, jnp.exp(params["log_tau_ct"]), release=lc.ct_release))
        if lc.zs_weight:
            # The release feeds unnormalised event and image features to L_zs.
            e_zs, v_zs = (e_raw, v_raw) if lc.zs_form == "release" else (e, v)
            terms["loss_zs"] = (lc.zs_weight, losses.loss_zs(
                e_zs, v_zs, t, params["logit_scale"], T=lc.zs_temperature, form=lc.zs_form,
                labels=labels))
        if lc.kl_weight:
            terms["loss_kl"] = (lc.kl_weight, losses.loss_kl(
                e, v, temperature=lc.kl_temperature, sinkhorn_iters=lc.sinkhorn_iters))
        if lc.pred_weight:
            terms["loss_pred"] = (lc.pred_weight, losses.loss_pred(
                e, t, labels, params["logit_scale"], form=lc.pred_form))
        if not terms:
            raise ValueError("config.loss: every loss weight is zero")
        total = sum(w * value for w, value in terms.values())
        return total, {k: value for k, (_, value) in terms.items()}

    return loss_fn


def make_train_step(towers: Towers, loss_cfg, tx, schedule):
    """The train step: (state, frozen, class_text_emb, batch) -> (state, metrics).

    ``jax.grad`` is taken with respect to ``state.params`` alone, so no gradient is computed
    for the frozen image and text towers, and they have no optimizer state.
    """
    loss_fn = make_loss_fn(towers, loss_cfg)

    def train_step(state: TrainState, frozen: dict, class_text_emb: jax.Array, batch: dict):
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, frozen, class_text_emb, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss, **terms,
            "tau_ct": jnp.exp(state.params["log_tau_ct"]),
            "zs_scale": jnp.exp(state.params["logit_scale"]),  # s = exp(logit_scale)
            "grad_norm": optax.global_norm(grads),
            "lr": schedule(state.step),
        }
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def class_text_embeddings(towers: Towers, text_params: dict, token_ids: np.ndarray) -> jax.Array:
    """Normalised text embeddings of the class prompts, computed once (the tower is frozen)."""
    out = jax.jit(lambda p, ids: towers.text.apply({"params": p}, ids))(text_params, token_ids)
    return l2_normalize(out.astype(jnp.float32))


# ----------------------------------------------------------------------------- sharded set-up


def _logical_axes(towers: Towers) -> dict:
    axes = towers.logical_axes()
    return {"image_tower": axes["image_tower"], "event_tower": axes["event_tower"],
            "text_tower": axes["text_tower"]}


def place_params(tree: dict, towers: Towers, mesh: Mesh, rules) -> dict:
    """device_put each tower by its logical-axis sharding; scalars are replicated."""
    axes = _logical_axes(towers)
    out = {}
    for name, sub in tree.items():
        if name in axes:
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


def shardings_of(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def jit_train_step(train_step, state: TrainState, frozen: dict, text_emb: jax.Array,
                   batch_example: dict, mesh: Mesh):
    """jit with explicit in/out shardings; the state is donated."""
    state_sh = shardings_of(state)
    batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch_example.items()}
    return jax.jit(
        train_step,
        in_shardings=(state_sh, shardings_of(frozen), text_emb.sharding, batch_sh),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: Path, config):
    import orbax.checkpoint as ocp

    c = config.checkpoint
    options = ocp.CheckpointManagerOptions(
        max_to_keep=c.keep, save_interval_steps=c.every_steps,
        enable_async_checkpointing=c.async_save)
    return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options,
                                 item_names=("state", "data"))


def save_checkpoint(mngr, step: int, state: TrainState, force: bool = False) -> bool:
    import orbax.checkpoint as ocp

    return mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({"step": step})), force=force)


def restore_checkpoint(mngr, step: int, state: TrainState) -> tuple[TrainState, dict]:
    """Restores ``step`` onto ``state``'s shapes and shardings, checking shapes first."""
    import orbax.checkpoint as ocp

    where = Path(mngr.directory) / str(step)
    meta = mngr.item_metadata(step)
    tree = getattr(meta, "state", None)
    if tree is not None:
        tree = getattr(tree, "tree", tree)
        convert.check_tree_matches(
            jax.tree.map(lambda m: np.empty(m.shape, np.uint8), tree,
                         is_leaf=lambda x: hasattr(x, "shape")),
            flax.serialization.to_state_dict(state), where)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]


class _Preemption:
    """Turns SIGTERM into a flag the loop polls, so it can save before exiting."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            logging.warning("SIGTERM received: saving a checkpoint and stopping")
            self.requested = True

        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# ----------------------------------------------------------------------------- the loop


def _check_config(config) -> None:
    if config.batch_size % jax.device_count():
        raise ValueError(f"config.batch_size={config.batch_size} is not divisible by "
                         f"{jax.device_count()} devices")
    if config.loss.zs_form not in losses.ZS_FORMS:
        raise ValueError(f"config.loss.zs_form={config.loss.zs_form!r}; expected one of "
                         f"{losses.ZS_FORMS}")


def prepare_data(config, workdir: Path, image_size: int) -> Path:
    """The TFRecord dir; the demo builds its synthetic dataset there on first use."""
    from evclip_jax.data import tfrecords

    if config.data.synthetic.enabled:
        data_dir = Path(config.data.dir or workdir / "data")
        manifest = data_dir / f"{config.data.train_split}.manifest.json"
        if not manifest.is_file() and jax.process_index() == 0:
            from evclip_jax.data.synthetic import make_synthetic_dataset

            s = config.data.synthetic
            logging.info("building the synthetic dataset in %s", data_dir)
            make_synthetic_dataset(data_dir, num_classes=s.num_classes, per_class=s.per_class,
                                   image_size=image_size, seed=s.seed,
                                   splits=dict(s.splits), num_shards=s.num_shards)
        return data_dir
    if not config.data.dir:
        raise ValueError("config.data.dir: empty; expected a dir of TFRecord shards with "
                         "<split>.manifest.json (tools/build_tfrecords.py writes one)")
    data_dir = Path(config.data.dir)
    tfrecords.read_manifest(data_dir, config.data.train_split)  # names the missing path
    return data_dir


def prompt_token_ids(config, init_dir: Path, class_names: list[str], text_cfg: TowerConfig):
    """Token ids of the class prompts: the checkpoint's tokenizer, else a deterministic
    hash tokenizer for tokenizer-less random demo models."""
    prompts = [config.data.prompt.format(label=name) for name in class_names]
    from evclip_jax.api import _load_tokenizer

    tok = _load_tokenizer(init_dir)
    length = text_cfg.max_position_embeddings
    if tok is not None:
        return tok(prompts, padding="max_length", truncation=True, max_length=length,
                   return_tensors="np")["input_ids"]
    if config.model.checkpoint:
        raise ValueError(f"{config.model.checkpoint}: no tokenizer files (vocab.json + "
                         "merges.txt or tokenizer.json) to encode the class prompts")
    return hash_tokenize(prompts, text_cfg)


def hash_tokenize(texts: list[str], text_cfg: TowerConfig) -> np.ndarray:
    """Word-hash token ids ending in the EOS id, for random demo CLIPs that have no vocabulary."""
    import zlib

    length, vocab = text_cfg.max_position_embeddings, text_cfg.vocab_size
    eos = text_cfg.eos_token_id
    ids = np.zeros((len(texts), length), np.int32)
    for i, text in enumerate(texts):
        words = [1 + zlib.crc32(w.encode()) % (vocab - 3) for w in text.lower().split()]
        words = words[: length - 1] + [eos]
        ids[i, : len(words)] = words
    return ids


def _write_init_dir(config, workdir: Path, towers: Towers) -> Path:
    """workdir/init: the frozen towers (and the event tower's start) stored once."""
    init_dir = workdir / "init"
    if convert.is_evclip_dir(init_dir):
        stored = convert.load_evclip_config(init_dir)
        if stored != towers.config:
            raise ValueError(f"{init_dir}/evclip.json: the stored model differs from the "
                             "config's; use a fresh --workdir")
        return init_dir
    if jax.process_index() == 0:
        params = initial_params(config, towers)
        tok_dir = config.model.checkpoint or None
        if tok_dir and is_workdir(tok_dir):
            tok_dir = Path(tok_dir) / "init"
        convert.save_evclip(params, towers.config, init_dir, tokenizer_dir=tok_dir)
    return init_dir


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains per ``config`` in ``workdir``, resuming from its latest complete checkpoint."""
    from clu import metric_writers

    from evclip_jax.data import pipeline, tfrecords

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _check_config(config)
    mesh = sharding.make_mesh(**config.mesh)
    rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.sharding_rules)
    clip_config = model_config(config)
    towers = make_towers(config, clip_config)
    image_size = clip_config.vision.image_size

    # Data and schedule.
    data_dir = prepare_data(config, workdir, image_size)
    manifest = tfrecords.read_manifest(data_dir, config.data.train_split)
    steps_per_epoch = max(manifest["num_examples"] // config.batch_size, 1)
    total_steps = config.num_train_steps or config.num_epochs * steps_per_epoch
    warmup_steps = config.optim.warmup_steps or int(config.optim.warmup_epochs * steps_per_epoch)
    tx, schedule = make_optimizer(config, total_steps, warmup_steps)

    # Params: frozen towers stored once in workdir/init, read back from there.
    init_dir = _write_init_dir(config, workdir, towers)
    _, params = convert.load_evclip(init_dir)
    frozen = place_params({k: params[k] for k in FROZEN}, towers, mesh, rules)
    trainable = place_params(trainable_from(params, config), towers, mesh, rules)
    with jax.set_mesh(mesh), flax.linen.logical_axis_rules(rules):
        state = init_state(trainable, tx)
    class_names = manifest["class_names"]
    ids = prompt_token_ids(config, init_dir, class_names, clip_config.text)
    text_emb = class_text_embeddings(towers, frozen["text_tower"], ids)

    # Resume.
    mngr = checkpoint_manager(workdir, config)
    start = 0
    if mngr.latest_step() is not None:
        state, data_meta = restore_checkpoint(mngr, mngr.latest_step(), state)
        start = int(data_meta["step"])
        logging.info("resumed from %s at step %d", Path(mngr.directory) / str(start), start)

    augment = dict(config.data.augment)
    augment = augment if augment.pop("enabled") else None
    ds = pipeline.make_dataset(
        data_dir, config.data.train_split, global_batch_size=config.batch_size,
        out_size=image_size, train=True, seed=config.seed, augment=augment,
        paired_aug=config.data.paired_aug, skip_bad_records=config.data.skip_bad_records,
        teacher_emb=config.data.teacher_emb, start_step=start)
    batches = pipeline.global_batches(ds, mesh)

    writer = metric_writers.create_default_writer(
        str(workdir / "tensorboard"), just_logging=jax.process_index() > 0)
    writer.write_hparams({k: v for k, v in _flat_config(config).items()})
    summary = _loop(config, workdir, towers, mesh, rules, tx, schedule, state, frozen,
                    text_emb, batches, mngr, writer, start, total_steps, data_dir, class_names)
    writer.flush()
    return summary


def _flat_config(config, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            out.update(_flat_config(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
    return out


def _loop(config, workdir, towers, mesh, rules, tx, schedule, state, frozen, text_emb,
          batches, mngr, writer, start, total_steps, data_dir, class_names) -> dict:
    train_step = make_train_step(towers, config.loss, tx, schedule)
    step_fn = None
    last_saved = mngr.latest_step()
    pending = None  # (step, metrics) of the step before, checked one step late
    history: dict[str, float] = {}
    order_log = (workdir / "data_order.jsonl").open("a") if config.debug.log_data_order else None
    t0, samples = time.time(), 0
    step = start
    n_dev = jax.device_count()

    def check(step_metrics, at_step):
        values = jax.device_get(step_metrics)
        if not np.isfinite(values["loss"]):
            good = Path(mngr.directory) / str(last_saved) if last_saved is not None else "none"
            raise NonFiniteLossError(
                f"non-finite loss {values['loss']} at step {at_step}; stopped without saving. "
                f"Last good checkpoint: {good}")
        return values

    with _Preemption() as preempt, jax.set_mesh(mesh), \
            flax.linen.logical_axis_rules(rules):
        while step < total_steps:
            batch = next(batches)
            if order_log is not None:
                order_log.write(json.dumps({"step": step, "labels": np.asarray(
                    jax.device_get(batch["labels"])).tolist()}) + "\n")
            batch.pop("mask", None)
            if step_fn is None:
                step_fn = jit_train_step(train_step, state, frozen, text_emb, batch, mesh)
            state, metrics = step_fn(state, frozen, text_emb, batch)
            if pending is not None:
                prev_values = check(*pending)
                history = {k: float(v) for k, v in prev_values.items()}
            step += 1
            samples += config.batch_size
            pending = (metrics, step)
            if step % config.log_every_steps == 0 or step == total_steps:
                values = check(metrics, step)
                elapsed = time.time() - t0
                rate = samples / elapsed
                eta = (total_steps - step) * config.batch_size / max(rate, 1e-9)
                values = {k: float(v) for k, v in values.items()}
                values["samples_per_sec_per_device"] = rate / n_dev
                writer.write_scalars(step, values)
                logging.info("step %d/%d  loss %.4f  %s  %.1f samples/s/device  ETA %s",
                             step, total_steps, values["loss"],
                             " ".join(f"{k} {values[k]:.4f}" for k in sorted(values)
                                      if k.startswith("loss_")),
                             values["samples_per_sec_per_device"], _hms(eta))
                history = values
            want_save = (step % config.checkpoint.every_steps == 0 or step == total_steps
                         or preempt.requested or mngr.reached_preemption(step))
            if want_save:
                check(metrics, step)
                save_checkpoint(mngr, step, state, force=True)
                last_saved = step
            if preempt.requested:
                mngr.wait_until_finished()
                logging.warning("stopped at step %d after SIGTERM; checkpoint saved", step)
                break
            if config.eval.every_steps and step % config.eval.every_steps == 0:
                writer.write_scalars(step, run_evals(config, towers, state, frozen, text_emb,
                                                     data_dir, mesh, class_names))
    mngr.wait_until_finished()
    if order_log is not None:
        order_log.close()
    eval_metrics = {}
    if step >= total_steps and config.eval.at_end:
        eval_metrics = run_evals(config, towers, state, frozen, text_emb, data_dir, mesh,
                                 class_names, report_dir=workdir / "report")
        writer.write_scalars(step, eval_metrics)
    summary = {
        "step": step, "total_steps": total_steps, "finished": step >= total_steps,
        "preempted": step < total_steps, "wall_seconds": round(time.time() - t0, 2),
        "samples_per_sec": round(samples / max(time.time() - t0, 1e-9), 2),
        "devices": n_dev, "last_checkpoint": str(Path(mngr.directory) / str(last_saved)),
        "train": history, "eval": eval_metrics,
    }
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run_evals(config, towers, state, frozen, text_emb, data_dir, mesh, class_names,
              report_dir: Path | None = None) -> dict:
    """Evaluation hook: the evaluators named in config.eval on the eval split."""
    from evclip_jax.evaluate import runner

    return runner.run_in_training(
        config, _embed_for(towers), state.params["event_tower"], frozen["image_tower"],
        text_emb, data_dir, mesh, class_names, report_dir=report_dir, towers=towers,
        logit_scale=state.params["logit_scale"])


@functools.cache
def _embed_for(towers: Towers):
    """One embed function per model, so evaluations reuse its compiled form."""
    return functools.partial(_embed_fn, towers)


def _embed_fn(towers: Towers, params: dict, x: jax.Array) -> jax.Array:
    return towers.vision.apply({"params": params}, x).astype(jnp.float32)



# ----------------------------------------------------------------------------- after training


def load_trained(workdir: str | Path, step: int | None = None):
    """EventCLIP of a training workdir: frozen towers from workdir/init, the event tower from
    the latest (or given) complete checkpoint."""
    import orbax.checkpoint as ocp

    from evclip_jax.api import EventCLIP, _load_tokenizer

    workdir = Path(workdir)
    init_dir = workdir / "init"
    if not convert.is_evclip_dir(init_dir):
        raise convert.CheckpointError(f"{init_dir}: missing; {workdir} is not a training workdir")
    clip_config, params = convert.load_evclip(init_dir)
    with ocp.CheckpointManager((workdir / "checkpoints").absolute(),
                               item_names=("state", "data")) as mngr:
        step = mngr.latest_step() if step is None else step
    if step is None:
        raise convert.CheckpointError(f"{workdir / 'checkpoints'}: no complete checkpoint")
    state_dir = (workdir / "checkpoints" / str(step) / "state").absolute()
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.StandardCheckpointer() as ckptr:  # onto one device, whatever mesh saved it
        tree = ckptr.metadata(state_dir)
        tree = getattr(getattr(tree, "item_metadata", tree), "tree", tree)
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                                tree, is_leaf=lambda x: hasattr(x, "shape"))
        trained = ckptr.restore(state_dir, abstract)["params"]
    expected = Towers(clip_config).abstract_params()["event_tower"]
    convert.check_tree_matches(trained["event_tower"], expected, state_dir)
    params["event_tower"] = trained["event_tower"]
    params["logit_scale"] = trained["logit_scale"]  # the L_zs / L_pred scale learnt with it
    return EventCLIP(clip_config, params, tokenizer=_load_tokenizer(init_dir),
                     tokenizer_dir=init_dir)


def export(workdir: str | Path, out_dir: str | Path | None, tower: str = "event") -> Path:
    """Writes the trained tower of ``workdir`` as an HF dir (default workdir/export/<tower>)."""
    model = load_trained(workdir)
    out = Path(out_dir) if out_dir else Path(workdir) / "export" / tower
    return model.save_pretrained_hf(out, tower=tower, overwrite=True)


def format_summary(summary: dict) -> str:
    """A plain-text table of the run's last training metrics and its eval metrics."""
    rows = [("steps", f"{summary['step']}/{summary['total_steps']}"
             + ("" if summary["finished"] else " (stopped early)")),
            ("wall time", f"{summary['wall_seconds']:.1f} s"),
            ("throughput", f"{summary['samples_per_sec']:.1f} samples/s on "
                           f"{summary['devices']} device(s)"),
            ("last checkpoint", summary["last_checkpoint"])]
    rows += [(f"train/{k}", f"{v:.4f}") for k, v in sorted(summary["train"].items())]
    rows += [(f"eval/{k}", f"{v:.4f}" if isinstance(v, float) else str(v))
             for k, v in sorted(summary["eval"].items())]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 30)
    return "\n".join([line] + [f"{k:<{width}}  {v}" for k, v in rows] + [line])
