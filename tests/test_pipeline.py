"""tf.data pipeline: contract batches, frame maths, determinism, host sharding, eval padding,
resume, paired augmentation, global jax.Arrays, corrupt shards."""

from __future__ import annotations

import re
import struct

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

tf = pytest.importorskip("tensorflow")

from evclip_jax.data import pipeline  # noqa: E402
from evclip_jax.data.tfrecords import PairedItem, encode_png, write_tfrecords  # noqa: E402
from evclip_jax.events.frames import eval_window, event_counts, frame_to_tower_input  # noqa: E402
from evclip_jax.events.io import EVENT_DTYPE, write_events  # noqa: E402

S = 32
SENSOR = (24, 40)
N = 37  # examples; label i is example i, so labels identify examples
WINDOW_K = 150
EMB_DIM = 4
AUG = pipeline.RELEASE_AUGMENT


def _random_events(rng, n, sensor=SENSOR):
    ev = np.zeros(n, EVENT_DTYPE)
    ev["x"] = rng.integers(0, sensor[1], n)
    ev["y"] = rng.integers(0, sensor[0], n)
    ev["t"] = np.sort(rng.integers(0, 1 << 20, n))
    ev["p"] = rng.integers(0, 2, n)
    return ev


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """N examples (random events, random images, unique labels) as "train" and "test"."""
    root = tmp_path_factory.mktemp("pipe")
    rng = np.random.default_rng(0)
    items, events, images = [], [], []
    for i in range(N):
        ev = _random_events(rng, int(rng.integers(100, 400)))
        write_events(str(root / f"e{i}.npz"), ev)
        image = rng.integers(0, 256, (S, S + 8, 3), dtype=np.uint8)
        Image.fromarray(image).save(str(root / f"i{i}.png"))
        items.append(PairedItem(str(root / f"e{i}.npz"), str(root / f"i{i}.png"), i))
        events.append(ev)
        images.append(str(root / f"i{i}.png"))
    emb = rng.normal(size=(N, EMB_DIM)).astype(np.float32)
    out = root / "records"
    for split in ("train", "test"):
        write_tfrecords(items, out, class_names=[f"c{i}" for i in range(N)], out_size=S,
                        sensor_size=SENSOR, window_k=WINDOW_K, num_shards=3, split=split,
                        seed=5, teacher_emb=emb, progress=False)
    return {"dir": str(out), "events": events, "images": images, "emb": emb}


def _batches(data_dir, split="train", n=None, **kw):
    kw = {"global_batch_size": 8, "out_size": S, "train": True, "seed": 0, **kw}
    ds = pipeline.make_dataset(data_dir, split, **kw)
    return list(ds.take(n).as_numpy_iterator() if n is not None else ds.as_numpy_iterator())


def _eval_labels(batches):
    return np.concatenate([b["labels"][b["mask"]] for b in batches])


def test_contract_keys_shapes_ranges(data):
    batches = _batches(data["dir"], n=3, augment=AUG, teacher_emb=True)
    mean, std = np.array(pipeline.CLIP_MEAN), np.array(pipeline.CLIP_STD)
    for b in batches:
        assert set(b) == {"events", "images", "labels", "mask", "teacher_emb"}
        assert b["events"].shape == (8, S, S, 3) and b["events"].dtype == np.float32
        assert b["images"].shape == (8, S, S, 3) and b["images"].dtype == np.float32
        assert b["labels"].shape == (8,) and b["labels"].dtype == np.int32
        assert b["mask"].dtype == bool and b["mask"].all()
        assert b["teacher_emb"].shape == (8, EMB_DIM) and b["teacher_emb"].dtype == np.float32
        np.testing.assert_array_equal(b["teacher_emb"], data["emb"][b["labels"]])
        assert b["events"].min() >= -1 and b["events"].max() < 1
        np.testing.assert_array_equal(b["events"][..., 0], b["events"][..., 2])
        assert np.all(b["images"] >= (0 - mean) / std - 1e-5)
        assert np.all(b["images"] <= (1 - mean) / std + 1e-5)
        assert ((b["labels"] >= 0) & (b["labels"] < N)).all()


