"""TFDS builders (data/tfds_builders.py) on small fake manual dirs: TFDS's own builder test
case for each builder and config, the examples against tools/build_tfrecords.py's records for
the same files, and the input pipeline reading a prepared TFDS folder."""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pytest
from event_fixtures import random_events
from PIL import Image

from evclip_jax.data import pipeline, records, tfds_builders
from evclip_jax.events.io import write_events

tfds = pytest.importorskip("tensorflow_datasets")
tf = pytest.importorskip("tensorflow")

NCALTECH_CLASSES = ("accordion", "airplanes")
CIFAR_CLASSES = ("airplane", "automobile")
WNIDS = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus",
         "n01484850": "great white shark, white shark"}
# Enough events for the builders' windows (30000 / 2000) to pick a part of each file.
NUM_EVENTS = 30_500


def _image(path: str, rng: np.random.Generator, size: tuple[int, int]) -> None:
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def write_nmnist(root: str) -> None:
    rng = np.random.default_rng(1)
    for split, per_digit in (("Train", 2), ("Test", 1)):
        for digit in range(3):
            os.makedirs(f"{root}/{split}/{digit}")
            for k in range(per_digit):
                write_events(f"{root}/{split}/{digit}/{k:05d}.bin",
                             random_events(rng, 2300, (34, 34)))


def write_ncaltech101(root: str) -> None:
    rng = np.random.default_rng(2)
    for name in (*NCALTECH_CLASSES, *tfds_builders.NCALTECH101_EXCLUDED):
        os.makedirs(f"{root}/Caltech101/{name}")
        os.makedirs(f"{root}/101_ObjectCategories/{name}")
        for k in (1, 2):
            sensor = (170 + 10 * k, 230 + 5 * k)  # sizes vary: per-file max + 1
            write_events(f"{root}/Caltech101/{name}/image_{k:04d}.bin",
                         random_events(rng, NUM_EVENTS, sensor))
            _image(f"{root}/101_ObjectCategories/{name}/image_{k:04d}.jpg", rng,
                   (200 + 37 * k, 300))


def write_cifar10_dvs(root: str) -> None:
    rng = np.random.default_rng(3)
    for name in CIFAR_CLASSES:
        os.makedirs(f"{root}/{name}")
        for k in range(2):
            write_events(f"{root}/{name}/cifar10_{name}_{k}.aedat",
                         random_events(rng, NUM_EVENTS, (128, 128)), format="aedat2")


def write_nimagenet(root: str) -> None:
    rng = np.random.default_rng(4)
    with open(f"{root}/LOC_synset_mapping.txt", "w") as f:
        f.writelines(f"{wnid} {name}\n" for wnid, name in WNIDS.items())
    os.makedirs(f"{root}/imagenet/val")
    val_index = 0
    for wnid in WNIDS:
        for split, count in (("train", 2), ("val", 1)):
            os.makedirs(f"{root}/N_Imagenet/extracted_{split}/{wnid}", exist_ok=True)
            os.makedirs(f"{root}/imagenet/train/{wnid}", exist_ok=True)
            for k in range(count):
                if split == "train":
                    stem, image_dir = f"{wnid}_{k}", f"{root}/imagenet/train/{wnid}"
                else:  # ImageNet's flat val folder
                    val_index += 1
                    stem, image_dir = f"ILSVRC2012_val_{val_index:08d}", f"{root}/imagenet/val"
                write_events(f"{root}/N_Imagenet/extracted_{split}/{wnid}/{stem}.npz",
                             random_events(rng, NUM_EVENTS, (480, 640)), format="nimagenet_npz")
                _image(f"{image_dir}/{stem}.JPEG", rng, (180, 240))


WRITERS = {"n_mnist": write_nmnist, "n_caltech101": write_ncaltech101,
           "cifar10_dvs": write_cifar10_dvs, "n_imagenet": write_nimagenet}


class _FakeManualDir:
    """Writes the builder's fake manual dir as TFDS's EXAMPLE_DIR for the class's tests."""

    @classmethod
    def setUpClass(cls):
        cls._root = tempfile.mkdtemp(prefix=f"{cls.DATASET_CLASS.name}_manual_")
        WRITERS[cls.DATASET_CLASS.name](cls._root)
        cls.EXAMPLE_DIR = cls._root
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        shutil.rmtree(cls._root)


class NMnistTest(_FakeManualDir, tfds.testing.DatasetBuilderTestCase):
    DATASET_CLASS = tfds_builders.NMnist
    SPLITS = {"train": 6, "test": 3}


