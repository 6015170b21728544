"""The evaluation runner: the trainer's evaluations, --mode eval (CLI included) and video anomaly
AUC.

References are computed here: the eval split embedded in one unsharded call through the same
towers, zero-shot top-1 by argmax, retrieval R@1 by a brute-force loop, a ridge probe solved
by least squares, and scikit-learn's ROC AUC.
"""

import functools
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from evclip_jax import convert, embed, sharding, step, text, trainer
from evclip_jax.api import EventCLIP
from evclip_jax.evaluate import runner
from evclip_jax.evaluate.common import data_mesh
from evclip_jax.evaluate.fewshot import sample_support
from evclip_jax.evaluate.finetune import make_finetune_fn
from evclip_jax.evaluate.video_anomaly import evaluate_video_anomaly
from evclip_jax.events.synthesis import video_to_event_frames

REPO = Path(__file__).resolve().parents[1]
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 2, "image_size": 16, "patch_size": 8, "projection_dim": 16}
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "vocab_size": 64, "max_position_embeddings": 8,
        "eos_token_id": 63, "projection_dim": 16}
SPLITS = {"train": 0.5, "test": 0.5}  # 3 train and 3 test samples per class


def tiny_config(data_dir=""):
    """configs/demo.py with the model shrunk to 16 px images and 8 px patches."""
    spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    c = demo.get_config()
    c.world.enabled = False  # a plain run on the shrunk synthetic set, one eval view
    c.eval.views = {}
    c.eval.every_steps = 0
    c.model.vision.update(VISION)
    c.model.text.update(TEXT)
    c.data.dir = str(data_dir)
    c.data.synthetic.update(num_classes=3, per_class=6, splits=SPLITS, num_shards=1)
    c.eval.batch_size = 8
    c.eval.evals = "zeroshot,retrieval,fewshot"
    c.eval.fewshot_shots = (1, 2)
    c.eval.fewshot_seeds = 2
    return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from evclip_jax.data.synthetic import make_synthetic_dataset

    d = tmp_path_factory.mktemp("evdata")
    make_synthetic_dataset(d, num_classes=3, per_class=6, image_size=16, splits=SPLITS)
    return d


class Model:
    """A tiny random CLIP (event tower perturbed away from the image tower)."""

    def __init__(self, config, class_names):
        self.towers = step.make_towers(config, trainer.model_config(config))
        params = jax.device_get(jax.jit(self.towers.init)(jax.random.key(0)))
        rng = np.random.default_rng(1)
        params["event_tower"] = jax.tree.map(
            lambda x: (x + 0.05 * rng.standard_normal(x.shape)).astype(np.float32),
            params["event_tower"])
        self.params = params
        self.class_names = list(class_names)
        ids = text.token_ids(text.class_prompts(config.data.prompt, class_names),
                             self.towers.config.text)
        self.text = np.asarray(embed.class_text_embeddings(self.towers.text,
                                                           params["text_tower"], ids))
        self._apply = jax.jit(functools.partial(embed.embed_vision, self.towers.vision))

    def vision(self, params, x) -> np.ndarray:
        return np.asarray(self._apply(params, x), np.float64)


@pytest.fixture(scope="module")
def model(data_dir):
    manifest = json.loads((data_dir / "test.manifest.json").read_text())
    return Model(tiny_config(data_dir), manifest["class_names"])


def numpy_split(data_dir, split):
    """All unmasked rows of a split's eval-mode batches (the towers' inputs), as NumPy."""
    from evclip_jax.data import device_prep, pipeline

    ds = pipeline.make_dataset(data_dir, split, global_batch_size=8, out_size=16, train=False,
                               seed=0)
    batches = [{k: np.asarray(v) for k, v in device_prep.tower_inputs(b).items()}
               for b in ds.as_numpy_iterator()]
    out = {k: np.concatenate([b[k] for b in batches]) for k in ("events", "images", "labels")}
    mask = np.concatenate([b["mask"] for b in batches])
    return {k: v[mask] for k, v in out.items()}


@pytest.fixture(scope="module")
def splits(data_dir):
    return {s: numpy_split(data_dir, s) for s in ("train", "test")}


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def ridge_top1(support_x, support_y, query_x, query_y, reg=1e-2):
    """Ridge regression onto one-hot targets with a free bias, by least squares."""
    classes = np.unique(support_y)
    x, q = unit(support_x), unit(query_x)
    y = (support_y[:, None] == classes[None]).astype(np.float64)
    xm, ym = x.mean(0), y.mean(0)
    a = np.concatenate([x - xm, math.sqrt(reg) * np.eye(x.shape[1])])
    b = np.concatenate([y - ym, np.zeros((x.shape[1], classes.size))])
    w = np.linalg.lstsq(a, b, rcond=None)[0]
    return np.mean(classes[np.argmax(q @ w + (ym - xm @ w), axis=1)] == query_y)