def test_eval_frame_maths_padding_and_mask(data):
    """No augmentation: events == frame_to_tower_input(counts / (max + 1)) of the stored
    window, images == CLIP-normalised replicated gray; 37 examples, batch 16 -> 3 batches,
    37 True masks, each example once."""
    batches = _batches(data["dir"], "test", global_batch_size=16, train=False)
    assert len(batches) == 3
    assert sum(int(b["mask"].sum()) for b in batches) == N
    assert sorted(_eval_labels(batches)) == list(range(N))
    assert (batches[-1]["labels"][~batches[-1]["mask"]] == pipeline.PAD_LABEL).all()
    mean, std = np.array(pipeline.CLIP_MEAN), np.array(pipeline.CLIP_STD)
    for b in batches:
        for events, image, label in zip(b["events"][b["mask"]], b["images"][b["mask"]],
                                        b["labels"][b["mask"]], strict=True):
            ev = data["events"][label]
            counts = event_counts(ev, SENSOR, S, window=eval_window(len(ev), WINDOW_K, 5))
            frame = counts.astype(np.float64) / (counts.max() + 1)
            np.testing.assert_allclose(events, frame_to_tower_input(frame), rtol=0, atol=1e-6)
            img = Image.open(data["images"][label]).convert("L").resize((S + 8, S),
                                                                         Image.BICUBIC)
            gray = np.asarray(img, np.float64)[:, 4:4 + S] / 255.0
            np.testing.assert_allclose(image, (gray[..., None] - mean) / std, atol=1e-5)


def test_determinism_seed_and_parallelism(data):
    """Same seed -> identical batches, also with tf.data on one thread instead of the default
    pool; another seed -> another order; each epoch is a new permutation."""
    a = _batches(data["dir"], n=10, augment=AUG, seed=1)
    ds = pipeline.make_dataset(data["dir"], "train", global_batch_size=8, out_size=S,
                               train=True, seed=1, augment=AUG)
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    b = list(ds.with_options(options).take(10).as_numpy_iterator())
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    c = _batches(data["dir"], n=10, augment=AUG, seed=2)
    order_a = np.concatenate([x["labels"] for x in a])
    order_c = np.concatenate([x["labels"] for x in c])
    assert not np.array_equal(order_a, order_c)
    assert sorted(order_a[:N]) == list(range(N)) and sorted(order_a[N:2 * N]) == list(range(N))
    assert not np.array_equal(order_a[:N], order_a[N:2 * N])


def test_host_sharding_disjoint_and_covering(data):
    seen_eval, seen_train = [], []
    for host in range(2):
        batches = _batches(data["dir"], "test", global_batch_size=16, train=False,
                           process_index=host, process_count=2)
        assert len(batches) == 3  # ceil(ceil(37 / 2) / 8): same count on both hosts
        assert all(b["labels"].shape == (8,) for b in batches)
        seen_eval.append(set(_eval_labels(batches).tolist()))
        assert len(_eval_labels(batches)) == len(seen_eval[-1])
        train = _batches(data["dir"], n=3, global_batch_size=16, process_index=host,
                         process_count=2)
        seen_train.append(set(np.concatenate([b["labels"] for b in train]).tolist()))
    for seen in (seen_eval, seen_train):
        assert not seen[0] & seen[1]
        assert seen[0] | seen[1] == set(range(N))


def test_resume_matches_uninterrupted(data):
    """start_step k yields batches k, k+1, ... of a fresh run (8 per batch, 37 per epoch:
    step 9 skips epoch 0 whole and 35 records of epoch 1, so its first batch straddles the
    epoch 1/2 boundary)."""
    full = _batches(data["dir"], n=12, augment=AUG, seed=3)
    for start in (9,):
        tail = _batches(data["dir"], n=12 - start, augment=AUG, seed=3, start_step=start)
        assert len(tail) == 12 - start
        for x, y in zip(full[start:], tail, strict=True):
            for k in x:
                np.testing.assert_array_equal(x[k], y[k])


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    """Events and images of the same off-centre bright square (sensor == out_size)."""
    root = tmp_path_factory.mktemp("squares")
    rng = np.random.default_rng(1)
    items, centres = [], []
    for i in range(16):
        top, left = rng.integers(2, 12, 2)
        centres.append((top + 5.5, left + 5.5))
        ys, xs = np.mgrid[top:top + 12, left:left + 12]
        ev = np.zeros(2 * ys.size, EVENT_DTYPE)
        ev["x"] = np.tile(xs.ravel(), 2)
        ev["y"] = np.tile(ys.ravel(), 2)
        ev["t"] = np.arange(len(ev))
        write_events(str(root / f"e{i}.npz"), ev)
        image = np.zeros((S, S), np.uint8)
        image[top:top + 12, left:left + 12] = 255
        Image.fromarray(image).save(str(root / f"i{i}.png"))
        items.append(PairedItem(str(root / f"e{i}.npz"), str(root / f"i{i}.png"), i))
    write_tfrecords(items, root, class_names=[str(i) for i in range(16)], out_size=S,
                    sensor_size=(S, S), split="train", progress=False)
    return str(root), np.array(centres)


