"""Prints one training command per point of a sweep; the sweep is data, the config stays one file.

    python launch/sweep.py --config configs/vitb32_nimagenet.py --workdir_root gs://b/sweep \
        --grid 'loss.zs_weight=0.05,0.1,0.2' --grid 'loss.zs_form=zscl,release'

Pipe the lines into your scheduler (e.g. `| xargs -L1 sbatch launch/slurm_gpu.sbatch`-style
wrappers), or run them one by one.
"""

import itertools
import shlex

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Config file.", required=True)
flags.DEFINE_string("workdir_root", None, "One sub-dir per point is made under it.", required=True)
flags.DEFINE_multi_string("grid", [], "key=v1,v2,... (config field and its values).")


def points(grid: list[str]) -> list[dict[str, str]]:
    axes = []
    for item in grid:
        key, _, values = item.partition("=")
        if not values:
            raise app.UsageError(f"--grid {item!r}: expected key=v1,v2")
        axes.append([(key, v) for v in values.split(",")])
    return [dict(p) for p in itertools.product(*axes)]


def main(argv):
    del argv
    for point in points(FLAGS.grid):
        name = "_".join(f"{k.split('.')[-1]}={v}" for k, v in point.items()) or "base"
        args = ["python", "-m", "evclip_jax.main", f"--config={FLAGS.config}",
                f"--workdir={FLAGS.workdir_root}/{name}"]
        args += [f"--config.{k}={v}" for k, v in point.items()]
        print(shlex.join(args))


if __name__ == "__main__":
    app.run(main)
