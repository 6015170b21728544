"""Paired TFRecords (data/records.py): writer/parser round trip for each event
representation, manifest, errors; dataset-layout builders (data/layouts.py); the build tool."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from event_fixtures import random_events
from PIL import Image

from evclip_jax.data import layouts, records
from evclip_jax.data.records import PairedItem, write_tfrecords
from evclip_jax.events.frames import (
    eval_window,
    event_counts,
    eventbind_frames,
    eventclip_frame,
    random_window,
)
from evclip_jax.events.io import write_events

tf = pytest.importorskip("tensorflow")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENSOR = (30, 40)  # (H, W)
S = 16


def _events(rng, n, sensor=SENSOR):
    return random_events(rng, n, sensor)


def _reference_gray(path, size):
    """CLIP preprocessing in gray, written out: L, bicubic short side -> size, centre crop."""
    img = Image.open(path).convert("L")
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = (size, int(h * scale)) if w <= h else (int(w * scale), size)
    img = img.resize((new_w, new_h), Image.BICUBIC)
    left, top = round((new_w - size) / 2), round((new_h - size) / 2)
    return np.asarray(img)[top:top + size, left:left + size]


def _read_records(out_dir, manifest, has_images=True, emb_dim=None):
    out = {}
    shape = manifest["event_shape"]
    for name in manifest["shards"]:
        for rec in tf.data.TFRecordDataset(os.path.join(out_dir, name)):
            ex = records.parse_example(rec, manifest["image_size"], emb_dim,
                                       has_images=has_images,
                                       representation=manifest["representation"],
                                       num_frames=shape[0])
            out[ex["key"].numpy().decode()] = {k: v.numpy() for k, v in ex.items()}
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Five event files in three formats and five images (RGB/gray, portrait/landscape)."""
    root = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    items, events = [], []
    shapes = [(24, 36), (40, 20), (16, 16), (33, 50), (20, 21)]  # (h, w)
    for i, (h, w) in enumerate(shapes):
        ev = _events(rng, 300 + 50 * i)
        ext = [".npz", ".bin", ".npz", ".h5", ".bin"][i]
        event_path = str(root / f"ev{i}{ext}")
        write_events(event_path, ev)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image = Image.fromarray(pixels) if i != 2 else Image.fromarray(pixels[..., 0])
        image_path = str(root / (f"im{i}.png" if i != 3 else f"im{i}.jpg"))
        image.save(image_path)
        items.append(PairedItem(event_path, image_path, label=i % 3))
        events.append(ev)
    return items, events


@pytest.mark.parametrize("split,window_k,clamp", [("test", 100, 2), ("train", 120, None),
                                                  ("val", None, 3)])
def test_round_trip(tmp_path, source, split, window_k, clamp):
    items, events = source
    manifest = write_tfrecords(items, tmp_path, class_names=["a", "b", "c"], out_size=S,
                               sensor_size=SENSOR, clamp=clamp, window_k=window_k,
                               num_shards=2, split=split, seed=7, progress=False)
    stored = _read_records(tmp_path, manifest)
    assert len(stored) == len(items)
    for index, (item, ev) in enumerate(zip(items, events, strict=True)):
        if window_k is None:
            window = None
        elif split == "train":  # documented rule: default_rng([seed, item index])
            window = random_window(len(ev), window_k, np.random.default_rng([7, index]))
        else:
            window = eval_window(len(ev), window_k, 7)
        expected = event_counts(ev, SENSOR, S, clamp=clamp, window=window)
        rec = stored[item.event_path]
        assert rec["event_counts"].dtype == np.uint16
        np.testing.assert_array_equal(rec["event_counts"], expected)
        if window is not None and clamp is None:
            assert rec["event_counts"].sum() == window_k
        np.testing.assert_array_equal(rec["image"], _reference_gray(item.image_path, S))
        assert rec["label"] == item.label


