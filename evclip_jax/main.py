"""Entry point: ``python -m evclip_jax.main --config configs/x.py --workdir DIR [--mode ...]``.

Modes: ``train`` (the objective of config.objective, resuming from the workdir's latest
checkpoint), ``eval`` (every evaluator in config.eval, video anomaly included, on
``--config.eval.checkpoint`` or the workdir), and ``export`` (the workdir's trained tower as an
HF dir).
Multi-process runs (TPU pods, SLURM GPU clusters, launch/local_multiprocess.sh) join through
``evclip_jax.distributed`` (settings in ``config.distributed``).
"""

from __future__ import annotations

import json
import logging
import os

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
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging.Filter):
    """Drops INFO chatter of Orbax (a line per file per save) from the absl log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("absl").addFilter(_QuietLibraries())
    import jax

    from evclip_jax import distributed

    distributed.initialize(FLAGS.config.distributed)
    logging.info("JAX process %d/%d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    if FLAGS.mode == "train":
        if FLAGS.config.world.enabled:  # teacher, then distillation, in a closed world
            from evclip_jax import closed_world as run
        else:
            from evclip_jax import trainer as run

        summary = run.train_and_evaluate(FLAGS.config, FLAGS.workdir)
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