def run(config, model, mesh, params=None, **kwargs):
    return runner.run_evaluators(config, model.towers, params or model.params, None,
                                 config.data.dir, mesh, where="the test model", **kwargs)


# ----------------------------------------------------------------------------- in training


def test_run_evaluators_matches_reference_on_8_and_1_devices(data_dir, model, splits,
                                                             tmp_path):
    config = tiny_config(data_dir)
    mesh8 = sharding.make_mesh()  # the trainer's (data, fsdp, tensor) mesh
    assert mesh8.devices.size == 8
    mesh1 = sharding.make_mesh(devices=jax.devices()[:1])
    placed = step.place_params({k: model.params[k] for k in ("event_tower", "image_tower")},
                               model.towers, mesh8, sharding.DEFAULT_RULES)
    with jax.set_mesh(mesh8):  # as the trainer's periodic evals run: params already placed
        m8 = run(config, model, mesh8, {**model.params, **placed},
                 report_dir=tmp_path / "report")
    m1 = run(config, model, mesh1)
    assert m8.keys() == m1.keys()
    for key in m8:
        assert m8[key] == pytest.approx(m1[key], abs=1e-9), key

    test, tr = splits["test"], splits["train"]
    e = model.vision(model.params["event_tower"], test["events"])
    v = model.vision(model.params["image_tower"], test["images"])
    labels = test["labels"]
    assert m8["zeroshot/num_samples"] == labels.size == 9
    top1 = np.mean(np.argmax(unit(e) @ unit(model.text).T, axis=1) == labels)
    assert m8["zeroshot/top1"] == pytest.approx(top1)
    hits = []
    for i in range(len(e)):  # brute force: the most similar image of each event
        sims = [float(unit(e[i]) @ unit(v[j])) for j in range(len(v))]
        hits.append(labels[int(np.argmax(sims))] == labels[i])
    assert m8["retrieval/event_to_image/R@1"] == pytest.approx(np.mean(hits))

    # Few-shot support comes from the train split (disjoint files), queries are the test split.
    train_emb = model.vision(model.params["event_tower"], tr["events"])
    for shots in (1, 2):
        accs = [ridge_top1(train_emb[s], tr["labels"][s], e, labels)
                for s in (sample_support(tr["labels"], shots, seed) for seed in (0, 1))]
        assert m8[f"fewshot/{shots}shot/top1"] == pytest.approx(np.mean(accs))
        assert m8[f"fewshot/{shots}shot/top1_std"] == pytest.approx(np.std(accs))

    report = (tmp_path / "report" / "report.md").read_text()
    pngs = re.findall(r"\]\(([^)]+\.png)\)", report)
    assert any(p.startswith("confusion_matrix") for p in pngs)
    assert any(p.startswith("fewshot") for p in pngs)
    assert all((tmp_path / "report" / p).is_file() for p in pngs)
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["zeroshot/top1"] == pytest.approx(m8["zeroshot/top1"])


def test_heldout_classes_rank_against_and_knn(data_dir, model, splits):
    config = tiny_config(data_dir)
    config.eval.evals = "zeroshot,retrieval"
    config.eval.heldout_classes = "1-2"
    config.eval.rank_against = "heldout"
    config.eval.knn_k = 2
    m = run(config, model, sharding.make_mesh(devices=jax.devices()[:1]))

    test = splits["test"]
    e = unit(model.vision(model.params["event_tower"], test["events"]))
    v = unit(model.vision(model.params["image_tower"], test["images"]))
    # EZSR k-NN translation, k=2, softmax(sim / 0.01) weights over the split's images.
    translated = []
    for row in e:
        sims = v @ row
        nearest = np.argsort(-sims, kind="stable")[:2]
        w = np.exp((sims[nearest] - sims[nearest].max()) / 0.01)
        translated.append((w / w.sum()) @ v[nearest])
    translated = unit(np.asarray(translated))
    keep = np.isin(test["labels"], [1, 2])
    pred = np.array([1, 2])[np.argmax(translated[keep] @ unit(model.text[[1, 2]]).T, axis=1)]
    assert m["zeroshot/num_samples"] == keep.sum()
    assert m["zeroshot/top1"] == pytest.approx(np.mean(pred == test["labels"][keep]))
    # Ranking event->text against the same two prompts is the same decision as zero-shot.
    assert m["retrieval/event_to_text/R@1"] == pytest.approx(m["zeroshot/top1"])


