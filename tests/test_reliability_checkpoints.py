"""Checkpoints are checked, fall back and fail loudly in one line (issue 11, the unclear cases):
a damaged newest step (truncated file, missing item, another model's shapes, NaN values) is
named and set aside for the previous complete one, NaN weights are refused at conversion and
load naming the key, a full disk during an async save is one line with its cause."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from evclip_jax import checkpoints, convert, step, trainer
from evclip_jax.data.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "configs" / "tiny.py")
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "configs"))
import tiny  # noqa: E402
from hf_fixtures import make_tiny_hf_clip  # noqa: E402

sys.path[:2] = []

TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))


def _state(rows: int = 4, fill: float = 1.0) -> step.TrainState:
    params = {"event_tower": {"w": jnp.full((rows, 3), fill)}, "logit_scale": jnp.float32(2.0)}
    return step.TrainState(jnp.zeros((), jnp.int32), params, TX.init(params))


def _saved(workdir: Path, steps=(1, 2, 3)) -> Path:
    mngr = checkpoints.checkpoint_manager(workdir, keep=10, async_save=True)
    for k in steps:
        checkpoints.save_state(mngr, k, _state(fill=float(k)), {"loss": float(k)})
    checkpoints.wait_for_saves(mngr)
    return workdir / checkpoints.CHECKPOINT_DIR


def _truncate(step_dir: Path) -> str:
    """Cuts every data file of a step's state (TensorStore's OCDBT) in half."""
    for data in [p for p in (step_dir / "state").rglob("*") if p.parent.name == "d"]:
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size // 2)
    return "OUT_OF_RANGE"


def _drop(item: str):
    def damage(step_dir: Path) -> str:
        shutil.rmtree(step_dir / item)
        return item
    return damage


def _other_model(step_dir: Path) -> str:
    other = step_dir.parent.parent / "other"
    mngr = checkpoints.checkpoint_manager(other)
    checkpoints.save_state(mngr, 3, _state(rows=5))
    checkpoints.wait_for_saves(mngr)
    shutil.rmtree(step_dir)
    shutil.copytree(other / checkpoints.CHECKPOINT_DIR / "3", step_dir)
    return "key 'opt_state/1/0/mu/event_tower/w' has shape (5, 3); the config expects (4, 3)"


def _nan(step_dir: Path) -> str:
    other = step_dir.parent.parent / "other"
    mngr = checkpoints.checkpoint_manager(other)
    checkpoints.save_state(mngr, 3, _state(fill=float("nan")))
    checkpoints.wait_for_saves(mngr)
    shutil.rmtree(step_dir)
    shutil.copytree(other / checkpoints.CHECKPOINT_DIR / "3", step_dir)
    return "key 'params/event_tower/w' holds NaN or infinite values"


@pytest.mark.parametrize("damage", [_truncate, _drop("data"), _drop("state"), _other_model,
                                    _nan], ids=["truncated", "no_data", "no_state",
                                                "other_model", "nan"])
def test_damaged_newest_step_falls_back_and_is_kept_aside(tmp_path, caplog, damage):
    ckpt = _saved(tmp_path)
    expected = damage(ckpt / "3")
    damaged = {str(p.relative_to(ckpt / "3")): p.read_bytes()
               for p in (ckpt / "3").rglob("*") if p.is_file()}
    mngr = checkpoints.checkpoint_manager(tmp_path, keep=10)
    state, data = checkpoints.restore_latest(mngr, _state())
    assert data == {"step": 2, "train": {"loss": 2.0}}
    np.testing.assert_array_equal(state.params["event_tower"]["w"], np.full((4, 3), 2.0))
    warning = next(r.getMessage() for r in caplog.records if "unusable" in r.getMessage())
    assert str(ckpt / "3") in warning and expected in warning
    # Nothing lost: the damaged step is kept under another name, out of the manager's way.
    assert {str(p.relative_to(ckpt / "3.damaged")): p.read_bytes()
            for p in (ckpt / "3.damaged").rglob("*") if p.is_file()} == damaged
    assert mngr.latest_step() == 2
    checkpoints.save_state(mngr, 3, state)  # the resumed run writes step 3 again
    checkpoints.wait_for_saves(mngr)
    assert checkpoints.restore_latest(mngr, _state())[1]["step"] == 3


def test_no_step_restores_names_the_newest_and_moves_nothing(tmp_path):
    ckpt = _saved(tmp_path, steps=(1, 2))
    mngr = checkpoints.checkpoint_manager(tmp_path)
    with pytest.raises(convert.CheckpointError) as err:
        checkpoints.restore_latest(mngr, _state(rows=6))
    assert str(ckpt / "2" / "state") in str(err.value) and "(6, 3)" in str(err.value)
    assert sorted(p.name for p in ckpt.iterdir()) == ["1", "2"]


def test_nan_weights_refused_at_conversion_and_load(tmp_path):
    from safetensors.numpy import load_file, save_file

    hf = make_tiny_hf_clip(tmp_path / "hf")
    state = load_file(str(hf / "model.safetensors"))
    key = "vision_model.encoder.layers.1.mlp.fc2.weight"
    state[key][0, 3] = np.nan
    save_file(state, str(hf / "model.safetensors"))
    with pytest.raises(convert.CheckpointError) as err:
        convert.load_hf_clip(hf)
    assert str(hf / "model.safetensors") in str(err.value) and repr(key) in str(err.value)

    config, params = convert.load_hf_clip(make_tiny_hf_clip(tmp_path / "good"))
    norm = params["text_tower"]["text_model"]["final_layer_norm"]
    norm["scale"] = np.full_like(norm["scale"], np.inf)
    convert.save_evclip(params, config, tmp_path / "evclip")
    with pytest.raises(convert.CheckpointError, match="'text_tower/text_model/final_layer_norm/"
                       "scale' holds NaN or infinite values"):
        convert.load_evclip(tmp_path / "evclip")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny run of 8 steps with checkpoints 4 and 8 (in-process)."""
    root = tmp_path_factory.mktemp("ckpt_run")
    c = tiny.get_config()
    s = c.data.synthetic
    make_synthetic_dataset(root / "data", num_classes=s.num_classes, per_class=s.per_class,
                           image_size=c.model.vision.image_size, seed=s.seed,
                           splits=dict(s.splits), num_shards=s.num_shards)
    c.data.dir = str(root / "data")
    c.num_train_steps = 8
    trainer.train_and_evaluate(c, str(root / "run"))
    return root / "run"


