"""tf.data pipeline: the integer batch contract and, through device_prep, the towers' inputs
(each event representation against embed's maps of the NumPy frames), determinism, host
sharding, eval padding, resume (after the device augmentation too), paired augmentation,
global jax.Arrays, representation mismatch, corrupt shards."""

from __future__ import annotations

import itertools
import os
import re
import struct

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

tf = pytest.importorskip("tensorflow")

from event_fixtures import random_events  # noqa: E402

from evclip_jax import embed  # noqa: E402
from evclip_jax.data import device_prep, pipeline  # noqa: E402
from evclip_jax.data.augment import RELEASE_AUGMENT  # noqa: E402
from evclip_jax.data.records import (  # noqa: E402
    PairedItem,
    encode_png,
    load_gray_image,
    write_tfrecords,
)
from evclip_jax.events.frames import (  # noqa: E402
    eval_window,
    event_counts,
    event_frame,
    eventbind_frames,
    eventclip_frame,
    random_window,
)
from evclip_jax.events.io import EVENT_DTYPE, write_events  # noqa: E402

S = 32
SENSOR = (24, 40)
N = 37  # examples; label i is example i, so labels identify examples
WINDOW_K = 150
EMB_DIM = 4
AUG = RELEASE_AUGMENT
T = 2  # eventbind frames
EVENT_SHAPES = {"evclip": (S, S, 3), "eventclip": (S, S, 3), "eventbind": (T, S, S, 3)}
MEAN, STD = np.array(embed.CLIP_MEAN), np.array(embed.CLIP_STD)


def _random_events(rng, n, sensor=SENSOR):
    return random_events(rng, n, sensor)


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
    return {"dir": str(out), "events": events, "images": images, "emb": emb, "items": items}


def _batches(data_dir, split="train", n=None, **kw):
    kw = {"global_batch_size": 8, "out_size": S, "train": True, "seed": 0, **kw}
    ds = pipeline.make_dataset(data_dir, split, **kw)
    return list(ds.take(n).as_numpy_iterator() if n is not None else ds.as_numpy_iterator())


def _prepared(batches, augment=AUG, paired=True, rep="evclip", seed=0):
    """The train step's device map of host batches (device_prep.prepare), as NumPy."""
    prep = device_prep.InputPrep(rep, S, augment=augment, paired=paired, seed=seed,
                                 fill=1.0 if rep == "eventbind" else 0.0)
    fn = jax.jit(lambda b: device_prep.prepare(b, prep))
    return [{k: np.asarray(v) for k, v in fn(b).items()} for b in batches]


def _eval_labels(batches):
    return np.concatenate([b["labels"][b["mask"]] for b in batches])


def test_contract_keys_shapes_ranges(data):
    """Host batches hold integers (counts, gray images) and the seeding fields; the device map
    makes them tower inputs in range."""
    raw = _batches(data["dir"], n=3, teacher_emb=True)
    for b in raw:
        assert set(b) == {"events", "images", "labels", "mask", "teacher_emb", "index", "epoch"}
        assert b["events"].shape == (8, S, S) and b["events"].dtype == np.uint16
        assert b["images"].shape == (8, S, S) and b["images"].dtype == np.uint8
        assert b["index"].dtype == np.int32 and b["epoch"].dtype == np.int32
        assert ((b["index"] >= 0) & (b["index"] < N)).all() and (b["epoch"] == 0).all()
    batches = _prepared(raw)
    mean, std = MEAN, STD
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
    """No augmentation: events == (E - 0.5) * 2 replicated, E = counts / (max + 1) of the
    stored window, images == CLIP-normalised replicated gray; 37 examples, batch 16 -> 3
    batches, 37 True masks, each example once."""
    batches = _batches(data["dir"], "test", global_batch_size=16, train=False)
    tower_inputs = jax.jit(device_prep.tower_inputs)
    batches = [{k: np.asarray(v) for k, v in tower_inputs(b).items()} for b in batches]
    assert len(batches) == 3
    assert sum(int(b["mask"].sum()) for b in batches) == N
    assert sorted(_eval_labels(batches)) == list(range(N))
    assert (batches[-1]["labels"][~batches[-1]["mask"]] == pipeline.PAD_LABEL).all()
    mean, std = MEAN, STD
    for b in batches:
        for events, image, label in zip(b["events"][b["mask"]], b["images"][b["mask"]],
                                        b["labels"][b["mask"]], strict=True):
            ev = data["events"][label]
            counts = event_counts(ev, SENSOR, S, window=eval_window(len(ev), WINDOW_K, 5))
            frame = counts.astype(np.float64) / (counts.max() + 1)
            np.testing.assert_allclose(events, np.repeat(frame[..., None] * 2 - 1, 3, -1),
                                       rtol=0, atol=1e-6)
            img = Image.open(data["images"][label]).convert("L").resize((S + 8, S),
                                                                         Image.BICUBIC)
            gray = np.asarray(img, np.float64)[:, 4:4 + S] / 255.0
            np.testing.assert_allclose(image, (gray[..., None] - mean) / std, atol=1e-5)


