"""Checkpoints are checked, fall back and fail loudly in one line (issue 11, the unclear cases):
a damaged newest step (truncated file, missing item, another model's shapes, NaN values) is
named and set aside for the previous complete one, NaN weights are refused at conversion and
load naming the key, a full disk during an async save is one line with its cause (through
main: slow)."""

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
    """A workdir as a run of the tiny config leaves it: init/ and checkpoints 4 and 8 of the
    trained params (built directly, without training)."""
    run = tmp_path_factory.mktemp("ckpt_workdir") / "run"
    config = tiny.get_config()
    clip_config = trainer.model_config(config)
    params = jax.device_get(step.make_towers(config, clip_config).init(jax.random.key(0)))
    convert.save_evclip(params, clip_config, run / checkpoints.INIT_DIR)
    mngr = checkpoints.checkpoint_manager(run)
    trained = {"event_tower": params["event_tower"], "logit_scale": params["logit_scale"]}
    for k in (4, 8):
        shifted = jax.tree.map(lambda x, k=k: x + k, trained)
        checkpoints.save_state(mngr, k, {"params": shifted})
    checkpoints.wait_for_saves(mngr)
    return run


def test_trained_model_read_falls_back_past_a_damaged_step(tmp_path, workdir, caplog):
    """--mode eval / export / EventCLIP.from_pretrained read the newest step that reads,
    warning about the newer ones; a step asked for by number is not replaced."""
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    config = checkpoints.load_model_config(run)
    at_8 = checkpoints.restore_trained(run, config)
    _truncate(run / "checkpoints" / "8")
    at_4 = checkpoints.restore_trained(run, config)
    assert str(run / "checkpoints" / "8" / "state") in caplog.text
    for a, c in zip(jax.tree.leaves(at_4), jax.tree.leaves(at_8), strict=True):
        np.testing.assert_allclose(a + 4, c, rtol=0, atol=1e-5)  # step 4's values (+4, +8)
    with pytest.raises(convert.CheckpointError, match=r"checkpoints/8/state: cannot be read"):
        checkpoints.restore_trained(run, config, step=8)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["4", "8"]


def test_trained_model_with_nan_refused_naming_the_key(tmp_path, workdir):
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    mngr = checkpoints.checkpoint_manager(run)
    stored = mngr.restore(8)["state"]
    stored["params"]["logit_scale"] = np.float32(np.nan)
    checkpoints.save_state(mngr, 12, stored)
    checkpoints.wait_for_saves(mngr)
    config = checkpoints.load_model_config(run)
    with pytest.raises(convert.CheckpointError, match=r"checkpoints/12/state: key "
                       r"'logit_scale' holds NaN or infinite values"):
        checkpoints.restore_trained(run, config, step=12)


_FULL_DISK = """
import resource, signal, sys
import jax, jax.numpy as jnp
from evclip_jax import checkpoints
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
mngr = checkpoints.checkpoint_manager(sys.argv[1], async_save=True)
checkpoints.save_state(mngr, 1, {"w": jnp.ones(3)})
checkpoints.wait_for_saves(mngr)
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
big = {"w": jax.random.normal(jax.random.key(0), (300, 300))}
try:
    checkpoints.save_state(mngr, 2, big)
    checkpoints.save_state(mngr, 3, big)
    checkpoints.wait_for_saves(mngr)
except checkpoints.CheckpointSaveError as e:
    print(e)
"""


def test_failed_async_save_is_one_line_with_its_cause(tmp_path):
    """A save that cannot write (a file size limit: EFBIG, as a full disk gives ENOSPC) is
    one line naming the step dir, the cause and the newest complete step, which stays."""
    out = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    ckpt = tmp_path / checkpoints.CHECKPOINT_DIR
    assert out.stdout.splitlines() == [
        f"{ckpt / '2'}: saving the checkpoint failed: File too large (errno 27). The newest "
        f"complete checkpoint is {ckpt / '1'}"], out.stderr[-3000:]
    restored = checkpoints.restore_latest(checkpoints.checkpoint_manager(tmp_path),
                                          {"w": jnp.zeros(3)})
    assert restored[1]["step"] == 1 and np.all(np.asarray(restored[0]["w"]) == 1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
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


@pytest.mark.slow
def test_full_disk_during_a_run_is_one_line(tmp_path, trained):
    """Through main: the failed save ends the run with one line on stderr (no Orbax or
    asyncio tracebacks), exit 1, and the earlier checkpoints stay."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    kept = {p.name: sorted(q.name for q in p.rglob("*")) for p in (run / "checkpoints").iterdir()}
    limit = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
             " resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000));"
             " sys.argv[0] = 'evclip_jax.main'; runpy.run_module('evclip_jax.main', "
             "run_name='__main__')")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", limit, f"--config={TINY}", f"--workdir={run}",
         f"--config.data.dir={trained.parent / 'data'}", "--config.num_train_steps=16",
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
