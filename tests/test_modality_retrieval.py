"""Five-modality retrieval (evaluate/modality_retrieval.py): per-pair metrics, the cross-modality
query of Fig. 3, the user's embedding files, and ``--mode eval`` with the adapter.

References: a NumPy float64 double loop over queries and keys for R@K, mAP@K and MRR, a
hand-made 2-D case whose picks are known, and ``np.linalg.lstsq`` for the adapter of the CLI.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_eval_runner import Model, numpy_split

from evclip_jax import adapter as adapter_lib
from evclip_jax import convert
from evclip_jax.evaluate.modality_retrieval import (
    cross_modality_query,
    evaluate_modalities,
    load_modality,
    modality_retrieval,
    parse_modalities,
)

REPO = Path(__file__).resolve().parents[1]
KS = (1, 5, 10)


def brute_force(q, q_labels, k, k_labels, ks=KS):
    """R@K, mAP@1/5 and MRR by a double loop over queries and keys, in float64."""
    sums = dict.fromkeys([f"R@{n}" for n in ks] + ["mAP@1", "mAP@5", "MRR"], 0.0)
    for i in range(len(q)):
        sims = [float(np.dot(q[i], k[j]) / (np.linalg.norm(q[i]) * np.linalg.norm(k[j])))
                for j in range(len(k))]
        order = sorted(range(len(k)), key=lambda j: (-sims[j], j))  # ties: lower index first
        rel = [k_labels[j] == q_labels[i] for j in order]
        for n in ks:
            sums[f"R@{n}"] += float(any(rel[:n]))
        for n in (1, 5):
            hits, total = 0, 0.0
            for rank in range(min(n, len(rel))):
                if rel[rank]:
                    hits += 1
                    total += hits / (rank + 1)
            sums[f"mAP@{n}"] += total / hits if hits else 0.0
        first = next((rank for rank, r in enumerate(rel) if r), None)
        sums["MRR"] += 0.0 if first is None else 1.0 / (first + 1)
    return {name: value / len(q) for name, value in sums.items()}


def assert_metrics(got, prefix, ref):
    for name, value in ref.items():
        assert got[f"{prefix}/{name}"] == pytest.approx(value, abs=1e-12), (prefix, name)


def test_pair_metrics_equal_a_brute_force_loop():
    rng = np.random.default_rng(0)
    q, q_labels = rng.standard_normal((30, 8)), rng.integers(0, 4, 30)
    keys = {"sound": (rng.standard_normal((40, 8)), rng.integers(0, 5, 40)),  # 4: no query
            "depth": (rng.standard_normal((7, 8)), rng.integers(0, 4, 7))}
    metrics, details = modality_retrieval(q, q_labels, keys, KS, curve_max_k=5)
    for name, (emb, labels) in keys.items():
        assert_metrics(metrics, f"event_to_{name}", brute_force(q, q_labels, emb, labels))
    np.testing.assert_allclose(details["recall_at_k"]["event to sound"]["recall"],
                               [brute_force(q, q_labels, *keys["sound"], ks=(n,))[f"R@{n}"]
                                for n in range(1, 6)])


def test_cross_modality_query_on_a_hand_made_case():
    """Modalities in order image, text, sound; the picks are worked out by hand."""
    keys = {"image": (np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), np.array([0, 1, 1])),
            "text": (np.array([[1.0, 1.0]]), np.array([2])),
            "sound": (np.array([[1.0, 0.0], [-1.0, 0.0]]), np.array([1, 0]))}
    queries = np.array([[1.0, 0.0],    # cos 1 with image 0, image 2 and sound 0: image 0
                        [1.0, 3.0],    # image 1 (0.949) over text (0.894): wrong class
                        [-1.0, 0.1],   # sound 1 (0.995) over image 1 (0.0995)
                        [1.0, 1.2]])   # text (0.996) over image 1 (0.768)
    labels = np.array([0, 2, 0, 2])
    modality, index, best = cross_modality_query(queries, {n: e for n, (e, _) in keys.items()})
    np.testing.assert_array_equal(modality, [0, 0, 2, 1])
    np.testing.assert_array_equal(index, [0, 1, 1, 0])
    np.testing.assert_allclose(best[1], [3 / np.sqrt(10), 4 / np.sqrt(20), 1 / np.sqrt(10)])
    metrics, details = modality_retrieval(queries, labels, keys)
    assert details["modality"] == ["image", "image", "sound", "text"]
    assert metrics["cross/share/image"] == 0.5
    assert metrics["cross/share/text"] == metrics["cross/share/sound"] == 0.25
    assert metrics["cross/top1"] == 0.75


def test_modality_files_match_classes_by_name(tmp_path):
    event_classes = ["cat", "dog"]
    emb = np.arange(12, dtype=np.float32).reshape(4, 3) + 1
    np.savez(tmp_path / "sound.npz", embeddings=emb, labels=np.array([0, 1, 2, 1]),
             class_names=np.array(["dog", "cat", "bird"]))
    got, labels = load_modality(str(tmp_path / "sound.npz"), event_classes)
    np.testing.assert_array_equal(got, emb)
    np.testing.assert_array_equal(labels, [1, 0, -1, 0])  # bird: relevant to no event
    np.save(tmp_path / "depth.npy", emb)
    np.save(tmp_path / "depth_labels.npy", np.array([1, 1, 0, 0]))
    files = parse_modalities([f"sound={tmp_path / 'sound.npz'}",
                              f"depth = {tmp_path / 'depth.npy'}"])
    assert list(files) == ["sound", "depth"]
    np.testing.assert_array_equal(load_modality(files["depth"], event_classes)[1], [1, 1, 0, 0])


def test_bad_modality_entries_are_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((2, 3)))
    with pytest.raises(ValueError, match="config.eval.modalities: 'sound': expected 'name=path'"):
        parse_modalities(["sound"])
    with pytest.raises(ValueError, match="'image' is a key set of our own towers"):
        parse_modalities([f"image={tmp_path / 'x.npy'}"])
    with pytest.raises(ValueError, match="x_labels.npy not found"):
        parse_modalities([f"sound={tmp_path / 'x.npy'}"])
    with pytest.raises(ValueError, match="missing.npz: file not found"):
        parse_modalities([f"sound={tmp_path / 'missing.npz'}"])
    np.savez(tmp_path / "bad.npz", embeddings=np.ones((2, 3)), labels=np.array([0, 5]))
    with pytest.raises(ValueError, match="bad.npz: labels must index the 2 classes"):
        load_modality(str(tmp_path / "bad.npz"), ["a", "b"])
    np.savez(tmp_path / "dim.npz", embeddings=np.ones((2, 3)), labels=np.array([0, 1]))
    with pytest.raises(ValueError, match="dim.npz: embeddings have dim 3; expected 4"):
        evaluate_modalities(np.ones((2, 4)), np.array([0, 1]), None, np.eye(4)[:2],
                            np.arange(2), ["a", "b"], {"sound": str(tmp_path / "dim.npz")})


def test_adapter_maps_queries_and_tower_keys(tmp_path):
    rng = np.random.default_rng(2)
    src = rng.standard_normal((50, 8))
    adapter = adapter_lib.fit_lstsq(src, src @ rng.standard_normal((8, 12)), bias=True)
    events, images, texts = (rng.standard_normal((n, 8)) for n in (20, 20, 3))
    labels = rng.integers(0, 3, 20)
    sound, sound_labels = rng.standard_normal((15, 12)), rng.integers(0, 3, 15)
    np.savez(tmp_path / "sound.npz", embeddings=sound, labels=sound_labels)
    metrics, _ = evaluate_modalities(events, labels, images, texts, np.arange(3),
                                     ["a", "b", "c"], {"sound": str(tmp_path / "sound.npz")},
                                     adapter)
    mapped = adapter(events)
    assert_metrics(metrics, "event_to_image", brute_force(mapped, labels, adapter(images), labels))
    assert_metrics(metrics, "event_to_text", brute_force(mapped, labels, adapter(texts),
                                                         np.arange(3)))
    assert_metrics(metrics, "event_to_sound", brute_force(mapped, labels, sound, sound_labels))


# ----------------------------------------------------------------------------- --mode eval


def lstsq_map(source, target):
    """The adapter's map, solved here: [unit(source), 1] W = target."""
    x = source / np.linalg.norm(source, axis=1, keepdims=True)
    w = np.linalg.lstsq(np.concatenate([x, np.ones((len(x), 1))], 1), target, rcond=None)[0]
    return lambda e: (e / np.linalg.norm(e, axis=1, keepdims=True)) @ w[:-1] + w[-1]