def test_determinism_seed_and_parallelism(data):
    """Same seed -> identical batches, also with tf.data on one thread instead of the default
    pool; another seed -> another order; each epoch is a new permutation."""
    a = _batches(data["dir"], n=10, seed=1)
    ds = pipeline.make_dataset(data["dir"], "train", global_batch_size=8, out_size=S,
                               train=True, seed=1)
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    b = list(ds.with_options(options).take(10).as_numpy_iterator())
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    c = _batches(data["dir"], n=10, seed=2)
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
    """start_step k yields batches k, k+1, ... of a fresh run, on the host and after the
    device augmentation (8 per batch, 37 per epoch: step 9 skips epoch 0 whole and 35 records
    of epoch 1, so its first batch straddles the epoch 1/2 boundary)."""
    full = _batches(data["dir"], n=12, seed=3)
    for start in (9,):
        tail = _batches(data["dir"], n=12 - start, seed=3, start_step=start)
        assert len(tail) == 12 - start
        for x, y in zip(full[start:], tail, strict=True):
            for k in x:
                np.testing.assert_array_equal(x[k], y[k])
        for x, y in zip(_prepared(full[start:], seed=3), _prepared(tail, seed=3), strict=True):
            for k in x:
                np.testing.assert_array_equal(x[k], y[k])


# --------------------------------------------------------------------------------------------
# Event representations: records -> make_dataset -> global_batches == embed's maps.


@pytest.fixture(scope="module", params=["evclip", "eventclip", "eventbind"])
def rep_data(request, data, tmp_path_factory):
    """The first 10 examples of ``data`` as records of one representation."""
    rep, items = request.param, data["items"][:10]
    out = str(tmp_path_factory.mktemp(f"records_{rep}"))
    for split in ("train", "test"):
        write_tfrecords(items, out, class_names=[f"c{i}" for i in range(10)], out_size=S,
                        sensor_size=SENSOR, window_k=WINDOW_K, num_shards=3, split=split,
                        seed=5, representation=rep, num_frames=T, progress=False)
    return {"dir": out, "rep": rep, "events": data["events"], "images": data["images"]}


def _reference(rep, ev, window):
    """frames.py's NumPy frames of one window, mapped to the tower input by embed."""
    if rep == "evclip":
        frames = event_frame(ev, SENSOR, S, window=window)
    elif rep == "eventclip":
        frames = eventclip_frame(ev, SENSOR, S, window=window)
    else:
        frames = eventbind_frames(ev, SENSOR, S, window=window, num_bins=T, split="count")
    return np.asarray(embed.events_to_tower_input(frames[None], rep))[0]


