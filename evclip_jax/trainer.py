"""The trainer, top to bottom: mesh, data, model, state and step, checkpoint, evaluators, loop.

What trains and what stays frozen follows ``config.objective`` (see objectives.py). The towers
the run starts from are written once to ``workdir/init`` (an evclip checkpoint dir); the step
checkpoints in ``workdir/checkpoints`` hold only the trainable state (checkpoints.py).

Before any compute, every setting is checked, process 0 takes the workdir's lock and a resume
is compared with the config the run started with (run_guard.py). SIGTERM is handled even
while input is stuck (the batches come from a background thread): the step reached is saved
and ``Preempted`` raised. A finished run that is run again returns its summary untouched.

TensorFlow (tf.data) and clu are imported inside ``train_and_evaluate``, so the step can be
built and benchmarked where TensorFlow is not installed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from evclip_jax import (
    checkpoints,
    config_base,
    convert,
    embed,
    objectives,
    profiling,
    prompts,
    run_guard,
    sharding,
    step,
    text,
)
from evclip_jax.checkpoint_files import options_from_config
from evclip_jax.data import device_prep
from evclip_jax.data.augment import check_augment
from evclip_jax.evaluate import runner
from evclip_jax.models.clip import CLIPConfig, TowerConfig

EVAL_HISTORY = "eval_history.jsonl"
SUMMARY = "summary.json"


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; nothing was saved after it."""


class Preempted(Exception):
    """SIGTERM stopped the run after its checkpoint was saved; running it again resumes."""

    def __init__(self, summary: dict):
        super().__init__(f"preempted at step {summary['step']}/{summary['total_steps']}; "
                         f"checkpoint {summary['last_checkpoint']}")
        self.summary = summary


# ----------------------------------------------------------------------------- set-up pieces


def check_config(config) -> None:
    """Settings refused before anything is built, each naming its field."""
    config_base.check_fields(config)
    if config.batch_size % jax.device_count():
        raise ValueError(f"config.batch_size={config.batch_size} is not divisible by "
                         f"{jax.device_count()} devices")
    objectives.check_loss_config(objectives.get(config.objective), config.loss)
    embed.check_representation(config.data.representation)
    try:
        check_augment({k: v for k, v in config.data.augment.items() if k != "enabled"})
    except ValueError as e:  # its messages start with "augment"
        raise ValueError(f"config.data.{e}") from None
    runner.check_eval_config(config)  # every eval view's settings, before any training


def model_config(config) -> CLIPConfig:
    """The model: the CLIP architecture from model.checkpoint when given, else from
    config.model, with config.model's event encoder and text prompts (CLIPConfig's
    additions)."""
    m = config.model
    eventbind = m.event_encoder == "eventbind"
    additions = {"event_encoder": m.event_encoder, "text_prompts": m.text_prompts,
                 "num_frames": config.data.num_frames if eventbind else 1,
                 "event_prompts": m.event_prompts if eventbind else 0}
    if m.checkpoint:
        stored = checkpoints.load_model_config(m.checkpoint, "config.model.checkpoint",
                                               options_from_config(m.checkpoint_file))
        wanted = dataclasses.replace(stored, **additions)
        if stored.additions() and stored != wanted:
            raise ValueError(f"config.model.checkpoint: {m.checkpoint} holds a model with "
                             f"{stored.additions()}; config.model and data.num_frames ask for "
                             f"{wanted.additions() or 'the paper model'}")
        return wanted
    if not m.allow_random_init:
        raise ValueError("config.model.checkpoint: empty; give an HF CLIP dir, an evclip "
                         "checkpoint dir or a training workdir (or set model.allow_random_init "
                         "for a random CLIP built from model.vision and model.text)")
    return CLIPConfig(vision=TowerConfig(**m.vision), text=TowerConfig(**m.text),
                      projection_dim=m.vision.projection_dim, **additions)