@pytest.mark.parametrize("representation", ["eventclip", "eventbind"])
def test_round_trip_frames(tmp_path, source, representation):
    """eventclip / eventbind records store the frames of the same window as evclip counts,
    exactly (float32), with the manifest saying what they hold."""
    items, events = source
    manifest = write_tfrecords(items, tmp_path, class_names=["a", "b", "c"], out_size=S,
                               sensor_size=SENSOR, window_k=100, num_shards=2, split="train",
                               seed=7, representation=representation, num_frames=2,
                               progress=False)
    shape = [S, S, 3] if representation == "eventclip" else [2, S, S, 3]
    assert manifest["representation"] == representation and manifest["event_shape"] == shape
    assert manifest["event_feature"] == "event_frames" and manifest["format_version"] == 2
    assert "event_counts_shape" not in manifest
    assert records.read_manifest(tmp_path, "train") == manifest
    stored = _read_records(tmp_path, manifest)
    for index, (item, ev) in enumerate(zip(items, events, strict=True)):
        window = random_window(len(ev), 100, np.random.default_rng([7, index]))
        if representation == "eventclip":
            expected = eventclip_frame(ev, SENSOR, S, window=window)
        else:
            expected = eventbind_frames(ev, SENSOR, S, window=window, num_bins=2, split="count")
        rec = stored[item.event_path]
        assert "event_counts" not in rec and rec["event_frames"].dtype == np.float32
        np.testing.assert_array_equal(rec["event_frames"], expected)
        np.testing.assert_array_equal(rec["image"], _reference_gray(item.image_path, S))
    # A record read as another shape fails when the op runs.
    with pytest.raises(tf.errors.InvalidArgumentError):
        for rec in tf.data.TFRecordDataset(str(tmp_path / manifest["shards"][0])):
            records.parse_example(rec, S, representation="eventbind", num_frames=3)


def test_representation_arguments(tmp_path, source):
    items, _ = source
    with pytest.raises(ValueError, match="clamp=4"):
        write_tfrecords(items, tmp_path, class_names=["a", "b", "c"], out_size=S,
                        sensor_size=SENSOR, clamp=4, representation="eventclip",
                        progress=False)
    with pytest.raises(ValueError, match="unknown event representation 'eq1'"):
        write_tfrecords(items, tmp_path, class_names=["a", "b", "c"], out_size=S,
                        sensor_size=SENSOR, representation="eq1", progress=False)
    with pytest.raises(ValueError, match="num_frames"):
        write_tfrecords(items, tmp_path, class_names=["a", "b", "c"], out_size=S,
                        sensor_size=SENSOR, representation="eventbind", num_frames=0,
                        progress=False)


def test_read_manifest_representation(tmp_path, source):
    """Format-1 manifests (Eq. 1 counts, "representation" a dict) read as evclip; a
    representation or event_shape that does not fit is refused naming the manifest."""
    items, _ = source
    manifest = write_tfrecords(items[:2], tmp_path, class_names=["a", "b", "c"], out_size=S,
                               sensor_size=SENSOR, split="test", progress=False)
    assert manifest["representation"] == "evclip" and manifest["event_shape"] == [S, S]
    path = tmp_path / "test.manifest.json"
    old = {k: v for k, v in manifest.items() if k not in ("event_shape", "event_feature")}
    old.update(format_version=1, representation={"name": "eq1_counts"})
    path.write_text(json.dumps(old))
    read = records.read_manifest(tmp_path, "test")
    assert read["representation"] == "evclip" and read["event_shape"] == [S, S]
    assert read["event_feature"] == "event_counts"
    for bad in ({"representation": "eq1"}, {"representation": "eventbind"},
                {"representation": "eventclip", "event_shape": [S, S, 1]}):
        path.write_text(json.dumps({**manifest, **bad}))
        with pytest.raises(ValueError, match="test.manifest.json"):
            records.read_manifest(tmp_path, "test")


def test_records_and_layouts_import_without_tensorflow():
    code = ("import sys; sys.modules['tensorflow'] = None; "
            "import evclip_jax.data.records, evclip_jax.data.layouts; "
            "assert 'tensorflow' not in [m for m in sys.modules if sys.modules[m] is not None]")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_luma_and_crop_hand_computed(tmp_path):
    """A solid colour gives PIL's ITU-R 601 luma; a 2-column stripe lands where the centre
    crop of the resized image puts it."""
    rgb = (200, 100, 50)
    path = str(tmp_path / "solid.png")
    Image.new("RGB", (30, 20), rgb).save(path)
    gray = records.load_gray_image(path, 10)
    luma = (rgb[0] * 299 + rgb[1] * 587 + rgb[2] * 114) / 1000
    assert gray.shape == (10, 10)
    assert np.all(np.abs(gray.astype(int) - luma) <= 1)
    # 20 x 60 (h x w) -> 10 x 30, centre crop columns 10..19. A white band at columns 30..39 of
    # the source maps to columns 15..19 of the resized image, i.e. 5..9 of the crop.
    img = np.zeros((20, 60), np.uint8)
    img[:, 30:40] = 255
    path = str(tmp_path / "band.png")
    Image.fromarray(img).save(path)
    gray = records.load_gray_image(path, 10)
    assert np.all(gray[:, 6:9] > 200) and np.all(gray[:, :4] < 30)