def test_trained_model_read_falls_back_past_a_damaged_step(tmp_path, workdir, caplog):
    """--mode eval / export / EventCLIP.from_pretrained read the newest step that reads,
    warning about the newer ones, and refuse NaN weights naming the key."""
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    config, _, _ = checkpoints.load_model(run)
    at_8 = checkpoints.restore_trained(run, config)
    _truncate(run / "checkpoints" / "8")
    at_4 = checkpoints.restore_trained(run, config)
    assert str(run / "checkpoints" / "8" / "state") in caplog.text
    stored = checkpoints.checkpoint_manager(workdir).restore(4)["state"]["params"]
    stored = {k: stored[k] for k in at_4}
    for a, b in zip(jax.tree.leaves(at_4), jax.tree.leaves(stored), strict=True):
        np.testing.assert_array_equal(a, b)  # step 4's values, not step 8's
    assert any(np.abs(a - c).max() > 0 for a, c in zip(jax.tree.leaves(at_4),
                                                      jax.tree.leaves(at_8), strict=True))
    with pytest.raises(convert.CheckpointError, match=r"checkpoints/8/state: cannot be read"):
        checkpoints.restore_trained(run, config, step=8)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["4", "8"]


def test_full_disk_during_async_save_is_one_line(tmp_path, workdir):
    """A save that cannot write (here: a file size limit, EFBIG, as a full disk gives ENOSPC)
    ends the run with one line naming the step dir, the cause and the newest complete step;
    the earlier checkpoints stay."""
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    kept = {p.name: sorted(q.name for q in p.rglob("*")) for p in (run / "checkpoints").iterdir()}
    limit = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
             " resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000));"
             " sys.argv[0] = 'evclip_jax.main'; runpy.run_module('evclip_jax.main', "
             "run_name='__main__')")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", limit, f"--config={TINY}", f"--workdir={run}",
         f"--config.data.dir={workdir.parent / 'data'}", "--config.num_train_steps=16",
         "--allow_config_change"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600)
    assert out.returncode == 1, out.stderr[-4000:]
    lines = [line for line in out.stderr.splitlines() if "Error" in line]
    assert lines == [
        f"CheckpointSaveError: {run / 'checkpoints' / '12'}: saving the checkpoint failed: "
        f"File too large (errno 27). The newest complete checkpoint is "
        f"{run / 'checkpoints' / '8'}"], out.stderr[-4000:]
    assert "Traceback" not in out.stderr
    assert {p.name: sorted(q.name for q in p.rglob("*"))
            for p in (run / "checkpoints").iterdir() if p.name.isdigit()} == kept
    assert json.loads((run / "summary.json").read_text())["step"] == 8