def test_representation_batches_equal_embed_maps(rep_data):
    """Augmentation off, evaluation and training: each row of the global batches is embed's
    map of frames.py's frames of the record's window, and of its gray image."""
    rep = rep_data["rep"]
    mesh = Mesh(np.array(jax.devices()), ("data",))
    for split, train in (("test", False), ("train", True)):
        ds = pipeline.make_dataset(rep_data["dir"], split, global_batch_size=8, out_size=S,
                                   train=train, seed=0, representation=rep)
        batches = list(itertools.islice(pipeline.global_batches(ds, mesh), 2))
        assert len(batches) == 2 and sum(int(b["mask"].sum()) for b in batches) >= 10
        for b in batches:
            b = {k: np.asarray(v) for k, v in b.items()}
            assert set(b) == {"events", "images", "labels", "mask"}
            assert b["events"].shape == (8, *EVENT_SHAPES[rep]) and b["events"].dtype == np.float32
            assert b["images"].shape == (8, S, S, 3) and b["images"].dtype == np.float32
            assert b["labels"].dtype == np.int32 and b["mask"].dtype == bool
            for events, image, label in zip(b["events"][b["mask"]], b["images"][b["mask"]],
                                            b["labels"][b["mask"]], strict=True):
                ev = rep_data["events"][label]
                if train:  # item index == label; the writer's rule default_rng([seed, index])
                    window = random_window(len(ev), WINDOW_K, np.random.default_rng([5, label]))
                else:
                    window = eval_window(len(ev), WINDOW_K, 5)
                np.testing.assert_allclose(events, _reference(rep, ev, window), rtol=0,
                                           atol=1e-6)
                gray = load_gray_image(rep_data["images"][label], S)
                np.testing.assert_allclose(image, embed.images_to_tower_input(gray[None])[0],
                                           rtol=0, atol=2e-6)


def test_representation_mismatch_names_the_manifest(rep_data):
    rep = rep_data["rep"]
    other = "eventclip" if rep != "eventclip" else "evclip"
    with pytest.raises(ValueError) as info:
        pipeline.make_dataset(rep_data["dir"], "train", global_batch_size=8, out_size=S,
                              train=True, seed=0, representation=other)
    for part in (os.path.join(rep_data["dir"], "train.manifest.json"),
                 f"config.data.representation={other!r}", repr(rep)):
        assert part in str(info.value)


