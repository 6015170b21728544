"""Sharded evaluation over 8 fake CPU devices equals the single-device result.

37 samples with a global batch of 16: the last batch is padded and masked; no sample may be
dropped or counted twice and the order must be preserved.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from evclip_jax.evaluate.common import (
    batches_from_arrays,
    collect_labels,
    data_mesh,
    embed_batches,
    embed_dataset,
)
from evclip_jax.evaluate.fewshot import evaluate_fewshot
from evclip_jax.evaluate.retrieval import evaluate_retrieval, recall_curve, retrieval_metrics
from evclip_jax.evaluate.zeroshot import evaluate_zeroshot, zeroshot_metrics

N, BATCH, DIM_IN, DIM = 37, 16, 6, 4


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    # Small integers: every product and sum is exact in float32, so results must be equal
    # bit for bit whatever the sharding. Column 0 carries the sample index (order check).
    events = rng.integers(-3, 4, size=(N, DIM_IN)).astype(np.float32)
    events[:, 0] = np.arange(N)
    images = rng.integers(-3, 4, size=(N, DIM_IN)).astype(np.float32)
    w = rng.integers(-2, 3, size=(DIM_IN, DIM)).astype(np.float32)
    w[:, 0] = 0.0
    w[0, 0] = 1.0  # embedding column 0 = sample index
    labels = rng.integers(0, 5, N)
    return events, images, w, labels


def _linear(w):
    w = jnp.asarray(w)
    return jax.jit(lambda x: x @ w)


def _meshes():
    assert jax.device_count() == 8, "conftest.py should provide 8 fake CPU devices"
    return data_mesh(), data_mesh(jax.devices()[:1])


def test_embed_dataset_sharded_equals_single_device(data):
    events, _, w, labels = data
    mesh8, mesh1 = _meshes()
    fn = _linear(w)
    emb8, lab8 = embed_dataset(fn, batches_from_arrays({"events": events, "labels": labels},
                                                       BATCH), mesh8)
    emb1, lab1 = embed_dataset(fn, batches_from_arrays({"events": events, "labels": labels},
                                                       BATCH), mesh1)
    assert emb8.shape == (N, DIM) and lab8.shape == (N,)
    np.testing.assert_array_equal(emb8, emb1)
    np.testing.assert_array_equal(lab8, lab1)
    np.testing.assert_array_equal(emb8, events.astype(np.float64) @ w)  # exact, in order
    np.testing.assert_array_equal(emb8[:, 0], np.arange(N))  # none dropped or duplicated
    np.testing.assert_array_equal(lab8, labels)


def test_unpadded_and_odd_batches_are_padded_internally(data):
    events, _, w, labels = data
    mesh8, _ = _meshes()
    fn, want = _linear(w), events @ w
    # Last batch of 5 rows without a mask, and a global batch of 12 (not a multiple of 8).
    for size in (16, 12):
        batches = [{"events": events[i:i + size], "labels": labels[i:i + size]}
                   for i in range(0, N, size)]
        emb, lab = embed_dataset(fn, batches, mesh8)
        np.testing.assert_array_equal(emb, want)
        np.testing.assert_array_equal(lab, labels)
    # Masked rows in the middle of a batch are dropped too.
    mask = np.ones(N, bool)
    mask[[3, 20]] = False
    emb, lab = embed_dataset(fn, batches_from_arrays(
        {"events": events, "labels": labels, "mask": mask}, BATCH), mesh8)
    np.testing.assert_array_equal(emb, want[mask])
    np.testing.assert_array_equal(collect_labels(batches_from_arrays(
        {"events": events, "labels": labels, "mask": mask}, BATCH)), labels[mask])


def test_presharded_jax_arrays(data):
    events, _, w, labels = data
    mesh8, _ = _meshes()
    sharding = NamedSharding(mesh8, PartitionSpec("batch"))
    batches = [{k: jax.device_put(v, sharding) for k, v in b.items()}
               for b in batches_from_arrays({"events": events,
                                             "labels": labels.astype(np.int32)}, BATCH)]
    assert len(batches[0]["events"].sharding.device_set) == 8
    emb, lab = embed_dataset(_linear(w), batches, mesh8)
    np.testing.assert_array_equal(emb, events @ w)
    np.testing.assert_array_equal(lab, labels)


def test_random_float_data_matches_single_device():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(N, 8)).astype(np.float32)
    w = rng.normal(size=(8, 5)).astype(np.float32)
    labels = rng.integers(0, 3, N)
    mesh8, mesh1 = _meshes()
    out = [embed_dataset(_linear(w), batches_from_arrays({"events": x, "labels": labels},
                                                         BATCH), m)[0] for m in (mesh8, mesh1)]
    np.testing.assert_allclose(out[0], out[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[0], x.astype(np.float64) @ w, rtol=1e-5, atol=1e-5)


def test_zeroshot_and_retrieval_sharded_equal_single_device(data):
    events, images, w, labels = data
    mesh8, mesh1 = _meshes()
    text = np.random.default_rng(2).normal(size=(5, DIM))
    arrays = {"events": events, "images": images, "labels": labels}
    zs = [evaluate_zeroshot(_linear(w), batches_from_arrays(arrays, BATCH), text, mesh=m)
          for m in (mesh8, mesh1)]
    assert zs[0] == zs[1]
    assert zs[0] == zeroshot_metrics(events @ w, labels, text)
    assert zs[0]["num_samples"] == N
    rt = [evaluate_retrieval(_linear(w), batches_from_arrays(arrays, BATCH), _linear(w * 2),
                             text, mesh=m) for m in (mesh8, mesh1)]
    assert rt[0] == rt[1]
    _, curves = evaluate_retrieval(_linear(w), batches_from_arrays(arrays, BATCH),
                                   _linear(w * 2), text, mesh=mesh8, return_details=True)
    assert set(curves) == {"event_to_image", "image_to_event", "event_to_text",
                           "text_to_event"}
    np.testing.assert_array_equal(
        curves["text_to_event"]["recall"],
        recall_curve(text, np.arange(5), events @ w, labels)[1])
    assert {k[len("event_to_image/"):]: v for k, v in rt[0].items()
            if k.startswith("event_to_image/")} == retrieval_metrics(
        events @ w, labels, images @ (w * 2), labels)


def test_fewshot_and_multi_field_embedding(data):
    events, images, w, labels = data
    mesh8, mesh1 = _meshes()
    arrays = {"events": events, "images": images, "labels": labels}
    embs, lab = embed_batches({"events": _linear(w), "images": _linear(-w)},
                              batches_from_arrays(arrays, BATCH), mesh8)
    np.testing.assert_array_equal(embs["events"], events @ w)
    np.testing.assert_array_equal(embs["images"], images @ -w)
    np.testing.assert_array_equal(lab, labels)
    fs = [evaluate_fewshot(_linear(w), list(batches_from_arrays(arrays, BATCH)), (1, 2),
                           (0, 1), mesh=m) for m in (mesh8, mesh1)]
    assert fs[0] == fs[1]


def test_params_passed_as_argument(data):
    events, images, w, labels = data
    mesh8, mesh1 = _meshes()
    arrays = {"events": events, "images": images, "labels": labels}
    traces = []

    def apply(params, x):
        traces.append(x.shape)
        return x @ params["w"]

    replicated = jax.device_put({"w": jnp.asarray(w)}, NamedSharding(mesh8, PartitionSpec()))
    for params in (replicated, {"w": jnp.asarray(w)}):
        emb, lab = embed_dataset(apply, batches_from_arrays(arrays, BATCH), mesh8,
                                 params=params)
        np.testing.assert_array_equal(emb, events @ w)
        np.testing.assert_array_equal(lab, labels)
    assert traces[0] == (BATCH, DIM_IN)  # traced on the global batch
    zs = [evaluate_zeroshot(apply, batches_from_arrays(arrays, BATCH), np.eye(DIM)[:3],
                            eval_classes=[0, 1, 2], mesh=m, params=replicated if m is mesh8
                            else {"w": jnp.asarray(w)}) for m in (mesh8, mesh1)]
    assert zs[0] == zs[1]
    rt = evaluate_retrieval(apply, batches_from_arrays(arrays, BATCH), apply, mesh=mesh8,
                            event_params=replicated, image_params={"w": jnp.asarray(-w)})
    assert rt["event_to_image/MRR"] == retrieval_metrics(
        events @ w, labels, images @ -w, labels)["MRR"]


def test_bad_batches_raise(data):
    events, _, w, labels = data
    mesh8, _ = _meshes()
    with pytest.raises(ValueError, match="no field 'labels'"):
        embed_dataset(_linear(w), [{"events": events[:8]}], mesh8)
    with pytest.raises(ValueError, match="only the last batch"):
        embed_dataset(_linear(w), [{"events": events[:8], "labels": labels[:8]},
                                   {"events": events[:16], "labels": labels[:16]}], mesh8)
    with pytest.raises(ValueError, match="empty"):
        embed_dataset(_linear(w), [], mesh8)
