"""The data never hangs or reads outside its dir (issue 11: bad cases 1, 2, 7 and 10, the label
blamed on "undecodable PNG"): a vanished shard is fatal naming it, skipping bad records gives
up, a stuck input is bounded, a failed build keeps the previous records, a manifest cannot
point outside its dir."""

from __future__ import annotations

import json
import os
import re
import threading
import time

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from PIL import Image

tf = pytest.importorskip("tensorflow")

from event_fixtures import random_events  # noqa: E402

from evclip_jax.data import pipeline, records  # noqa: E402
from evclip_jax.data.records import PairedItem, encode_png, write_tfrecords  # noqa: E402
from evclip_jax.events.io import write_events  # noqa: E402

S = 16
SENSOR = (20, 24)
N = 12
CLASSES = [f"c{i}" for i in range(4)]


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    root = tmp_path_factory.mktemp("items")
    rng = np.random.default_rng(0)
    out = []
    for i in range(N):
        write_events(str(root / f"e{i}.npz"), random_events(rng, 80, SENSOR))
        Image.fromarray(rng.integers(0, 256, (S, S), dtype=np.uint8)).save(str(root / f"i{i}.png"))
        out.append(PairedItem(str(root / f"e{i}.npz"), str(root / f"i{i}.png"), i % 4))
    return out


def _build(items, out_dir, split="train", num_shards=1, **kw):
    return write_tfrecords(items, out_dir, class_names=CLASSES, out_size=S, sensor_size=SENSOR,
                           num_shards=num_shards, split=split, progress=False, **kw)


def _rewrite(shard: str, change) -> None:
    """Rewrites every record of a shard through ``change(index, tf.train.Example)``."""
    raw = [r.numpy() for r in tf.data.TFRecordDataset(shard)]
    with tf.io.TFRecordWriter(shard) as writer:
        for i, r in enumerate(raw):
            example = tf.train.Example.FromString(r)
            change(i, example)
            writer.write(example.SerializeToString())


def _garbage_png(i, example):
    good = encode_png(np.ones((S, S), np.uint16))
    example.features.feature["event_counts"].bytes_list.value[0] = \
        good[:33] + bytes(range(256))[: len(good) - 33]


def _mesh():
    return Mesh(np.array(jax.devices()), ("data",))


def _train_batches(data_dir, split="train", **kw):
    ds = pipeline.make_dataset(data_dir, split, global_batch_size=8, out_size=S, train=True,
                               seed=0, **kw)
    return pipeline.global_batches(ds, _mesh(), stall_timeout_s=60)


def test_vanished_shard_is_fatal_naming_it(tmp_path, items):
    """Bad case 1: a shard deleted while the run reads it ends the iteration with its path
    (the reader used to retry the open forever)."""
    manifest = _build(items, tmp_path)
    shard = str(tmp_path / manifest["shards"][0])
    batches = _train_batches(tmp_path)
    next(batches)
    os.remove(shard)
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=re.escape(shard)):
        for _ in range(1000):  # at most a few buffered epochs come before the next open
            next(batches)
    assert time.monotonic() - start < 30
    # A shard missing before the start is refused by name too.
    with pytest.raises(ValueError, match=re.escape(f"{shard}: shard listed in")):
        _train_batches(tmp_path)


def test_only_bad_records_give_up_with_few_messages(tmp_path, items, capfd):
    """Bad case 2: with skip_bad_records, an epoch of only bad records stops the iteration
    (it used to loop forever, logging a line per record)."""
    manifest = _build(items, tmp_path)
    _rewrite(str(tmp_path / manifest["shards"][0]), _garbage_png)
    counter = pipeline.BadRecordCounter()
    with pytest.raises(pipeline.BadRecordError, match=r"gave up skipping: (\d+) of \1 records "
                       r"read were bad \(an epoch has 12;") as error:
        next(_train_batches(tmp_path, skip_bad_records=True, bad_records=counter))
    # The give-up's own counts: at least an epoch, all bad. (The counter read afterwards can
    # be ahead on records read: a pass still in flight when the error stops the pipeline may
    # have counted its reads but not its bad records.)
    gave_up_at = int(re.search(r"gave up skipping: (\d+) of", str(error.value)).group(1))
    assert gave_up_at >= N and counter.value >= gave_up_at
    assert 1 <= capfd.readouterr().err.count("skipped") <= 5  # at 1, 2, 4, 8 skipped


def test_bad_share_past_max_bad_fraction_gives_up(tmp_path, items, capfd):
    manifest = _build(items, tmp_path)
    _rewrite(str(tmp_path / manifest["shards"][0]),
             lambda i, ex: _garbage_png(i, ex) if i in (2, 5, 9) else None)  # 3 of 12
    batches = _train_batches(tmp_path, skip_bad_records=True, max_bad_fraction=0.2)
    with pytest.raises(pipeline.BadRecordError, match=r"max_bad_fraction=0\.2 "):
        for _ in range(20):
            next(batches)
    # Within the share the run goes on, epoch after epoch, and the messages thin out.
    capfd.readouterr()
    counter = pipeline.BadRecordCounter()
    batches = _train_batches(tmp_path, skip_bad_records=True, max_bad_fraction=0.3,
                             bad_records=counter, shuffle_buffer=4)
    labels = [np.asarray(next(batches)["labels"]) for _ in range(30)]  # 240 records: 26 epochs
    assert counter.value >= 3 * 25 and counter.read >= 12 * 25
    assert np.bincount(np.concatenate(labels), minlength=4).min() > 0
    assert capfd.readouterr().err.count("skipped") <= 8  # 1, 2, 4, ..., 64: not one per record