def test_fewshot_support_is_the_train_split(data_dir, model):
    manifests = {s: json.loads((data_dir / f"{s}.manifest.json").read_text())
                 for s in ("train", "test")}
    files = {s: set(m["synthetic"]["event_files"]) for s, m in manifests.items()}
    assert files["train"] and files["test"] and not files["train"] & files["test"]
    config = tiny_config(data_dir)
    config.eval.evals = "fewshot"
    config.eval.fewshot_shots = (4,)  # the train split has 3 per class
    with pytest.raises(ValueError, match="config.data.train_split='train'.*fewer than 4"):
        run(config, model, sharding.make_mesh(devices=jax.devices()[:1]))


def test_finetune_fn_and_fewshot_finetune(data_dir, model, splits):
    config = tiny_config(data_dir)
    tr = splits["train"]
    init = {"event_tower": jax.tree.map(jnp.asarray, model.params["event_tower"]),
            "logit_scale": model.params["logit_scale"]}
    before = jax.tree.map(np.array, init["event_tower"])
    support = sample_support(tr["labels"], 1, 0)  # the support set of the run below
    scale = math.exp(float(model.params["logit_scale"]))

    def ce(scores, y):
        scores = np.asarray(scores, np.float64)
        scores = scores - scores.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(scores).sum(1)) - scores[np.arange(y.size), y]))

    x, y = tr["events"][support], tr["labels"][support]
    fixed = make_finetune_fn(config, model.towers, init, tr, model.text, 0)
    scores0 = np.asarray(fixed(support, shots=1, seed=0)(x))
    ref = scale * unit(model.vision(model.params["event_tower"], x)) @ unit(model.text).T
    np.testing.assert_allclose(scores0, ref, rtol=1e-4, atol=1e-4)

    tuned = make_finetune_fn(config, model.towers, init, tr, model.text, 3)
    scores3 = np.asarray(tuned(support, shots=1, seed=0)(x))
    assert ce(scores3, y) < ce(scores0, y)  # L_pred went down on the support set
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray,
                                                                     init["event_tower"]))

    config.eval.evals = "fewshot_finetune"
    config.eval.fewshot_shots = (1,)
    config.eval.fewshot_seeds = 1
    config.eval.finetune_steps = 3
    m = run(config, model, sharding.make_mesh(devices=jax.devices()[:1]))
    assert set(m) == {"fewshot_finetune/1shot/top1", "fewshot_finetune/1shot/top1_std"}
    assert 0.0 <= m["fewshot_finetune/1shot/top1"] <= 1.0


# ----------------------------------------------------------------------------- --mode eval


