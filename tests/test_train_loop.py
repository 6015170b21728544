"""The training loop through `python -m evclip_jax.main`: resume, preemption, crashes, bad
configs, non-finite losses, the demo and export."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "configs" / "tiny.py")


def _env(devices: int = 1) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def main_cmd(workdir, *overrides, config=TINY, mode="train"):
    return [sys.executable, "-m", "evclip_jax.main", f"--config={config}",
            f"--workdir={workdir}", f"--mode={mode}", *overrides]


def run(workdir, *overrides, config=TINY, mode="train", check=True, devices=1):
    out = subprocess.run(main_cmd(workdir, *overrides, config=config, mode=mode), cwd=REPO,
                         env=_env(devices), capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The synthetic TFRecords, built once by a 1-step run and shared by the tests."""
    root = tmp_path_factory.mktemp("data")
    run(root / "warmup", f"--config.data.dir={root / 'data'}", "--config.num_train_steps=1")
    return root / "data"


def data_order(workdir: Path) -> dict[int, list[int]]:
    order = {}
    for line in (workdir / "data_order.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert rec["step"] not in order, f"step {rec['step']} consumed twice"
        order[rec["step"]] = rec["labels"]
    return order


def event_params(workdir: Path):
    from evclip_jax import checkpoints

    return checkpoints.load_model(workdir)[1]["event_tower"]


def complete_steps(workdir: Path) -> list[int]:
    ckpt = workdir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() \
        else []


def test_sigterm_then_resume_equals_straight_run(tmp_path, data_dir):
    steps = 60
    common = [f"--config.data.dir={data_dir}", f"--config.num_train_steps={steps}",
              "--config.checkpoint.every_steps=10", "--config.log_every_steps=10"]
    straight = tmp_path / "straight"
    run(straight, *common)

    resumed = tmp_path / "resumed"
    proc = subprocess.Popen(main_cmd(resumed, *common), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not complete_steps(resumed) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-4000:]  # main.PREEMPTED_EXIT_CODE
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["preempted"], "the run finished before SIGTERM arrived"
    stopped_at = summary["step"]
    assert stopped_at in complete_steps(resumed)  # the SIGTERM save
    run(resumed, *common)
    assert json.loads((resumed / "summary.json").read_text())["finished"]

    a, b = data_order(straight), data_order(resumed)
    assert sorted(a) == sorted(b) == list(range(steps))
    assert a == b
    for x, y in zip(jax.tree.leaves(event_params(straight)),
                    jax.tree.leaves(event_params(resumed)), strict=True):
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-6)


