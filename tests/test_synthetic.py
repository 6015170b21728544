"""Tests for data/synthetic.py: the synthetic paired dataset builds, reads back and is seeded,
and each event representation reaches the batches as embed maps frames.py's frames."""

import glob
import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from PIL import Image

from evclip_jax import embed
from evclip_jax.data.synthetic import SYNTHETIC_CLASS_NAMES, make_synthetic_dataset
from evclip_jax.events import frames
from evclip_jax.events.io import detect_format, read_events

NUM_CLASSES, PER_CLASS, SIZE = 4, 4, 16


def _build(out_dir, seed=0, **kwargs):
    return make_synthetic_dataset(out_dir, num_classes=NUM_CLASSES, per_class=PER_CLASS,
                                  image_size=SIZE, seed=seed, **kwargs)


def _files(root):
    """Relative path -> bytes of every event and image file under root."""
    paths = glob.glob(os.path.join(root, "events", "**", "*.*"), recursive=True)
    paths += glob.glob(os.path.join(root, "images", "**", "*.png"), recursive=True)
    result = {}
    for path in sorted(paths):
        with open(path, "rb") as f:
            result[os.path.relpath(path, root)] = f.read()
    return result


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_a")
    return str(root), _build(root)


def test_class_names():
    assert len(SYNTHETIC_CLASS_NAMES) == len(set(SYNTHETIC_CLASS_NAMES)) == 24
    assert SYNTHETIC_CLASS_NAMES[:4] == ("disc", "square", "triangle", "cross")


def test_manifests_and_files(built):
    root, manifests = built
    # Default split fractions 0.75 / 0.25 of 4 per class -> 3 train, 1 test per class.
    want = {"train": 3 * NUM_CLASSES, "test": 1 * NUM_CLASSES}
    assert sorted(manifests) == sorted(want)
    for split, count in want.items():
        manifest = manifests[split]
        assert manifest["num_examples"] == count
        assert list(manifest["class_names"]) == list(SYNTHETIC_CLASS_NAMES[:NUM_CLASSES])
        assert "{label}" in manifest["prompt_template"]
        for shard in manifest["shards"]:
            path = shard if os.path.isabs(shard) else os.path.join(root, shard)
            assert os.path.getsize(path) > 0
        with open(os.path.join(root, f"{split}.manifest.json")) as f:
            assert json.load(f)["num_examples"] == count

        info = manifest["synthetic"]
        assert len(info["event_files"]) == len(info["image_files"]) == count
        assert sorted(set(info["labels"])) == list(range(NUM_CLASSES))
        assert np.bincount(info["labels"]).tolist() == [count // NUM_CLASSES] * NUM_CLASSES
        for event_path, image_path in zip(info["event_files"], info["image_files"], strict=True):
            assert detect_format(event_path) == "nimagenet_npz"
            with np.load(event_path) as z:
                assert z.files == ["event_data"]
            ev = read_events(event_path, sensor_size=(SIZE, SIZE))
            assert ev.size > 10
            assert np.all(np.diff(ev["t"]) >= 0)
            assert set(np.unique(ev["p"]).tolist()) <= {0, 1}
            with Image.open(image_path) as image:
                assert image.size == (SIZE, SIZE) and image.mode == "L"
                pixels = np.asarray(image)
            assert pixels.max() - pixels.min() > 60  # the object is visible


def test_same_seed_identical_different_seed_differs(built, tmp_path):
    root, _ = built
    first = _files(root)
    _build(tmp_path / "again")
    again = _files(str(tmp_path / "again"))
    assert first.keys() == again.keys() and len(first) == 2 * NUM_CLASSES * PER_CLASS
    assert all(first[k] == again[k] for k in first)

    _build(tmp_path / "other", seed=1)
    other = _files(str(tmp_path / "other"))
    assert other.keys() == first.keys()
    assert all(first[k] != other[k] for k in first)


def test_bin_format_and_separate_sensor(tmp_path):
    manifests = make_synthetic_dataset(
        tmp_path, num_classes=2, per_class=2, image_size=SIZE, sensor_size=(20, 24),
        splits={"train": 0.5, "val": 0.5}, event_format="bin", seed=3)
    assert sorted(manifests) == ["train", "val"]
    for manifest in manifests.values():
        assert manifest["num_examples"] == 2
        for path in manifest["synthetic"]["event_files"]:
            assert path.endswith(".bin")
            ev = read_events(path, sensor_size=(20, 24))
            assert ev.size > 0 and ev["t"].max() < 2**23


@pytest.mark.parametrize("representation", ["evclip", "eventclip", "eventbind"])
def test_representations_through_the_pipeline(tmp_path, representation):
    """make_synthetic_dataset(representation=...) -> make_dataset -> global_batches: each row
    is embed's map of frames.py's frames of the whole event file, and of the image."""
    from evclip_jax.data import pipeline

    manifests = make_synthetic_dataset(tmp_path, num_classes=2, per_class=4, image_size=SIZE,
                                       splits={"train": 0.5, "test": 0.5}, seed=2,
                                       representation=representation, num_frames=2)
    test = manifests["test"]
    shape = {"evclip": [SIZE] * 2, "eventclip": [SIZE, SIZE, 3],
             "eventbind": [2, SIZE, SIZE, 3]}[representation]
    assert test["representation"] == representation and test["event_shape"] == shape
    ds = pipeline.make_dataset(tmp_path, "test", global_batch_size=8, out_size=SIZE,
                               train=False, seed=0, representation=representation)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    (batch,) = [{k: np.asarray(v) for k, v in b.items()}
                for b in pipeline.global_batches(ds, mesh)]
    info = test["synthetic"]
    assert batch["mask"].tolist() == [True] * 4 + [False] * 4  # item order, then padding
    assert batch["labels"][:4].tolist() == info["labels"]
    options = {"eventbind": {"num_bins": 2, "split": "count"}}.get(representation, {})
    for row, (event_path, image_path) in enumerate(zip(info["event_files"],
                                                       info["image_files"], strict=True)):
        ev = read_events(event_path)
        reference = frames.get_representation(representation)(ev, (SIZE, SIZE), SIZE,
                                                               **options)
        np.testing.assert_allclose(batch["events"][row],
                                   embed.events_to_tower_input(reference[None],
                                                               representation)[0],
                                   rtol=0, atol=1e-6)
        gray = np.asarray(Image.open(image_path))  # already SIZE x SIZE gray
        np.testing.assert_allclose(batch["images"][row],
                                   embed.images_to_tower_input(gray[None])[0], rtol=0,
                                   atol=2e-6)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic_dataset(tmp_path, num_classes=0)
    with pytest.raises(ValueError, match="splits"):
        make_synthetic_dataset(tmp_path, splits={"train": 0.5, "test": 0.2})
    with pytest.raises(ValueError, match="splits"):
        make_synthetic_dataset(tmp_path, per_class=1, splits={"train": 0.5, "test": 0.5})
    with pytest.raises(ValueError, match="event_format"):
        make_synthetic_dataset(tmp_path, event_format="mp4")
    with pytest.raises(ValueError, match="representation 'eq1'"):
        make_synthetic_dataset(tmp_path, representation="eq1")