def test_manifest(tmp_path, source):
    items, _ = source
    manifest = write_tfrecords(items, tmp_path, class_names=["a", "b", "c"], out_size=S,
                               sensor_size=SENSOR, clamp=None, window_k=50, num_shards=3,
                               split="train", progress=False)
    with open(tmp_path / "train.manifest.json") as f:
        assert json.load(f) == manifest
    assert manifest["num_examples"] == 5
    assert manifest["shards"] == [f"train-0000{k}-of-00003.tfrecord" for k in range(3)]
    assert sum(manifest["shard_num_examples"]) == 5
    assert manifest["class_counts"] == [2, 2, 1]
    assert manifest["class_names"] == ["a", "b", "c"]
    assert manifest["image_size"] == S and manifest["window_k"] == 50
    assert manifest["sensor_size"] == list(SENSOR) and manifest["has_images"]
    assert records.read_manifest(tmp_path, "train") == manifest
    for name, count in zip(manifest["shards"], manifest["shard_num_examples"], strict=True):
        assert sum(1 for _ in tf.data.TFRecordDataset(str(tmp_path / name))) == count


def test_event_only_and_teacher_emb(tmp_path, source):
    items, _ = source
    items = [PairedItem(i.event_path, None, i.label) for i in items]
    emb = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    manifest = write_tfrecords(items, tmp_path, class_names=["a", "b", "c"], out_size=S,
                               sensor_size=SENSOR, split="test", teacher_emb=emb,
                               progress=False)
    assert not manifest["has_images"] and manifest["teacher_emb_dim"] == 4
    stored = _read_records(tmp_path, manifest, has_images=False, emb_dim=4)
    for item, row in zip(items, emb, strict=True):
        np.testing.assert_array_equal(stored[item.event_path]["teacher_emb"], row)
        assert not stored[item.event_path]["image"].any()


def test_per_file_sensor_size(tmp_path):
    """sensor_size None: the file's max coordinate + 1 (N-Caltech101 rule)."""
    ev = _events(np.random.default_rng(3), 400, sensor=(25, 37))
    ev["x"][0], ev["y"][0] = 36, 24
    path = str(tmp_path / "e.bin")
    write_events(path, ev)
    manifest = write_tfrecords([PairedItem(path, None, 0)], tmp_path / "out", class_names=["x"],
                               out_size=S, split="test", progress=False)
    rec = _read_records(tmp_path / "out", manifest, has_images=False)[path]
    np.testing.assert_array_equal(rec["event_counts"], event_counts(ev, (25, 37), S))


def test_writer_errors_name_the_file(tmp_path, source):
    items, _ = source
    bad_events = tmp_path / "broken.bin"
    bad_events.write_bytes(b"\x00" * 7)  # not a multiple of 5 bytes
    with pytest.raises(ValueError, match="broken.bin"):
        write_tfrecords([PairedItem(str(bad_events), None, 0)], tmp_path / "o1",
                        class_names=["a"], out_size=S, split="test", progress=False)
    bad_image = tmp_path / "broken.png"
    bad_image.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        write_tfrecords([PairedItem(items[0].event_path, str(bad_image), 0)], tmp_path / "o2",
                        class_names=["a"], out_size=S, sensor_size=SENSOR, split="test",
                        progress=False)
    off_sensor = PairedItem(items[0].event_path, None, 0)
    with pytest.raises(ValueError, match=os.path.basename(items[0].event_path)):
        write_tfrecords([off_sensor], tmp_path / "o3", class_names=["a"], out_size=S,
                        sensor_size=(5, 5), split="test", progress=False)
    with pytest.raises(ValueError, match="label 3"):
        write_tfrecords([PairedItem(items[0].event_path, None, 3)], tmp_path / "o4",
                        class_names=["a"], out_size=S, progress=False)
    with pytest.raises(ValueError, match="image_path is None"):
        write_tfrecords([items[0], PairedItem(items[1].event_path, None, 0)], tmp_path / "o5",
                        class_names=["a", "b", "c"], out_size=S, progress=False)


