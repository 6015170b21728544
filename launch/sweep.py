r"""Runs a config's sweep: one workdir per job, in sequence on this machine, or printed as
commands for a scheduler.

    python launch/sweep.py --config configs/demo.py --workdir_root /tmp/sweep
    python launch/sweep.py --config configs/demo.py --workdir_root /tmp/sweep --print_only
    python launch/sweep.py --config configs/vitb32_nimagenet.py --workdir_root gs://b/sweep \
        --grid 'loss.zs_weight=0.05,0.1,0.2' --grid 'loss.zs_form=zscl,release' --print_only

Jobs come from the config file's ``get_sweep()`` ([(name, {field: value})]) or from --grid.
Closed-world jobs (config.world.enabled) share <root>/world and <root>/teacher, and their
results are gathered into <root>/report.md (a table and the unseen-class zero-shot curves,
mean and spread over seeds). A job whose workdir already holds a summary is not run again.
Each printed line is a complete `python -m evclip_jax.main` command: pipe them into a SLURM
array or a TPU launcher.
"""

import importlib.util
import itertools
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Config file (with get_sweep(), or use --grid).",
                    required=True)
flags.DEFINE_string("workdir_root", None, "One sub-dir per job is made under it.",
                    required=True)
flags.DEFINE_multi_string("grid", [], "key=v1,v2,... (config field and its values).")
flags.DEFINE_bool("print_only", False, "Print the commands instead of running them.")


def grid_jobs(grid: list[str]) -> list[tuple[str, dict[str, str]]]:
    axes = []
    for item in grid:
        key, _, values = item.partition("=")
        if not values:
            raise app.UsageError(f"--grid {item!r}: expected key=v1,v2")
        axes.append([(key, v) for v in values.split(",")])
    points = [dict(p) for p in itertools.product(*axes)]
    return [("_".join(f"{k.split('.')[-1]}={v}" for k, v in p.items()) or "base", p)
            for p in points]


def config_module(path: str):
    spec = importlib.util.spec_from_file_location("sweep_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def command(config: str, workdir: str, overrides: dict) -> list[str]:
    return [sys.executable, "-m", "evclip_jax.main", f"--config={config}",
            f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items())]


def main(argv):
    del argv
    module = config_module(FLAGS.config)
    if FLAGS.grid:
        jobs = grid_jobs(FLAGS.grid)
    elif hasattr(module, "get_sweep"):
        jobs = module.get_sweep()
    else:
        raise app.UsageError(f"{FLAGS.config} has no get_sweep(); pass --grid")
    root = FLAGS.workdir_root
    closed_world = module.get_config().world.enabled
    shared = ({"world.dir": f"{root}/world", "world.teacher_dir": f"{root}/teacher"}
              if closed_world else {})
    for name, overrides in jobs:
        workdir = f"{root}/{name}"
        cmd = command(FLAGS.config, workdir, {**shared, **overrides})
        if FLAGS.print_only:
            print(shlex.join(cmd))
            continue
        if os.path.exists(f"{workdir}/summary.json"):
            print(f"{name}: done already ({workdir}/summary.json)", flush=True)
            continue
        print(f"{name}: {shlex.join(cmd)}", flush=True)
        log = Path(workdir) / "sweep.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
                raise SystemExit(f"{name} failed; see {log}")
    if FLAGS.print_only:
        return
    summaries = {name: json.loads(Path(f"{root}/{name}/summary.json").read_text())
                 for name, _ in jobs}
    if closed_world:
        from evclip_jax.closed_world import sweep_report

        print(sweep_report(summaries, Path(root)))
    else:
        (Path(root) / "results.json").write_text(json.dumps(summaries, indent=2))
        print(f"results: {root}/results.json")


if __name__ == "__main__":
    app.run(main)