def write_init_dir(config, workdir: Path, towers) -> Path:
    """workdir/init: the towers the run starts from, stored once (by process 0)."""
    init_dir = workdir / checkpoints.INIT_DIR
    if jax.process_index() == 0 and not convert.is_evclip_dir(init_dir):
        if config.model.checkpoint:
            _, params, tok_dir = checkpoints.load_model(
                config.model.checkpoint, "config.model.checkpoint",
                options=options_from_config(config.model.checkpoint_file))
            # A CLIP's event tower becomes the temporal encoder, prompts are added (Towers).
            params = towers.complete(params, jax.random.key(config.seed))
        else:
            params, tok_dir = jax.device_get(towers.init(jax.random.key(config.seed))), None
        convert.save_evclip(params, towers.config, init_dir, tokenizer_dir=tok_dir)
    multihost_utils.sync_global_devices("workdir/init written")  # before any process reads it
    if convert.load_evclip_config(init_dir) != towers.config:
        raise ValueError(f"{init_dir}/evclip.json: the stored model differs from the "
                         "config's; use a fresh --workdir")
    return init_dir


def class_inputs(config, objective, towers, params: dict, tokenizer, class_names
                  ) -> np.ndarray | dict[str, np.ndarray]:
    """What the objective knows of the classes: normalised class text embeddings [M, D] of the
    frozen text tower, or (clip objective) caption token ids [M, K, L] of K templates, or
    (hybrid prompts) the class prompts' token ids and context positions [M, L]."""
    text_cfg, where = towers.config.text, config.model.checkpoint or "the random model"
    if towers.prompts is not None:
        ids, context = prompts.prompt_inputs(config.data.prompt, class_names, text_cfg,
                                             tokenizer, where)
        return {"ids": ids, "context": context}
    if objective.uses_class_text:
        ids = text.token_ids(text.class_prompts(config.data.prompt, class_names), text_cfg,
                             tokenizer, where)
        return np.asarray(embed.class_text_embeddings(towers.text, params["text_tower"], ids))
    templates = list(config.data.caption_templates) or [config.data.prompt]
    per_template = [text.token_ids(text.class_prompts(t, class_names,
                                                      "config.data.caption_templates"),
                                   text_cfg, tokenizer, where) for t in templates]
    return np.stack(per_template, axis=1)