def _centroids(mask):
    ys, xs = np.nonzero(mask)
    return np.array([ys.mean(), xs.mean()]) if len(ys) else None


def _square_offsets(batches):
    """Per example where both squares are in view: the largest coordinate difference between
    the event square's and the image square's centroids (a crop may cut both out)."""
    mid = (0.5 - pipeline.CLIP_MEAN[0]) / pipeline.CLIP_STD[0]
    out = []
    for b in batches:
        for events, image in zip(b["events"], b["images"], strict=True):
            ce, ci = _centroids(events[..., 0] > -0.5), _centroids(image[..., 0] > mid)
            if ce is not None and ci is not None:
                out.append(np.abs(ce - ci).max())
    return np.array(out)


def test_paired_augmentation_keeps_alignment(squares):
    root, centres = squares
    paired = _batches(root, n=2, seed=0, augment=AUG, paired_aug=True)
    offsets = _square_offsets(paired)
    assert len(offsets) >= 12 and offsets.max() < 1.0
    # The augmentation did move the squares away from where they were written.
    moved = [np.abs(_centroids(b["events"][i, ..., 0] > -0.5) - centres[b["labels"][i]]).max()
             for b in paired for i in range(8) if (b["events"][i, ..., 0] > -0.5).any()]
    assert max(moved) > 3
    unpaired = _batches(root, n=2, seed=0, augment=AUG, paired_aug=False)
    offsets = _square_offsets(unpaired)
    assert offsets.max() > 3


def test_global_batches_sharded_over_fake_devices(data):
    assert jax.device_count() == 8
    ds = pipeline.make_dataset(data["dir"], "train", global_batch_size=16, out_size=S,
                               train=True, seed=0, process_index=0, process_count=1)
    local = next(ds.as_numpy_iterator())
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    batch = next(pipeline.global_batches(ds, mesh))
    assert set(batch) == set(local)
    for k, arr in batch.items():
        assert isinstance(arr, jax.Array) and arr.shape == local[k].shape
        assert arr.sharding == NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
        assert {s.data.shape[0] for s in arr.addressable_shards} == {2}
        np.testing.assert_array_equal(np.asarray(arr), local[k])
    mesh1 = Mesh(np.array(jax.devices()), ("data",))  # no "fsdp" axis: ignored
    batch = next(pipeline.global_batches(iter([local]), mesh1))
    assert batch["events"].sharding.spec == PartitionSpec(("data",))


def test_missing_data_errors_name_the_path(tmp_path, data):
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "absent"))):
        pipeline.make_dataset(tmp_path / "absent", "train", global_batch_size=8, out_size=S,
                              train=True, seed=0)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "val.manifest.json"))):
        pipeline.make_dataset(tmp_path, "val", global_batch_size=8, out_size=S, train=True,
                              seed=0)
    with pytest.raises(ValueError, match="out_size"):
        pipeline.make_dataset(data["dir"], "train", global_batch_size=8, out_size=S * 2,
                              train=True, seed=0)
    with pytest.raises(ValueError, match="unknown keys"):
        pipeline.make_dataset(data["dir"], "train", global_batch_size=8, out_size=S,
                              train=True, seed=0, augment={"rotate": 1})


# --------------------------------------------------------------------------------------------
# Corrupt shards.


def _record_spans(raw: bytes) -> list[tuple[int, int]]:
    """(start, end) byte spans of the records of a TFRecord file: u64 length, u32 crc,
    data, u32 crc."""
    spans, pos = [], 0
    while pos < len(raw):
        (length,) = struct.unpack("<Q", raw[pos:pos + 8])
        spans.append((pos, pos + 16 + length))
        pos += 16 + length
    return spans


