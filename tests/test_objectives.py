"""Every objective, and every event representation, through `python -m evclip_jax.main`.

Each run builds the synthetic TFRecords in its representation, trains 3 steps of the tiny
config and checkpoints. What trained is read back from the checkpoint: its params and its
optimizer state hold exactly the objective's trainable towers, and the towers the objective
freezes are bitwise those the run started from (a fresh random init with the same seed).
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from evclip_jax import checkpoints, step, trainer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.py"
STEPS = 3


def _run(workdir: Path, *overrides: str) -> None:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "evclip_jax.main", f"--config={TINY}", f"--workdir={workdir}",
           f"--config.num_train_steps={STEPS}", "--config.checkpoint.every_steps=3",
           "--config.debug.log_data_order=False", *overrides]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]


def _stored_tree(workdir: Path) -> dict:
    """{"params": ..., "opt_state": ...} leaf paths of the last checkpoint's state."""
    state_dir = (workdir / "checkpoints" / str(STEPS) / "state").absolute()
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(state_dir)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    paths = ["/".join(str(getattr(k, "key", k)) for k in p)
             for p, _ in jax.tree_util.tree_flatten_with_path(
                 tree, is_leaf=lambda x: hasattr(x, "shape"))[0]]
    return {"params": [p[len("params/"):] for p in paths if p.startswith("params/")],
            "opt_state": [p for p in paths if p.startswith("opt_state/")]}


def _equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.parametrize("objective, representation, trainable", [
    ("evclip", "evclip", {"event_tower", "log_tau_ct", "logit_scale"}),
    ("ezsr", "eventclip", {"event_tower", "log_tau_ct"}),
    ("eventbind", "eventbind", {"event_tower", "logit_scale"}),
    ("finetune", "evclip", {"event_tower", "logit_scale"}),
    ("clip", "evclip", {"image_tower", "text_tower", "logit_scale"}),
])
def test_objective_trains_only_its_towers(tmp_path, objective, representation, trainable):
    workdir = tmp_path / objective
    _run(workdir, f"--config.objective={objective}",
         f"--config.data.representation={representation}")

    stored = _stored_tree(workdir)
    assert {p.split("/")[0] for p in stored["params"]} == trainable
    towers_in_opt = {t for t in ("image_tower", "event_tower", "text_tower")
                     if any(f"/{t}/" in p for p in stored["opt_state"])}
    assert towers_in_opt == trainable & {"image_tower", "event_tower", "text_tower"}

    # The starting towers: the random init of the tiny config's seed, stored once in init/.
    sys.path.insert(0, str(TINY.parent))
    try:
        import tiny
    finally:
        sys.path.pop(0)
    config = tiny.get_config()
    towers = step.make_towers(config, trainer.model_config(config))
    start = jax.device_get(towers.init(jax.random.key(config.seed)))
    _, final, _ = checkpoints.load_model(workdir)
    for tower in ("image_tower", "text_tower"):
        moved = not _equal(final[tower], start[tower])
        assert moved == (tower in trainable), tower
    if objective == "clip":
        # No event tower was trained: the model's event tower is its trained image tower.
        assert _equal(final["event_tower"], final["image_tower"])
    else:
        assert not _equal(final["event_tower"], start["event_tower"])