class Preemption:
    """Turns SIGTERM into a flag the loop polls, so it can save before exiting.

    Only in a single-process run: with several processes, SIGTERM goes to the handler of JAX's
    preemption sync (installed by jax.distributed), and ``mngr.reached_preemption`` sets the
    flag at the same step in every process; a flag set in one process alone would leave the
    others waiting in the next step's collectives.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() > 1:
            return self

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


def finished_summary(workdir: Path, total_steps: int) -> dict | None:
    """The summary of a run that finished all ``total_steps`` (training and its final
    evaluation); None otherwise, also for an unreadable one (then it is written again)."""
    path = workdir / SUMMARY
    try:
        summary = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    done = summary.get("finished") and summary.get("step") == total_steps
    return summary if done else None


def write_summary(workdir: Path, summary: dict) -> None:
    """workdir/summary.json, through a temporary name (a kill never leaves half of it)."""
    if jax.process_index() == 0:
        tmp = workdir / (SUMMARY + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, workdir / SUMMARY)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------- the trainer


def train_and_evaluate(config, workdir: str, *, allow_config_change: bool = False) -> dict:
    """Trains per ``config`` in ``workdir``, resuming from its latest complete checkpoint.

    A resume that changes a trajectory field of the config is refused unless
    ``allow_config_change``. Returns the summary; raises Preempted after SIGTERM, once the
    checkpoint of the step reached is saved.
    """
    workdir = Path(workdir)
    check_config(config)
    workdir.mkdir(parents=True, exist_ok=True)
    with run_guard.run_lock(workdir):
        return _train(config, workdir, allow_config_change)


def _train(config, workdir: Path, allow_config_change: bool) -> dict:
    from clu import metric_writers

    from evclip_jax.data import pipeline, prepare, records

    done = checkpoints.latest_step(workdir)
    run_guard.record_config(config, workdir, resuming=done is not None,
                            allow_change=allow_config_change)
    trace = profiling.StepTrace(config.profile, workdir / "profile")

    # Mesh and model.
    mesh = sharding.make_mesh(**config.mesh)
    towers = step.make_towers(config, model_config(config))
    image_size = towers.config.vision.image_size
    objective = objectives.get(config.objective)

    # Data and schedule.
    data_dir = prepare.prepare_data(config, workdir, image_size)
    manifest = records.read_manifest(data_dir, config.data.train_split)
    class_names = manifest["class_names"]
    steps_per_epoch = max(manifest["num_examples"] // config.batch_size, 1)
    total_steps = config.num_train_steps or config.num_epochs * steps_per_epoch
    warmup_steps = config.optim.warmup_steps or int(config.optim.warmup_epochs * steps_per_epoch)
    if done is not None and done >= total_steps and (
            summary := finished_summary(workdir, total_steps)) is not None:
        logging.warning("%s finished already (step %d/%d); its summary %s is kept. A fresh "
                        "--workdir starts a new run", workdir, done, total_steps,
                        workdir / SUMMARY)
        return summary

    # State and step: the starting towers stored once in workdir/init and read back from there.
    init_dir = write_init_dir(config, workdir, towers)
    _, params = convert.load_evclip(init_dir)
    tokenizer = text.load_tokenizer(init_dir)
    classes = class_inputs(config, objective, towers, params, tokenizer, class_names)
    # The step makes the pipeline's integer batches tower inputs, augmented, on the device.
    s = step.setup(config, towers, params, classes, mesh, total_steps=total_steps,
                   warmup_steps=warmup_steps,
                   input_prep=device_prep.InputPrep.from_config(config, manifest))
    state = s.state

    # Checkpoint: resume from the newest step that restores (checked; damaged ones set aside).
    mngr = checkpoints.checkpoint_manager(
        workdir, keep=config.checkpoint.keep, every_steps=config.checkpoint.every_steps,
        async_save=config.checkpoint.async_save)
    start, history = 0, {}
    restored = checkpoints.restore_latest(mngr, state)
    if restored is not None:
        state, data_meta = restored
        start, history = int(data_meta["step"]), dict(data_meta.get("train", {}))
        logging.info("resumed from %s at step %d", Path(mngr.directory) / str(start), start)

    # Input: the data position is the step, so a resumed run sees the batches it would have.
    ds = pipeline.make_dataset(
        data_dir, config.data.train_split, global_batch_size=config.batch_size,
        out_size=image_size, train=True, seed=config.seed,
        skip_bad_records=config.data.skip_bad_records,
        max_bad_fraction=config.data.max_bad_fraction, teacher_emb=config.data.teacher_emb,
        start_step=start, representation=config.data.representation)

    # Evaluators: on the current params, at the start, every eval.every_steps and at the end;
    # each result is also appended to workdir/eval_history.jsonl (curves over a run).
    def evaluate(at_step: int, report_dir: Path | None = None) -> dict:
        logging.info("evaluating at step %d", at_step)
        current = {**params, **s.frozen, **state.params}
        if "image_tower" in objective.trainable:  # the event tower starts as its copy
            current["event_tower"] = current["image_tower"]
        metrics = runner.run_evaluators(config, towers, current, tokenizer, data_dir, mesh,
                                        where=str(init_dir), report_dir=report_dir)
        writer.write_scalars(at_step, metrics)
        if jax.process_index() == 0:
            with (workdir / EVAL_HISTORY).open("a") as f:
                f.write(json.dumps({"step": at_step, **metrics}) + "\n")
        return metrics

    writer = metric_writers.create_default_writer(
        str(workdir / "tensorboard"), just_logging=jax.process_index() > 0)
    writer.write_hparams({k: v for k, v in config_base.flatten(config).items()
                          if isinstance(v, int | float | str | bool)})
    log_order = config.debug.log_data_order
    order_log = ((workdir / "data_order.jsonl").open("a", buffering=1)  # a line per step
                 if log_order and jax.process_index() == 0 else None)

    # The loop. Metrics are read one step late, so the host never waits on the step it queued.
    last_saved = mngr.latest_step()
    pending = None
    t0, samples, at = time.time(), 0, start

    def finite(metrics, at_step) -> dict[str, float]:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(values["loss"]):
            good = Path(mngr.directory) / str(last_saved) if last_saved is not None else "none"
            raise NonFiniteLossError(
                f"non-finite loss {values['loss']} at step {at_step}; stopped without saving. "
                f"Last good checkpoint: {good}")
        return values

    if start == 0 and config.eval.every_steps:
        evaluate(0)
    with Preemption() as preempt, trace, jax.set_mesh(mesh):
        batches = pipeline.global_batches(
            ds, mesh, tower_inputs=False, stall_timeout_s=config.data.stall_timeout_s,
            interrupted=lambda: preempt.requested,
            source=f"{data_dir} (split {config.data.train_split})")
        while at < total_steps and not preempt.requested:
            trace.before_step(at)
            batch = next(batches, None)
            if batch is None:  # SIGTERM while waiting for input
                break
            if log_order:  # the global batch's labels, gathered from every process
                labels = multihost_utils.process_allgather(batch["labels"], tiled=True)
                if order_log is not None:
                    order_log.write(json.dumps({"step": at, "labels": labels.tolist()}) + "\n")
            state, metrics = s.step_fn(state, s.frozen, s.classes, batch)
            if pending is not None:
                history = finite(*pending)
            at += 1
            samples += config.batch_size
            pending = (metrics, at)
            trace.after_step(at, state)
            if at % config.log_every_steps == 0 or at == total_steps:
                history = finite(metrics, at)
                rate = samples / (time.time() - t0)
                history["samples_per_sec_per_device"] = rate / jax.device_count()
                writer.write_scalars(at, history)
                logging.info("step %d/%d  loss %.4f  %s  %.1f samples/s/device  ETA %s",
                             at, total_steps, history["loss"],
                             " ".join(f"{k} {history[k]:.4f}" for k in sorted(history)
                                      if k.startswith("loss_")),
                             history["samples_per_sec_per_device"],
                             _hms((total_steps - at) * config.batch_size / max(rate, 1e-9)))
            if mngr.reached_preemption(at):  # several processes: all stop at this step
                preempt.requested = True
            if (at % config.checkpoint.every_steps == 0 or at == total_steps
                    or preempt.requested):
                history = {**history, **finite(metrics, at)}
                checkpoints.save_state(mngr, at, state, history)
                last_saved = at
            if config.eval.every_steps and at % config.eval.every_steps == 0 \
                    and at < total_steps and not preempt.requested:
                evaluate(at)
        if preempt.requested and at != (last_saved or 0):  # stopped while waiting for input
            history = {**history, **finite(*pending)}
            checkpoints.save_state(mngr, at, state, history)
            last_saved = at
    checkpoints.wait_for_saves(mngr)
    if order_log is not None:
        order_log.close()

    # Final evaluation and the summary (not after SIGTERM: the rerun does it).
    eval_metrics = {}
    finished = at >= total_steps and not preempt.requested
    if finished and config.eval.at_end:
        eval_metrics = evaluate(at, report_dir=workdir / "report")
    writer.flush()
    elapsed = time.time() - t0
    summary = {
        "step": at, "total_steps": total_steps, "finished": finished,
        "preempted": preempt.requested, "wall_seconds": round(elapsed, 2),
        "samples_per_sec": round(samples / max(elapsed, 1e-9), 2),
        "devices": jax.device_count(),
        "last_checkpoint": str(Path(mngr.directory) / str(last_saved)),
        "train": history, "eval": eval_metrics,
    }
    write_summary(workdir, summary)
    if preempt.requested:
        logging.warning("stopped at step %d after SIGTERM; checkpoint %s saved", at,
                        summary["last_checkpoint"])
        raise Preempted(summary)
    return summary


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