def test_read_manifest_errors(tmp_path, source):
    missing_dir = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=str(missing_dir)):
        records.read_manifest(missing_dir, "train")
    with pytest.raises(ValueError, match="train.manifest.json"):
        records.read_manifest(tmp_path, "train")
    (tmp_path / "train.manifest.json").write_text('{"num_examples": 3')
    with pytest.raises(ValueError, match="not valid JSON"):
        records.read_manifest(tmp_path, "train")
    (tmp_path / "train.manifest.json").write_text('{"num_examples": 3}')
    with pytest.raises(ValueError, match="lacks keys"):
        records.read_manifest(tmp_path, "train")
    items, _ = source
    write_tfrecords(items[:2], tmp_path, class_names=["a", "b", "c"], out_size=S,
                    sensor_size=SENSOR, num_shards=2, split="train", progress=False)
    os.remove(tmp_path / "train-00001-of-00002.tfrecord")
    with pytest.raises(ValueError, match="train-00001-of-00002.tfrecord"):
        records.read_manifest(tmp_path, "train")


# --------------------------------------------------------------------------------------------
# Builders.


def _tiny_events(path, rng):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_events(path, _events(rng, 20, sensor=(30, 30)))


def _tiny_image(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 6), (10, 20, 30)).save(path)


def test_nimagenet_builder(tmp_path):
    rng = np.random.default_rng(0)
    wnids = [f"n{i:08d}" for i in range(1, 103)]  # 102 classes: mini keeps the first 100
    for k, wnid in enumerate(wnids):
        _tiny_events(str(tmp_path / "ev" / "train" / wnid / f"{wnid}_1.npz"), rng)
        if k in (0, 85):
            _tiny_events(str(tmp_path / "ev" / "train" / wnid / f"{wnid}_2.npz"), rng)
        # Images: class-folder layout, except class 85's second file in the flat layout.
        _tiny_image(str(tmp_path / "im" / "train" / wnid / f"{wnid}_1.JPEG"))
    _tiny_image(str(tmp_path / "im" / "train" / wnids[0] / f"{wnids[0]}_2.JPEG"))
    _tiny_image(str(tmp_path / "im" / "train" / f"{wnids[85]}_2.JPEG"))
    mapping = tmp_path / "LOC_synset_mapping.txt"
    mapping.write_text("".join(f"{w} name {k}, alias\n" for k, w in enumerate(wnids)))

    items, names = layouts.nimagenet_items(str(tmp_path / "ev"), "train",
                                             str(tmp_path / "im"))
    assert names == wnids[:100]
    assert len(items) == 81 and {i.label for i in items} == set(range(80))
    first = [i for i in items if i.label == 0]
    assert [os.path.basename(i.image_path) for i in first] == [f"{wnids[0]}_1.JPEG",
                                                               f"{wnids[0]}_2.JPEG"]
    held, names = layouts.nimagenet_items(str(tmp_path / "ev"), "train", str(tmp_path / "im"),
                                            classes="heldout",
                                            synset_mapping=str(mapping))
    assert {i.label for i in held} == set(range(80, 100)) and len(held) == 21
    assert names[0] == "name 0, alias" and len(names) == 100
    flat = [i for i in held if i.event_path.endswith(f"{wnids[85]}_2.npz")]
    assert flat[0].image_path == str(tmp_path / "im" / "train" / f"{wnids[85]}_2.JPEG")
    for i in held:
        assert os.path.splitext(os.path.basename(i.image_path))[0] == \
            os.path.splitext(os.path.basename(i.event_path))[0]
    full, _ = layouts.nimagenet_items(str(tmp_path / "ev"), "train", subset="full",
                                        classes="all")
    assert len(full) == 104 and full[0].image_path is None

    os.remove(tmp_path / "im" / "train" / wnids[3] / f"{wnids[3]}_1.JPEG")
    with pytest.raises(ValueError, match=f"{wnids[3]}_1.npz"):
        layouts.nimagenet_items(str(tmp_path / "ev"), "train", str(tmp_path / "im"))