def test_kill9_during_async_save_resumes_from_last_complete(tmp_path, data_dir):
    workdir = tmp_path / "run"
    common = [f"--config.data.dir={data_dir}", "--config.num_train_steps=400",
              "--config.checkpoint.every_steps=5", "--config.checkpoint.keep=100",
              "--config.log_every_steps=50", "--config.debug.log_data_order=False"]
    proc = subprocess.Popen(main_cmd(workdir, *common), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = workdir / "checkpoints"
    caught_tmp = False
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        names = [p.name for p in ckpt.iterdir()] if ckpt.is_dir() else []
        if any("tmp" in n for n in names) and len(complete_steps(workdir)) >= 2:
            proc.kill()
            caught_tmp = True
            break
        time.sleep(0.002)
    proc.wait(timeout=60)
    assert caught_tmp, "never saw a save in progress"
    done = complete_steps(workdir)
    assert done, "no complete checkpoint before the kill"
    # Resume: the half-written save is ignored, training continues from the last complete one.
    out = run(workdir, *common[:1], f"--config.num_train_steps={done[-1] + 5}",
              "--config.checkpoint.every_steps=5", "--config.checkpoint.keep=100",
              "--allow_config_change")  # a shorter schedule than the killed run's
    assert f"at step {done[-1]}" in out.stderr
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["finished"] and summary["step"] == done[-1] + 5


def test_bad_configs_are_refused_before_compute(tmp_path, data_dir):
    typo = run(tmp_path / "a", "--config.loss.zs_wieght=1", check=False)
    assert typo.returncode != 0 and "zs_wieght" in typo.stderr

    missing = run(tmp_path / "b", "--config.data.synthetic.enabled=False",
                  f"--config.data.dir={tmp_path / 'nowhere'}", check=False)
    assert missing.returncode != 0 and str(tmp_path / "nowhere") in missing.stderr
    assert not (tmp_path / "b" / "checkpoints").exists()

    bad_eval = run(tmp_path / "e", f"--config.data.dir={data_dir}", "--config.eval.query=imgs",
                   check=False)
    assert bad_eval.returncode != 0 and "config.eval.query='imgs'" in bad_eval.stderr
    assert not (tmp_path / "e" / "checkpoints").exists()

    no_ckpt = run(tmp_path / "c", "--config.model.allow_random_init=False",
                  f"--config.data.dir={data_dir}", check=False)
    assert no_ckpt.returncode != 0 and "config.model.checkpoint" in no_ckpt.stderr

    workdir = tmp_path / "d"
    run(workdir, f"--config.data.dir={data_dir}", "--config.num_train_steps=4")
    mismatch = run(workdir, f"--config.data.dir={data_dir}", "--config.num_train_steps=8",
                   "--config.model.vision.hidden_size=64", check=False)
    assert mismatch.returncode != 0 and "model.vision.hidden_size: 32 -> 64" in mismatch.stderr
    assert complete_steps(workdir) == [4]


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir, monkeypatch):
    import jax.numpy as jnp

    from evclip_jax import losses, trainer

    workdir = tmp_path / "run"
    run(workdir, f"--config.data.dir={data_dir}", "--config.num_train_steps=4")
    assert complete_steps(workdir) == [4]

    sys.path.insert(0, str(REPO / "tests" / "configs"))
    try:
        import tiny
    finally:
        sys.path.pop(0)
    config = tiny.get_config()
    config.data.dir = str(data_dir)
    config.num_train_steps = 12
    monkeypatch.setattr(losses, "loss_kl", lambda *a, **k: jnp.float32(jnp.nan))
    with pytest.raises(trainer.NonFiniteLossError) as err:  # resumed on a longer schedule
        trainer.train_and_evaluate(config, str(workdir), allow_config_change=True)
    message = str(err.value)
    assert "step 5" in message and str(workdir / "checkpoints" / "4") in message
    assert complete_steps(workdir) == [4]


def test_demo_command_and_export(tmp_path):
    """The README's main command (the closed world, shrunk) and --mode export of its
    distillation run."""
    import torch
    from transformers import CLIPVisionModelWithProjection

    from evclip_jax.api import EventCLIP

    root = tmp_path / "demo"
    # The closed world in miniature: a few instances, 4 teacher steps, 6 distillation steps.
    small = ["--config.world.per_class=8", "--config.world.teacher.steps=4",
             "--config.eval.every_steps=3", "--config.eval.batch_size=8"]
    out = run(root, *small, config="configs/demo.py:steps=6")
    assert "| event zero-shot after distillation, unseen classes |" in out.stdout
    summary = json.loads((root / "summary.json").read_text())
    assert summary["unseen_zeroshot_curve"]["steps"] == [0, 3, 6]
    assert 0 <= summary["event_zeroshot_acc_heldout_classes"] <= 1
    assert (root / "teacher" / "hf" / "config.json").is_file()
    workdir = root / "distill"
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["finished"] and np.isfinite(summary["train"]["loss"])
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))

    run(workdir, config="configs/demo.py:steps=6", mode="export")
    hf = CLIPVisionModelWithProjection.from_pretrained(workdir / "export" / "event").eval()
    model = EventCLIP.from_pretrained(workdir)
    frames = np.random.default_rng(0).uniform(0, 1, (2, 32, 32)).astype(np.float32)
    ours = np.asarray(model.encode_events(frames))
    pixel = torch.tensor(np.repeat(((frames - 0.5) * 2)[:, None], 3, axis=1))
    with torch.no_grad():
        ref = hf(pixel_values=pixel).image_embeds.numpy()
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-5
    # The export tool takes the training workdir too.
    tool_out = tmp_path / "tool_export"
    subprocess.run([sys.executable, "tools/export_to_pytorch.py", f"--checkpoint={workdir}",
                    f"--out={tool_out}", "--tower=event"], cwd=REPO, env=_env(), check=True,
                   capture_output=True)
    with torch.no_grad():
        via_tool = CLIPVisionModelWithProjection.from_pretrained(tool_out)(
            pixel_values=pixel).image_embeds.numpy()
    np.testing.assert_array_equal(via_tool, ref)
    # The trained event tower differs from the image tower it started from.
    assert not np.allclose(np.asarray(model.encode_images(pixel.numpy().transpose(0, 2, 3, 1))),
                           ours)