class NCaltech101Test(_FakeManualDir, tfds.testing.DatasetBuilderTestCase):
    DATASET_CLASS = tfds_builders.NCaltech101
    SPLITS = {"test": 4}  # BACKGROUND_Google left out


class Cifar10DvsTest(_FakeManualDir, tfds.testing.DatasetBuilderTestCase):
    DATASET_CLASS = tfds_builders.Cifar10Dvs
    SPLITS = {"test": 4}


class NImagenetTest(_FakeManualDir, tfds.testing.DatasetBuilderTestCase):
    DATASET_CLASS = tfds_builders.NImagenet
    SPLITS = {"train": 6, "val": 3}  # mini and full alike: the fake set has 3 classes
    # The N-ImageNet reader opens .npz files by path; TFDS's check mocks np.load to take file
    # objects only.
    MOCK_OUT_FORBIDDEN_OS_FUNCTIONS = False


# --------------------------------------------------------------------------------------------
# The same examples as the TFRecord builder.


def _build_records(tool, out_dir, args: list[str]) -> None:
    from absl import flags

    try:
        flags.FLAGS(["build_tfrecords", f"--out_dir={out_dir}", "--num_shards=2", *args])
        tool.main([])
    finally:
        flags.FLAGS.unparse_flags()


def _tool_args(name: str, root: str, tmp: str) -> dict[str, list[str]]:
    """split -> build_tfrecords.py flags that build that split from the same files."""
    if name == "n_mnist":
        return {split: ["--layout=nmnist", f"--event_root={root}", f"--split={split}",
                        f"--source_split={split.capitalize()}"] for split in ("train", "test")}
    if name == "n_caltech101":
        return {"test": ["--layout=ncaltech101", f"--event_root={root}/Caltech101",
                         f"--image_root={root}/101_ObjectCategories", "--split=test",
                         "--exclude_classes=BACKGROUND_Google"]}
    if name == "cifar10_dvs":  # a list layout with CIFAR10-DVS's settings
        with open(f"{tmp}/list.csv", "w") as f:
            for label, cls in enumerate(CIFAR_CLASSES):
                for k in range(2):
                    f.write(f"{root}/{cls}/cifar10_{cls}_{k}.aedat,,{label}\n")
        with open(f"{tmp}/names.txt", "w") as f:
            f.write("\n".join(CIFAR_CLASSES) + "\n")
        return {"test": ["--layout=list", f"--list_file={tmp}/list.csv",
                         f"--class_names={tmp}/names.txt", "--split=test", "--window_k=30000",
                         "--clamp=20", "--sensor_size=128,128"]}
    common = ["--layout=nimagenet", f"--event_root={root}/N_Imagenet",
              f"--image_root={root}/imagenet", "--subset=mini",
              f"--synset_mapping={root}/LOC_synset_mapping.txt"]
    return {"train": [*common, "--split=train", "--source_split=extracted_train",
                      "--image_split=train", "--classes=pretrain"],
            "val": [*common, "--split=val", "--source_split=extracted_val",
                    "--image_split=val", "--classes=all"]}


@pytest.fixture(scope="module")
def build_tool(load_tool):
    return load_tool("build_tfrecords")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, build_tool):
    """name -> (TFDS builder prepared from the fake manual dir, TFRecord dir of the same
    files), built once per builder."""
    cache = {}

    def get(name: str):
        if name not in cache:
            tmp = tmp_path_factory.mktemp(name)
            root = str(tmp / "manual")
            os.makedirs(root)
            WRITERS[name](root)
            builder = tfds.builder(name, data_dir=str(tmp / "tfds"))
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=root))
            for args in _tool_args(name, root, str(tmp)).values():
                _build_records(build_tool, tmp / "records", args)
            cache[name] = builder, str(tmp / "records")
        return cache[name]

    return get


def _records_by_key(data_dir: str, split: str) -> tuple[dict, dict]:
    manifest = records.read_manifest(data_dir, split)
    out = {}
    for shard in manifest["shards"]:
        for rec in tf.data.TFRecordDataset(os.path.join(data_dir, shard)):
            ex = records.parse_example(rec, manifest["image_size"],
                                       has_images=manifest["has_images"],
                                       representation=manifest["representation"],
                                       num_frames=manifest["event_shape"][0])
            out[ex["key"].numpy().decode()] = {k: v.numpy() for k, v in ex.items()}
    return out, manifest


