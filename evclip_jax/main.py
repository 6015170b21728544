"""Entry point: ``python -m evclip_jax.main --config configs/x.py --workdir DIR [--mode ...]``.

Modes: ``train`` (the objective of config.objective, resuming from the workdir's latest
checkpoint), ``eval`` (every evaluator in config.eval, video anomaly included, on
``--config.eval.checkpoint`` or the workdir), and ``export`` (the workdir's trained tower as an
HF dir).
Multi-process runs (TPU pods, SLURM GPU clusters, launch/local_multiprocess.sh) join through
``evclip_jax.distributed`` (settings in ``config.distributed``).

Exit codes: 0 done (a finished run that is started again says so and keeps its summary);
75 (``PREEMPTED_EXIT_CODE``, EX_TEMPFAIL) preempted by SIGTERM after its checkpoint was saved:
run the same command again to resume; 1 an error (a run-stopping condition such as a locked
workdir, a changed config on resume, stalled input or a failed save is one line on stderr).
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "export"], "What to run.")
flags.DEFINE_string("export_dir", None, "--mode export: output dir (default workdir/export).")
flags.DEFINE_string("eval_dir", None, "--mode eval: report dir (default workdir/eval).")
flags.DEFINE_enum("export_tower", "event", ["event", "image", "clip"],
                  "--mode export: which tower to write.")
flags.DEFINE_bool("allow_config_change", False,
                  "--mode train: resume even though the config changes a field that alters the "
                  "run (data, model, loss, optimizer, schedule); without it such a resume is "
                  "refused, listing the fields.")
flags.mark_flags_as_required(["config", "workdir"])


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: try again (schedulers requeue on a non-zero exit)


class _QuietLibraries(logging.Filter):
    """Drops INFO chatter of Orbax (a line per file per save) and the echoes of a failed
    async save: Orbax's ERROR records with its writer threads' tracebacks and asyncio's
    "exception was never retrieved" for the same error. Orbax raises that error to its
    caller, and checkpoints.py reports it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "asyncio":
            return "exception was never retrieved" not in record.getMessage()
        return record.levelno == logging.WARNING or "/orbax/" not in record.pathname


def _quiet_closed_loop_callbacks() -> None:
    """After a failed async save, TensorStore's writer threads call back into Orbax's closed
    event loop; each raises "Event loop is closed" as an unraisable exception with a
    traceback. The save's error itself is reported once (checkpoints.CheckpointSaveError)."""
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    sys.unraisablehook = hook


def _config_file() -> str:
    """The --config file, checked to exist before anything reads the config (without the
    ``:arg`` of ``--config configs/demo.py:arg``)."""
    path = config_flags.get_config_filename(FLAGS["config"]).split(":", 1)[0]
    if not os.path.isfile(path):
        raise app.UsageError(f"--config: {path} does not exist; expected an experiment config "
                             "file such as configs/demo.py")
    return path


def _run_stopping_errors() -> tuple[type[Exception], ...]:
    """Conditions that end a run and say all in their message: reported in one line."""
    from evclip_jax import checkpoints, convert, run_guard
    from evclip_jax.data import pipeline

    return (run_guard.WorkdirLockedError, run_guard.ConfigChangedError,
            checkpoints.CheckpointSaveError, convert.CheckpointError,
            pipeline.InputStallError, pipeline.BadRecordError, FileNotFoundError)


def _check_dirs() -> None:
    """Output dirs are local or mounted paths: a URL would become a local dir named "gs:"."""
    for name in ("workdir", "export_dir", "eval_dir"):
        value = FLAGS[name].value
        if value and "://" in value:
            raise app.UsageError(
                f"--{name}={value}: expected a path; mount the bucket (on a Cloud TPU VM "
                "launch/tpu_vm.sh mounts gs://BUCKET at /gcs/BUCKET) and give the mounted path")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _check_dirs()
    logging.getLogger("absl").addFilter(_QuietLibraries())
    logging.getLogger("asyncio").addFilter(_QuietLibraries())
    _quiet_closed_loop_callbacks()
    _config_file()
    import jax

    from evclip_jax import distributed

    distributed.initialize(FLAGS.config.distributed)
    logging.info("JAX process %d/%d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    try:
        _run_mode()
    except _run_stopping_errors() as e:
        distributed.exit_now(f"{type(e).__name__}: {e}")


def _run_mode() -> None:
    import jax

    if FLAGS.mode == "train":
        from evclip_jax import trainer

        if FLAGS.config.world.enabled:  # teacher, then distillation, in a closed world
            from evclip_jax import closed_world as run

            if FLAGS.allow_config_change:
                raise app.UsageError("--allow_config_change: not for closed-world runs")
            options = {}
        else:
            run, options = trainer, {"allow_config_change": FLAGS.allow_config_change}
        try:
            summary = run.train_and_evaluate(FLAGS.config, FLAGS.workdir, **options)
        except trainer.Preempted as stop:
            logging.warning("%s; exiting with code %d: run the same command again to resume",
                            stop, PREEMPTED_EXIT_CODE)
            sys.exit(PREEMPTED_EXIT_CODE)
        if jax.process_index() == 0:
            print(run.format_summary(summary))
    elif FLAGS.mode == "eval":
        from evclip_jax.evaluate import runner

        metrics = runner.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.eval_dir)
        if jax.process_index() == 0:
            print(runner.format_metrics(metrics))
            print(json.dumps(metrics, indent=2))
    else:
        from evclip_jax.api import EventCLIP

        out = FLAGS.export_dir or os.path.join(FLAGS.workdir, "export", FLAGS.export_tower)
        EventCLIP.from_pretrained(FLAGS.workdir).save_pretrained_hf(
            out, tower=FLAGS.export_tower, overwrite=True)
        print(f"exported the {FLAGS.export_tower} tower of {FLAGS.workdir} to {out}")


if __name__ == "__main__":
    app.run(main)