def test_ncaltech101_builder(tmp_path):
    rng = np.random.default_rng(1)
    for cls, n in [("airplanes", 2), ("BACKGROUND_Google", 1), ("ant", 3)]:
        for k in range(1, n + 1):
            _tiny_events(str(tmp_path / "ev" / cls / f"image_{k:04d}.bin"), rng)
            _tiny_image(str(tmp_path / "im" / cls / f"image_{k:04d}.jpg"))
    items, names = layouts.ncaltech101_items(str(tmp_path / "ev"), str(tmp_path / "im"),
                                               exclude_classes=["BACKGROUND_Google"])
    assert names == ["airplanes", "ant"]
    assert [i.label for i in items] == [0, 0, 1, 1, 1]
    for i in items:
        cls = os.path.basename(os.path.dirname(i.event_path))
        assert i.image_path == str(tmp_path / "im" / cls /
                                   os.path.basename(i.event_path).replace(".bin", ".jpg"))
    items, names = layouts.ncaltech101_items(str(tmp_path / "ev"))
    assert names == ["BACKGROUND_Google", "airplanes", "ant"] and items[0].image_path is None


def test_nmnist_builder_and_list(tmp_path):
    rng = np.random.default_rng(2)
    for split in ("Train", "Test"):
        for digit in range(3):
            for k in range(2):
                _tiny_events(str(tmp_path / split / str(digit) / f"{k:05d}.bin"), rng)
    items, names = layouts.nmnist_items(str(tmp_path), "Test")
    assert names == ["0", "1", "2"] and len(items) == 6
    assert all(os.path.basename(os.path.dirname(i.event_path)) == str(i.label) for i in items)
    assert all("Test" in i.event_path and i.image_path is None for i in items)

    _tiny_image(str(tmp_path / "a.png"))
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("event_path,image_path,label\n"
                        "Test/0/00000.bin,a.png,0\n"
                        f"{tmp_path}/Test/2/00001.bin,,2\n")
    items, names = layouts.list_items(str(csv_path))
    assert names == ["0", "1", "2"]
    assert items[0] == PairedItem(str(tmp_path / "Test/0/00000.bin"), str(tmp_path / "a.png"), 0)
    assert items[1].image_path is None and items[1].label == 2
    csv_path.write_text("x.bin,,notanint\n")
    with pytest.raises(ValueError, match="list.csv:1"):
        layouts.list_items(str(csv_path))


def test_build_tool_list_layout(tmp_path):
    rng = np.random.default_rng(4)
    rows = []
    for k in range(3):
        _tiny_events(str(tmp_path / f"e{k}.bin"), rng)
        _tiny_image(str(tmp_path / f"i{k}.png"))
        rows.append(f"e{k}.bin,i{k}.png,{k % 2}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "build_tfrecords.py"), "--layout=list",
         f"--list_file={tmp_path / 'list.csv'}", f"--out_dir={out}", "--split=test",
         "--out_size=8", "--sensor_size=30,30", "--num_shards=2"],
        capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote 3 records" in result.stdout
    manifest = records.read_manifest(out, "test")
    assert manifest["num_examples"] == 3 and manifest["class_counts"] == [2, 1]
    assert manifest["sensor_size"] == [30, 30] and len(manifest["shards"]) == 2


def test_build_tool_representation(tmp_path, load_tool):
    """--representation / --num_frames reach the records; a clamp is refused for them."""
    from absl import app, flags

    tool = load_tool("build_tfrecords")
    rng = np.random.default_rng(5)
    rows = []
    for k in range(2):
        _tiny_events(str(tmp_path / f"e{k}.bin"), rng)
        rows.append(f"e{k}.bin,,{k}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    args = ["build_tfrecords", "--layout=list", f"--list_file={tmp_path / 'list.csv'}",
            f"--out_dir={out}", "--split=test", "--out_size=8", "--sensor_size=30,30",
            "--representation=eventbind", "--num_frames=2"]
    try:
        flags.FLAGS(args)
        tool.main([])
        manifest = records.read_manifest(out, "test")
        assert manifest["representation"] == "eventbind"
        assert manifest["event_shape"] == [2, 8, 8, 3] and manifest["clamp"] is None
        flags.FLAGS(args + ["--clamp=5"])
        with pytest.raises(app.UsageError, match="--clamp"):
            tool.main([])
    finally:
        flags.FLAGS.unparse_flags()