@pytest.mark.parametrize("name", ["n_mnist", "n_caltech101", "cifar10_dvs", "n_imagenet"])
def test_examples_equal_tfrecord_builder(prepared, name):
    builder, records_dir = prepared(name)
    for split in builder.info.splits:
        expected, manifest = _records_by_key(records_dir, split)
        # TFDS's own decoder on TFDS's files.
        got = {ex["key"].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split=split))}
        assert sorted(got) == sorted(expected) and len(got) == manifest["num_examples"]
        for key, ex in got.items():
            ref = expected[key]
            assert ex["label"] == ref["label"], key
            np.testing.assert_array_equal(ex["event_counts"][..., 0], ref["event_counts"],
                                          err_msg=key)
            assert ex["event_counts"].max() > 0
            if manifest["has_images"]:
                np.testing.assert_array_equal(ex["image"][..., 0], ref["image"], err_msg=key)
            else:
                assert "image" not in ex
        assert builder.info.features["label"].names == manifest["class_names"]
        # The TFDS folder's manifest says what the TFRecord builder's says, except where the
        # files are and how they are ordered.
        tfds_manifest = records.read_manifest(builder.data_dir, split)
        differ = {"shards", "shard_num_examples", "shuffled", "source"}
        assert {k: v for k, v in tfds_manifest.items() if k not in differ} == \
            {k: v for k, v in manifest.items() if k not in differ}


def test_other_representation_equals_tfrecord_builder(tmp_path, build_tool):
    """A user's config (EventBind frames at 16 px) stores what build_tfrecords.py stores with
    the same settings; the records' parser reads TFDS's files as TFDS does."""
    root = tmp_path / "manual"
    os.makedirs(root)
    write_nmnist(str(root))
    config = tfds_builders.EventConfig(name="eventbind_16", representation="eventbind",
                                       num_frames=2, out_size=16, window_k=2000,
                                       sensor_size=(34, 34))
    builder = tfds_builders.NMnist(data_dir=str(tmp_path / "tfds"), config=config)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
    _build_records(build_tool, tmp_path / "records",
                   ["--layout=nmnist", f"--event_root={root}", "--split=test",
                    "--source_split=Test", "--representation=eventbind", "--num_frames=2",
                    "--out_size=16"])
    expected, _ = _records_by_key(str(tmp_path / "records"), "test")
    parsed, _ = _records_by_key(builder.data_dir, "test")
    got = {ex["key"].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split="test"))}
    assert sorted(got) == sorted(parsed) == sorted(expected) and len(got) == 3
    for key, ex in got.items():
        assert ex["event_frames"].shape == (2, 16, 16, 3)
        np.testing.assert_array_equal(ex["event_frames"], expected[key]["event_frames"])
        np.testing.assert_array_equal(parsed[key]["event_frames"], expected[key]["event_frames"])
    with pytest.raises(ValueError, match="clamp=5 is Eq. 1's count clamp"):
        tfds_builders.NMnist(data_dir=str(tmp_path / "tfds"), config=tfds_builders.EventConfig(
            name="eventclip_clamped", representation="eventclip", clamp=5))


def test_pipeline_reads_tfds_folder(prepared):
    """make_dataset on the prepared TFDS folder yields the examples it yields on the TFRecord
    builder's records (in TFDS's order), for evaluation and training."""
    builder, records_dir = prepared("n_caltech101")
    common = {"global_batch_size": 4, "out_size": 224, "seed": 0, "process_index": 0,
              "process_count": 1}

    def rows(data_dir: str) -> list[tuple]:
        ds = pipeline.make_dataset(data_dir, "test", train=False, **common)
        out = []
        for batch in ds.as_numpy_iterator():
            for i in np.flatnonzero(batch["mask"]):
                out.append((int(batch["labels"][i]), batch["events"][i].tobytes(),
                            batch["images"][i].tobytes()))
        return sorted(out)

    from_tfds = rows(builder.data_dir)
    assert len(from_tfds) == 4 and from_tfds == rows(records_dir)
    train = pipeline.make_dataset(builder.data_dir, "test", train=True, **common)
    batch = next(train.as_numpy_iterator())  # integers: counts and gray images
    assert batch["events"].shape == (4, 224, 224) and batch["images"].shape == (4, 224, 224)


def test_split_classes_must_agree(tmp_path):
    """N-ImageNet's train and val folders with different classes are refused, naming the
    manual dir (labels would index different class lists)."""
    root = tmp_path / "manual"
    os.makedirs(root)
    write_nimagenet(str(root))
    os.remove(root / "LOC_synset_mapping.txt")  # class names from each split's folders
    shutil.rmtree(root / "N_Imagenet" / "extracted_val" / "n01484850")
    builder = tfds.builder("n_imagenet/full", data_dir=str(tmp_path / "tfds"))
    with pytest.raises(ValueError, match=f"{root}: split 'val' has classes"):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