@pytest.mark.parametrize("rep_data", ["eventbind"], indirect=True)
def test_resume_multichannel(rep_data):
    """Augmented eventbind batches resume exactly (10 records, 4 per batch: step 4 starts
    inside epoch 1 and its batch straddles the epoch 1/2 boundary)."""
    kw = {"global_batch_size": 4, "seed": 3, "representation": "eventbind"}
    full = _prepared(_batches(rep_data["dir"], n=6, **kw), rep="eventbind", seed=3)
    tail = _prepared(_batches(rep_data["dir"], n=2, start_step=4, **kw), rep="eventbind",
                     seed=3)
    for x, y in zip(full[4:], tail, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    """Events and images of the same off-centre bright square (sensor == out_size): each pixel
    of the square fires twice, ON in the first half of the stream, OFF in the second."""
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
        ev["p"] = np.repeat([1, 0], ys.size)
        write_events(str(root / f"e{i}.npz"), ev)
        image = np.zeros((S, S), np.uint8)
        image[top:top + 12, left:left + 12] = 255
        Image.fromarray(image).save(str(root / f"i{i}.png"))
        items.append(PairedItem(str(root / f"e{i}.npz"), str(root / f"i{i}.png"), i))
    write_tfrecords(items, root, class_names=[str(i) for i in range(16)], out_size=S,
                    sensor_size=(S, S), split="train", progress=False)
    return str(root), np.array(centres), items


def _centroids(mask):
    ys, xs = np.nonzero(mask)
    return np.array([ys.mean(), xs.mean()]) if len(ys) else None


def _event_masks(events, rep):
    """Where one example's tower input shows events, per channel or frame that carries them:
    evclip [1, S, S]; eventclip ON and OFF [2, S, S]; eventbind [T, S, S] (pixels off the
    white background: green below 0.5)."""
    mid = (0.5 - MEAN) / STD
    if rep == "evclip":
        return (events[..., 0] > -0.5)[None]
    if rep == "eventclip":
        return np.moveaxis(events[..., :2] > mid[:2], -1, 0)
    return events[..., 1] < mid[1]


def _square_offsets(batches, rep="evclip"):
    """Per example where both squares are in view: the largest coordinate difference between
    the event square's and the image square's centroids (a crop may cut both out)."""
    mid = (0.5 - MEAN[0]) / STD[0]
    out = []
    for b in batches:
        for events, image in zip(b["events"], b["images"], strict=True):
            ce = _centroids(_event_masks(events, rep)[0])
            ci = _centroids(image[..., 0] > mid)
            if ce is not None and ci is not None:
                out.append(np.abs(ce - ci).max())
    return np.array(out)


def test_paired_augmentation_keeps_alignment(squares):
    root, centres, _ = squares
    paired = _prepared(_batches(root, n=2, seed=0), paired=True)
    offsets = _square_offsets(paired)
    assert len(offsets) >= 12 and offsets.max() < 1.0
    # The augmentation did move the squares away from where they were written.
    moved = [np.abs(_centroids(b["events"][i, ..., 0] > -0.5) - centres[b["labels"][i]]).max()
             for b in paired for i in range(8) if (b["events"][i, ..., 0] > -0.5).any()]
    assert max(moved) > 3
    unpaired = _prepared(_batches(root, n=2, seed=0), paired=False)
    offsets = _square_offsets(unpaired)
    assert offsets.max() > 3


@pytest.mark.parametrize("rep", ["eventclip", "eventbind"])
def test_paired_augmentation_multichannel(squares, rep, tmp_path):
    """One geometric transform moves every channel and frame of the event representation
    and the image alike; nearest resampling keeps the colours and shifted-in pixels are
    empty (eventclip 0, eventbind the white background)."""
    _, _, items = squares
    write_tfrecords(items, tmp_path, class_names=[str(i) for i in range(16)], out_size=S,
                    sensor_size=(S, S), split="train", representation=rep, num_frames=T,
                    progress=False)
    paired = _prepared(_batches(str(tmp_path), n=2, seed=0, representation=rep), rep=rep)
    for b in paired:
        assert b["events"].shape == (8, *EVENT_SHAPES[rep])
        for events in b["events"]:
            masks = _event_masks(events, rep)
            assert all(np.array_equal(m, masks[0]) for m in masks)
            m = masks[0][..., None]
            if rep == "eventclip":  # ON and OFF counts 1 / max 1 in the square, zeros elsewhere
                want = np.concatenate([m, m, 0 * m], -1).astype(float)
            else:  # frame 0 (ON events) red, frame 1 (OFF) blue, white elsewhere
                want = np.stack([np.where(m, c, 1.0) for c in ((1, 0, 0), (0, 0, 1))])
            np.testing.assert_allclose(events * STD + MEAN, want, rtol=0, atol=1e-5)
    offsets = _square_offsets(paired, rep)
    assert len(offsets) >= 12 and offsets.max() < 1.0
    unpaired = _prepared(_batches(str(tmp_path), n=2, seed=0, representation=rep),
                         paired=False, rep=rep)
    assert _square_offsets(unpaired, rep).max() > 3


def test_global_batches_sharded_over_fake_devices(data):
    assert jax.device_count() == 8
    ds = pipeline.make_dataset(data["dir"], "train", global_batch_size=16, out_size=S,
                               train=True, seed=0, process_index=0, process_count=1)
    local = next(ds.as_numpy_iterator())
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    batch = next(pipeline.global_batches(ds, mesh, tower_inputs=False))
    assert set(batch) == set(local)
    for k, arr in batch.items():
        assert isinstance(arr, jax.Array) and arr.shape == local[k].shape
        assert arr.sharding == NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
        assert {s.data.shape[0] for s in arr.addressable_shards} == {2}
        np.testing.assert_array_equal(np.asarray(arr), local[k])
    # Evaluation's default: the towers' inputs, mapped on the devices, sharded alike.
    prepared = next(pipeline.global_batches(ds, mesh))
    assert set(prepared) == set(local) - {"index", "epoch"}
    for k in ("events", "images"):
        assert prepared[k].sharding.spec == PartitionSpec(("data", "fsdp"))
        assert {s.data.shape[0] for s in prepared[k].addressable_shards} == {2}
        np.testing.assert_allclose(np.asarray(prepared[k]),
                                   np.asarray(device_prep.tower_inputs(local)[k]), rtol=0,
                                   atol=1e-6)
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
    for unknown in ({"rotate": 1}, {**AUG, "time_flip": True}):  # time flip: a no-op, gone
        with pytest.raises(ValueError, match="unknown keys"):
            device_prep.InputPrep("evclip", S, augment=unknown)


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
