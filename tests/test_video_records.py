"""Video to records (tools/video_to_events.py --format tfrecords) and their anomaly AUC through
``python -m evclip_jax.main --mode eval`` (config.eval.anomaly_splits).

References: the instance counts of ``synthesis.video_to_event_frames`` on the same frames, the
event tower applied here to those Eq. 1 frames, the softmax anomaly score written out in
NumPy, and scikit-learn's ``roc_auc_score``.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score
from test_eval_runner import Model, numpy_split

from evclip_jax import convert, embed, sharding, text
from evclip_jax.evaluate import runner
from evclip_jax.events.synthesis import video_to_event_frames

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.py"
CLASS_NAMES = ["normal", "anomalous"]


def tiny_config():
    spec = {"__file__": str(TINY)}
    exec(compile(TINY.read_text(), str(TINY), "exec"), spec)
    return spec["get_config"]()


def write_video(folder: Path, seed: int, anomalous: list[int], odd=(5, 3), height=16,
                width=16):
    """A PNG sequence of a 3 px square drifting by up to 1 px per frame; in anomalous
    instances (16 frames each) it has side ``odd[0]`` and moves by up to ``odd[1]`` px.
    Per-frame labels beside it; returns (frames, labels)."""
    rng = np.random.default_rng(seed)
    num_instances, stack = 5, 16
    frames = np.full((num_instances * stack + 1, height, width), 40, np.uint8)
    labels = np.zeros(frames.shape[0], np.int64)
    y, x = height // 3, width // 3
    for t in range(1, frames.shape[0]):
        fast = (t - 1) // stack in anomalous
        labels[t] = int(fast)
        side, step = odd if fast else (3, 1)
        y = int(np.clip(y + rng.integers(-step, step + 1), 0, height - 5))
        x = int(np.clip(x + rng.integers(-step, step + 1), 0, width - 5))
        frames[t, y:y + side, x:x + side] = 220
    folder.mkdir(parents=True)
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{index:03d}.png")
    np.save(folder.parent / f"{folder.name}_labels.npy", labels)
    return frames, labels


@pytest.fixture(scope="module")
def tool(load_tool):
    return load_tool("video_to_events")


@pytest.fixture(scope="module")
def vad(tool, tmp_path_factory):
    """Two videos converted into one event-only split "test"; the reference instances."""
    root = tmp_path_factory.mktemp("vad")
    counts, labels = [], []
    # Two kinds of anomaly (a big fast square, a small one), so the AUC is neither 0 nor 1.
    for name, seed, anomalous, odd in (("cam_a", 0, [1, 3], (5, 3)), ("cam_b", 1, [2], (2, 1))):
        frames, frame_labels = write_video(root / name, seed, anomalous, odd)
        c, lab = video_to_event_frames(frames, frame_labels, threshold=25, stack=16)
        counts.append(c)
        labels.append(lab)
    out = root / "records"
    summaries, manifest = tool.convert_videos(
        [str(root / n / "%03d.png") for n in ("cam_a", "cam_b")], str(out), ["tfrecords"],
        [str(root / f"{n}_labels.npy") for n in ("cam_a", "cam_b")], split="test",
        image_size=16, class_names=CLASS_NAMES, threshold=25, stack=16, fps=10, progress=False)
    return {"out": out, "manifest": manifest, "summaries": summaries,
            "counts": np.concatenate(counts), "labels": np.concatenate(labels), "root": root}


def test_videos_become_event_only_records(vad):
    manifest = vad["manifest"]
    assert manifest["num_examples"] == 10 and manifest["class_names"] == CLASS_NAMES
    assert manifest["has_images"] is False and manifest["representation"] == "evclip"
    assert manifest["class_counts"] == [7, 3]
    assert [s["instances"] for s in vad["summaries"]] == [5, 5]
    split = numpy_split(vad["out"], "test")  # the eval pipeline, records in item order
    np.testing.assert_array_equal(split["labels"], vad["labels"])
    frames = vad["counts"] / (vad["counts"].max(axis=(1, 2), keepdims=True) + 1)  # Eq. 1
    np.testing.assert_allclose(split["events"], np.asarray(embed.events_to_tower_input(frames)),
                               atol=1e-6)


def test_bad_video_inputs_are_refused(tool, vad, tmp_path):
    root = vad["root"]
    with pytest.raises(ValueError, match="needs --labels"):
        tool.convert_videos([str(root / "cam_a" / "%03d.png")], str(tmp_path), ["tfrecords"])
    with pytest.raises(ValueError, match="2 files for 1 videos"):
        tool.convert_videos([str(root / "cam_a" / "%03d.png")], str(tmp_path), ["tfrecords"],
                            [str(root / "cam_a_labels.npy")] * 2)
    with pytest.raises(ValueError, match="named 'cam_a' like"):
        tool.convert_videos([str(root / "cam_a" / "%03d.png")] * 2, str(tmp_path),
                            ["tfrecords"], [str(root / "cam_a_labels.npy")] * 2)
    write_video(tmp_path / "wide", 2, [1], height=16, width=24)
    with pytest.raises(ValueError, match="wide.*24x16.*share one frame size"):
        tool.convert_videos([str(root / "cam_a" / "%03d.png"), str(tmp_path / "wide/%03d.png")],
                            str(tmp_path / "out"), ["tfrecords"],
                            [str(root / "cam_a_labels.npy"), str(tmp_path / "wide_labels.npy")],
                            image_size=16, progress=False)


def test_records_anomaly_auc_through_mode_eval(vad, tmp_path):
    config = tiny_config()
    model = Model(config, CLASS_NAMES)
    ckpt = tmp_path / "evclip"
    convert.save_evclip(model.params, model.towers.config, ckpt)

    # Reference scores: the event tower on the Eq. 1 frames, softmax over the two prompts.
    frames = vad["counts"] / (vad["counts"].max(axis=(1, 2), keepdims=True) + 1)
    e = model.vision(model.params["event_tower"], embed.events_to_tower_input(frames))
    prompts = list(config.eval.normal_prompts) + list(config.eval.abnormal_prompts)
    t = np.asarray(embed.class_text_embeddings(
        model.towers.text, model.params["text_tower"],
        text.token_ids(prompts, model.towers.config.text)), np.float64)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    logits = math.exp(float(model.params["logit_scale"])) * unit(e) @ unit(t).T
    p = np.exp(logits - logits.max(1, keepdims=True))
    scores = p[:, 1:].sum(1) / p.sum(1)
    auc = roc_auc_score(vad["labels"], scores)

    config.data.dir = str(vad["out"])
    config.eval.evals = "anomaly"
    config.eval.anomaly_splits = ("test",)
    config.eval.batch_size = 8
    values, roc = runner._anomaly_on_splits(
        config, model.towers, model.params["event_tower"], t[:1], t[1:],
        float(model.params["logit_scale"]), vad["out"], sharding.make_mesh())
    np.testing.assert_allclose(roc["anomaly test"]["scores"], scores, atol=1e-5)
    assert values["anomaly/test/auc"] == roc_auc_score(roc["anomaly test"]["labels"],
                                                       roc["anomaly test"]["scores"])
    assert values["anomaly/test/auc"] == pytest.approx(auc)
    assert 0.1 < auc < 0.9  # the ranking matters, not only which class scores higher

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "evclip_jax.main", "--mode=eval", f"--config={TINY}",
           f"--workdir={tmp_path / 'wd'}", f"--eval_dir={out}", f"--config.eval.checkpoint={ckpt}",
           f"--config.data.dir={vad['out']}", "--config.eval.evals=anomaly",
           "--config.eval.anomaly_splits=('test',)", "--config.eval.batch_size=8"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["anomaly/test/auc"] == pytest.approx(auc, abs=1e-12)
    assert metrics["anomaly/test/num_instances"] == 10
    assert metrics["anomaly/test/num_anomalous"] == 3
    assert "roc_anomaly_test.png" in (out / "report.md").read_text()