def _bad_png_record(label: int) -> bytes:
    """A CRC-valid record whose event_counts PNG has a valid header and garbage data."""
    good = encode_png(np.ones((S, S), np.uint16))
    garbage = good[:33] + bytes(range(256))[: len(good) - 33]
    return _example(garbage, label)


def _wrong_shape_record(label: int) -> bytes:
    return _example(encode_png(np.ones((S // 2, S // 2), np.uint16)), label)


def _example(counts_png: bytes, label: int) -> bytes:
    image = encode_png(np.zeros((S, S), np.uint8))
    feature = {
        "event_counts": tf.train.Feature(bytes_list=tf.train.BytesList(value=[counts_png])),
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _corrupt(root, kinds):
    """12 examples in 3 shards of 4 (eval split, labels 0-11 in order), then damages:
    "bad_png"/"wrong_shape" replace record 1/2 of shard 0; "truncate" cuts shard 1 inside
    its third record; "flip" flips a byte inside record 1 of shard 2. Returns the labels that
    must survive and the shard paths."""
    rng = np.random.default_rng(7)
    items = []
    for i in range(12):
        write_events(str(root / f"e{i}.npz"), _random_events(rng, 50))
        Image.fromarray(rng.integers(0, 256, (S, S), dtype=np.uint8)).save(str(root / f"i{i}.png"))
        items.append(PairedItem(str(root / f"e{i}.npz"), str(root / f"i{i}.png"), i))
    manifest = write_tfrecords(items, root, class_names=[str(i) for i in range(12)],
                               out_size=S, sensor_size=SENSOR, num_shards=3, split="test",
                               progress=False)
    shards = [str(root / name) for name in manifest["shards"]]
    alive = set(range(12))
    if "bad_png" in kinds or "wrong_shape" in kinds:
        records = [r.numpy() for r in tf.data.TFRecordDataset(shards[0])]
        if "bad_png" in kinds:
            records[1] = _bad_png_record(1)
            alive.discard(1)
        if "wrong_shape" in kinds:
            records[2] = _wrong_shape_record(2)
            alive.discard(2)
        with tf.io.TFRecordWriter(shards[0]) as w:
            for r in records:
                w.write(r)
    if "truncate" in kinds:
        raw = open(shards[1], "rb").read()
        start, end = _record_spans(raw)[2]
        open(shards[1], "wb").write(raw[:(start + end) // 2])
        alive -= {6, 7}  # its third and fourth records
    if "flip" in kinds:
        raw = bytearray(open(shards[2], "rb").read())
        start, end = _record_spans(bytes(raw))[1]
        raw[(start + end) // 2] ^= 0xFF
        open(shards[2], "wb").write(bytes(raw))
        alive -= {9, 10, 11}  # a corrupt record ends its shard
    return alive, shards


@pytest.mark.parametrize("kind,shard", [("bad_png", 0), ("truncate", 1), ("flip", 2)])
def test_corrupt_shard_raises_naming_the_shard(tmp_path, kind, shard):
    _, shards = _corrupt(tmp_path, {kind})
    ds = pipeline.make_dataset(tmp_path, "test", global_batch_size=8, out_size=S, train=False,
                               seed=0)
    # Iterating the dataset raises TF's error naming the shard; global_batches (what
    # train/eval iterate) re-raises it as a ValueError subclass.
    mesh = Mesh(np.array(jax.devices()), ("data",))
    with pytest.raises(pipeline.BadRecordError, match=re.escape(shards[shard])) as info:
        list(pipeline.global_batches(ds, mesh))
    assert isinstance(info.value.__cause__, tf.errors.InvalidArgumentError)
    assert shards[shard] in info.value.__cause__.message


def test_corrupt_shard_skipped_and_counted(tmp_path, capfd):
    alive, _ = _corrupt(tmp_path, {"bad_png", "wrong_shape", "truncate", "flip"})
    counter = pipeline.BadRecordCounter()
    batches = _batches(str(tmp_path), "test", train=False, skip_bad_records=True,
                       bad_records=counter)
    labels = _eval_labels(batches)
    assert sorted(labels) == sorted(alive)
    assert counter.value == 12 - len(alive)
    assert len(batches) == 2  # padded as for 12 records
    assert "skipped" in capfd.readouterr().err