def test_mode_eval_cli_with_modality_files_and_adapter(tmp_path):
    """python -m evclip_jax.main --mode eval on tests/configs/tiny.py: the adapter is fitted
    from the pairs file, written beside the checkpoint, and every pair's metrics equal the
    brute-force loop on the towers' embeddings."""
    from evclip_jax.data.synthetic import make_synthetic_dataset

    data_dir = tmp_path / "data"
    make_synthetic_dataset(data_dir, num_classes=3, per_class=6, image_size=16,
                           splits={"train": 0.5, "test": 0.5})
    manifest = json.loads((data_dir / "test.manifest.json").read_text())
    spec = {"__file__": str(REPO / "tests" / "configs" / "tiny.py")}
    exec(compile((REPO / "tests" / "configs" / "tiny.py").read_text(), spec["__file__"], "exec"),
         spec)
    model = Model(spec["get_config"](), manifest["class_names"])
    ckpt = tmp_path / "evclip"
    convert.save_evclip(model.params, model.towers.config, ckpt)

    test, train = numpy_split(data_dir, "test"), numpy_split(data_dir, "train")
    e = model.vision(model.params["event_tower"], test["events"])
    v = model.vision(model.params["image_tower"], test["images"])
    rng = np.random.default_rng(3)
    # A stand-in for ImageBind: a fixed linear map of our image embeddings into 24 dims.
    source = model.vision(model.params["image_tower"], train["images"])
    to_target = rng.standard_normal((16, 24))
    np.savez(tmp_path / "pairs.npz", source=source, target=source @ to_target)
    sound = np.concatenate([v @ to_target, rng.standard_normal((4, 24))])
    sound_labels = np.concatenate([test["labels"], [0, 1, 2, 0]])
    np.savez(tmp_path / "sound.npz", embeddings=sound, labels=sound_labels)

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "evclip_jax.main", "--mode=eval",
           f"--config={REPO / 'tests' / 'configs' / 'tiny.py'}", f"--workdir={tmp_path / 'wd'}",
           f"--eval_dir={out}", f"--config.eval.checkpoint={ckpt}",
           f"--config.data.dir={data_dir}", "--config.data.eval_split=test",
           "--config.eval.evals=modalities", "--config.eval.batch_size=8",
           f"--config.eval.modalities=('sound={tmp_path / 'sound.npz'}',)",
           f"--config.adapter.pairs={tmp_path / 'pairs.npz'}"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert (ckpt / adapter_lib.ADAPTER_FILE).is_file()

    adapt = lstsq_map(source, source @ to_target)
    labels = test["labels"]
    query = adapt(e)
    keys = {"image": (adapt(v), labels), "text": (adapt(model.text), np.arange(3)),
            "sound": (sound, sound_labels)}
    for name, key in keys.items():
        ref = brute_force(query, labels, *key)
        for metric, value in ref.items():
            assert metrics[f"modalities/event_to_{name}/{metric}"] == pytest.approx(
                value, abs=1e-6), (name, metric)
    picked_labels, picked_modality = [], []
    for i in range(len(query)):  # the best key over every modality, one query at a time
        scored = [(float(np.dot(query[i], k[j]) / np.linalg.norm(query[i]) / np.linalg.norm(k[j])),
                   m, j) for m, (k, _) in enumerate(keys.values()) for j in range(len(k))]
        _, m, j = max(scored, key=lambda s: (s[0], -s[1], -s[2]))
        picked_modality.append(m)
        picked_labels.append(list(keys.values())[m][1][j])
    for m, name in enumerate(keys):
        assert metrics[f"modalities/cross/share/{name}"] == pytest.approx(
            np.mean(np.asarray(picked_modality) == m))
    assert metrics["modalities/cross/top1"] == pytest.approx(
        np.mean(np.asarray(picked_labels) == labels))
    assert "modalities event to sound" in (out / "report.md").read_text()