@pytest.fixture(scope="module")
def evclip_dir(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "evclip"
    convert.save_evclip(model.params, model.towers.config, out)
    return out


def test_evaluate_checkpoint_evclip_dir(data_dir, model, splits, evclip_dir, tmp_path):
    config = tiny_config(data_dir)
    config.eval.checkpoint = str(evclip_dir)
    metrics = runner.evaluate_checkpoint(config, tmp_path)
    test = splits["test"]
    e = model.vision(model.params["event_tower"], test["events"])
    top1 = np.mean(np.argmax(unit(e) @ unit(model.text).T, axis=1) == test["labels"])
    assert metrics["zeroshot/top1"] == pytest.approx(top1)
    assert {"retrieval/image_to_event/MRR", "fewshot/2shot/top1"} <= set(metrics)
    out = tmp_path / "eval"
    assert json.loads((out / "metrics.json").read_text()).keys() == metrics.keys()
    pngs = re.findall(r"\]\(([^)]+\.png)\)", (out / "report.md").read_text())
    assert pngs and all((out / p).is_file() for p in pngs)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_evaluate_checkpoint_errors_name_the_path(data_dir, evclip_dir, tmp_path):
    config = tiny_config(data_dir)
    config.eval.checkpoint = str(tmp_path / "no_such_ckpt")
    with pytest.raises(ValueError, match="no_such_ckpt.*does not exist"):
        runner.evaluate_checkpoint(config, tmp_path)
    config.eval.checkpoint = str(evclip_dir)
    config.data.dir = str(tmp_path / "no_such_data")
    with pytest.raises(ValueError, match="no_such_data.*does not exist"):
        runner.evaluate_checkpoint(config, tmp_path)
    config.data.dir = str(data_dir)
    config.eval.evals = "zeroshot,anomaly"
    with pytest.raises(ValueError, match="config.eval.anomaly_videos"):
        runner.evaluate_checkpoint(config, tmp_path)


@pytest.mark.slow
def test_evaluate_checkpoint_training_workdir(tmp_path):
    """2 training steps of the shrunk demo; --mode eval on the workdir equals the trainer's
    own end-of-training eval (same event tower, same hash-tokenised prompts)."""
    config = tiny_config()
    config.num_train_steps = 2
    config.batch_size = 8
    config.checkpoint.async_save = False
    workdir = tmp_path / "run"
    summary = trainer.train_and_evaluate(config, str(workdir))
    assert summary["eval"]
    metrics = runner.evaluate_checkpoint(config, workdir)
    for key, value in summary["eval"].items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    assert (workdir / "eval" / "report.md").is_file()


# ----------------------------------------------------------------------------- anomaly


def synthetic_video(path, height, width, seed):
    """A bright square drifting slowly; in anomalous stretches it jumps around and grows."""
    rng = np.random.default_rng(seed)
    num_instances, stack = 8, 16
    anomalous = np.zeros(num_instances, bool)
    anomalous[[2, 3, 6]] = True
    frames = np.full((num_instances * stack + 1, height, width), 40, np.uint8)
    labels = np.zeros(frames.shape[0], np.int64)
    y, x = height // 3, width // 3
    for t in range(1, frames.shape[0]):
        fast = anomalous[(t - 1) // stack]
        labels[t] = int(fast)
        step = 3 if fast else 1
        y = int(np.clip(y + rng.integers(-step, step + 1), 0, height - 5))
        x = int(np.clip(x + rng.integers(-step, step + 1), 0, width - 5))
        side = 5 if fast else 3
        frames[t, y:y + side, x:x + side] = 220
    labels[0] = 0
    event_frames, instance_labels = video_to_event_frames(frames, labels, threshold=25, stack=16)
    np.savez(path, event_frames=event_frames, instance_labels=instance_labels)
    return event_frames, instance_labels


def test_video_anomaly_auc_matches_sklearn(model, tmp_path):
    small, small_labels = synthetic_video(tmp_path / "small_frames.npz", 16, 16, 0)
    _, big_labels = synthetic_video(tmp_path / "big_frames.npz", 24, 40, 1)
    assert set(small_labels) == set(big_labels) == {0, 1}
    clip = EventCLIP(model.towers.config, jax.tree.map(jnp.asarray, model.params))
    normal, abnormal = ["a calm street"], ["a fight", "a car crash"]
    ids = text.token_ids(normal + abnormal, model.towers.config.text)
    prompts = np.asarray(embed.class_text_embeddings(model.towers.text,
                                                     model.params["text_tower"], ids))
    metrics, plots = evaluate_video_anomaly(
        model.towers, model.params["event_tower"], prompts[:1], prompts[1:],
        float(model.params["logit_scale"]),
        {"small": [str(tmp_path / "small_frames.npz")],
         "big": [str(tmp_path / "big_frames.npz")]}, batch_size=8, mesh=data_mesh())

    # Reference: Eq. 1 frames (already at the tower's 16 px) -> event tower -> softmax.
    frames = small / (small.max(axis=(1, 2), keepdims=True) + 1)
    e = unit(clip.encode_events(frames))
    t = unit(clip.encode_text(ids))
    logits = math.exp(float(model.params["logit_scale"])) * e @ t.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    scores = p[:, 1:].sum(1) / p.sum(1)
    np.testing.assert_allclose(plots["roc"]["anomaly small"]["scores"], scores, atol=1e-5)
    assert metrics["anomaly/small/auc"] == pytest.approx(roc_auc_score(small_labels, scores))
    big = plots["roc"]["anomaly big"]
    assert metrics["anomaly/big/num_instances"] == big_labels.size == 8
    assert metrics["anomaly/big/auc"] == pytest.approx(
        roc_auc_score(big["labels"], big["scores"]))
    np.testing.assert_array_equal(big["labels"], big_labels)


# ----------------------------------------------------------------------------- the CLI


def test_mode_eval_cli_writes_metrics_and_report(data_dir, evclip_dir, model, tmp_path):
    """python -m evclip_jax.main --mode eval runs every evaluator, anomaly included, from
    config fields."""
    synthetic_video(tmp_path / "clip_frames.npz", 16, 16, 2)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "evclip_jax.main", "--mode=eval",
           f"--config={REPO / 'tests' / 'configs' / 'tiny.py'}", f"--workdir={tmp_path / 'wd'}",
           f"--eval_dir={out}", f"--config.eval.checkpoint={evclip_dir}",
           f"--config.data.dir={data_dir}", "--config.data.eval_split=test",
           "--config.eval.evals=zeroshot,retrieval,fewshot,anomaly",
           "--config.eval.fewshot_shots=(1, 2)", "--config.eval.fewshot_seeds=1",
           "--config.eval.batch_size=8",
           f"--config.eval.anomaly_videos=('{tmp_path / 'clip_frames.npz'}',)"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"zeroshot/top1", "retrieval/event_to_image/R@1", "fewshot/1shot/top1",
            "anomaly/videos/auc"} <= set(metrics)
    assert "zeroshot/top1" in proc.stdout
    pngs = re.findall(r"\]\(([^)]+\.png)\)", (out / "report.md").read_text())
    assert "roc_anomaly_videos.png" in pngs
    assert all((out / p).is_file() for p in pngs)