def test_label_out_of_range_is_named_as_such(tmp_path, items):
    """Unclear case: a label outside the manifest's classes was blamed on an undecodable PNG."""
    manifest = _build(items, tmp_path, split="test")
    shard = str(tmp_path / manifest["shards"][0])

    def label_99(i, example):
        if i == 4:
            example.features.feature["label"].int64_list.value[0] = 99
    _rewrite(shard, label_99)
    ds = pipeline.make_dataset(tmp_path, "test", global_batch_size=8, out_size=S, train=False,
                               seed=0)
    with pytest.raises(pipeline.BadRecordError) as err:
        list(pipeline.global_batches(ds, _mesh()))
    message = str(err.value)
    assert "label 99 outside [0, 4)" in message and "global index 4" in message
    assert shard in message and "PNG" not in message
    counter = pipeline.BadRecordCounter()
    ds = pipeline.make_dataset(tmp_path, "test", global_batch_size=8, out_size=S, train=False,
                               seed=0, skip_bad_records=True, bad_records=counter)
    kept = np.concatenate([b["labels"][b["mask"]] for b in ds.as_numpy_iterator()])
    assert counter.value == 1 and len(kept) == N - 1


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_failed_rebuild_keeps_the_previous_records(tmp_path, items):
    """Bad case 7: a rebuild that fails leaves the previous manifest and shards as they were
    (no half-rewritten shard beside an old manifest), and no temporary file."""
    out = tmp_path / "records"
    _build(items, out, num_shards=3)
    before = _snapshot(out)
    broken = list(items)
    broken[7] = PairedItem(str(tmp_path / "gone.npz"), items[7].image_path, items[7].label)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "gone.npz"))):
        _build(broken, out, num_shards=3, seed=1)
    assert _snapshot(out) == before
    # A crash while publishing: the old manifest is gone before any shard is renamed, so no
    # manifest ever describes shards that are not its own.
    original = records._rename

    def crash_after_first(src, dst):
        original(src, dst)
        raise OSError("simulated crash while publishing")
    records._rename = crash_after_first
    try:
        with pytest.raises(OSError, match="simulated crash"):
            _build(items, out, num_shards=3, seed=2)
    finally:
        records._rename = original
    with pytest.raises(ValueError, match="manifest not found"):
        records.read_manifest(out, "train")
    # A build that completes publishes its manifest last.
    manifest = _build(items, out, num_shards=2, seed=3)
    assert records.read_manifest(out, "train")["shards"] == manifest["shards"]
    assert not list(out.glob("*.partial"))


@pytest.mark.parametrize("entry", ["../elsewhere/train-00000-of-00001.tfrecord", "ABSOLUTE",
                                   "sub/../../x.tfrecord", "gs://bucket/x.tfrecord"])
def test_manifest_shard_outside_its_dir_refused(tmp_path, items, entry):
    """Bad case 10: shard paths with '..', absolute paths or URLs are refused by name."""
    data = tmp_path / "data"
    manifest = _build(items, data)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / manifest["shards"][0]).write_bytes((data / manifest["shards"][0]).read_bytes())
    if entry == "ABSOLUTE":
        entry = str(outside / manifest["shards"][0])
    path = data / "train.manifest.json"
    path.write_text(json.dumps({**manifest, "shards": [entry]}))
    with pytest.raises(ValueError) as err:
        pipeline.make_dataset(data, "train", global_batch_size=8, out_size=S, train=True,
                              seed=0)
    assert str(path) in str(err.value) and repr(entry) in str(err.value)


def test_stuck_input_is_bounded_and_interruptible():
    """A pipeline that yields nothing ends with InputStallError naming its source after
    stall_timeout_s; an interrupt (SIGTERM's flag) ends the wait at once."""
    release = threading.Event()

    def stuck():
        yield {"labels": np.zeros(8, np.int32)}
        release.wait()

    try:
        batches = pipeline.global_batches(stuck(), _mesh(), stall_timeout_s=1.0,
                                          source="/data/x (split train)")
        assert next(batches)["labels"].shape == (8,)
        start = time.monotonic()
        with pytest.raises(pipeline.InputStallError, match=re.escape("/data/x (split train)")):
            next(batches)
        assert 1.0 <= time.monotonic() - start < 5
        stop = threading.Event()
        batches = pipeline.global_batches(stuck(), _mesh(), interrupted=stop.is_set)
        next(batches)
        threading.Timer(0.5, stop.set).start()
        start = time.monotonic()
        assert next(batches, None) is None
        assert time.monotonic() - start < 3
    finally:
        release.set()


def test_build_tool_failure_is_one_message_and_keeps_the_records(tmp_path, items, load_tool):
    from absl import flags

    tool = load_tool("build_tfrecords")
    rows = [f"{item.event_path},{item.image_path},{item.label}" for item in items]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    args = ["build_tfrecords", "--layout=list", f"--list_file={tmp_path / 'list.csv'}",
            f"--out_dir={out}", "--split=train", f"--out_size={S}",
            f"--sensor_size={SENSOR[0]},{SENSOR[1]}", "--num_shards=2"]
    try:
        flags.FLAGS(args)
        tool.main([])
        before = _snapshot(out)
        rows[5] = f"{tmp_path / 'gone.npz'},{items[5].image_path},1"
        (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
        flags.FLAGS(args + ["--seed=1"])
        with pytest.raises(SystemExit) as err:
            tool.main([])
    finally:
        flags.FLAGS.unparse_flags()
    assert str(tmp_path / "gone.npz") in str(err.value.code)
    assert "are as they were before this build" in str(err.value.code)
    assert _snapshot(out) == before
