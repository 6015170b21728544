"""TFDS builders for N-MNIST, N-Caltech101, CIFAR10-DVS and N-ImageNet (mini and full).

Each builder reads the user's manually downloaded dataset (``manual_dir``, layouts below) and
writes, per file, what ``tools/build_tfrecords.py`` writes for the same file: the event window
as the config's representation (paper Eq. 1 counts by default), the paired grayscale image in
CLIP preprocessing where the dataset has one, the label and the event file's path. The values
come from the TFRecord builder's own per-item functions (``records.item_events``,
``records.load_gray_image``, ``records.encode_png``), with the same window rule (a seeded random
window on ``train`` splits, ``eval_window`` otherwise, seeded by the item's index in the
layout's sorted list).

Features: ``event_counts`` (evclip: 16-bit gray PNG [S, S, 1]) or ``event_frames`` (eventclip,
eventbind: zlib float32 ``records.event_shape``), ``image`` (8-bit gray PNG [S, S, 1]),
``label`` (ClassLabel, names from the layout) and ``key`` (event path). These serialize to the
records' feature names and encodings, so ``records.parse_example`` reads TFDS's shards as is;
after preparing, each split also gets the ``<split>.manifest.json`` that the TFRecord builder
writes (shards: TFDS's files), so the prepared folder
``<data_dir>/<name>/<config>/<version>`` is a valid ``config.data.dir`` for the trainer and the
evaluators. TFDS shuffles every split by key at write time (the TFRecord builder shuffles only
training splits); the examples are the same.

    import tensorflow_datasets as tfds
    from evclip_jax.data import tfds_builders  # registers the builders
    builder = tfds.builder("n_caltech101", data_dir="/data/tfds")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir="/data/ncaltech101_manual"))
    # or: tfds build --imports evclip_jax.data.tfds_builders n_caltech101 --manual_dir=...
    # (TFDS's command line imports apache-beam, which evclip_jax does not install.)

Other representations or sizes: pass your own config, e.g.
``tfds.builder("n_mnist", config=EventConfig(name="eventclip", representation="eventclip",
window_k=2000, sensor_size=(34, 34)))``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from evclip_jax.data import layouts, records

# N-Caltech101's background class is not one of the 101 object categories.
NCALTECH101_EXCLUDED = ("BACKGROUND_Google",)
CIFAR10_DVS_SENSOR_SIZE = (128, 128)  # DVS128


@dataclasses.dataclass(eq=False)
class EventConfig(tfds.core.BuilderConfig):
    """What each example stores: the arguments of ``records.item_events``.

    ``window_k`` None: the whole file; ``clamp``: Eq. 1's count clamp (evclip only);
    ``sensor_size`` (H, W) None: each file's max coordinate + 1 (N-Caltech101's rule).
    """

    out_size: int = 224
    window_k: int | None = None
    clamp: int | None = None
    sensor_size: tuple[int, int] | None = None
    seed: int = 0
    representation: str = "evclip"
    num_frames: int = 3  # eventbind: frames per example


@dataclasses.dataclass(eq=False)
class NImagenetConfig(EventConfig):
    """N-ImageNet: ``subset`` "mini" (first 100 sorted WNIDs; train split = classes 0-79, the
    paper's pre-training classes; val split = all 100) or "full" (all classes in both)."""

    subset: str = "mini"


class _EventBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared by the four builders: features from the config, examples from the per-item
    functions of the TFRecord builder, and the evclip manifest of each prepared split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    HAS_IMAGES = False
    HOMEPAGE = ""
    DESCRIPTION = ""

    def _split_items(self, manual_dir: epath.Path
                     ) -> dict[str, tuple[list[records.PairedItem], list[str]]]:
        """split -> (items, class names) of the manual dir, by the layout's rules."""
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        size = cfg.out_size
        shape = records.event_shape(cfg.representation, size, cfg.num_frames)
        if cfg.representation != "evclip" and cfg.clamp is not None:
            raise ValueError(f"{type(self).__name__} config {cfg.name!r}: clamp={cfg.clamp} is "
                             "Eq. 1's count clamp (representation 'evclip'); expected None for "
                             f"representation {cfg.representation!r}")
        if cfg.representation == "evclip":
            name = "event_counts"
            events = tfds.features.Image(shape=(size, size, 1), dtype=np.uint16,
                                         encoding_format="png",
                                         doc="paper Eq. 1 counts of the event window")
        else:
            name = "event_frames"
            events = tfds.features.Tensor(shape=tuple(shape), dtype=np.float32,
                                          encoding=tfds.features.Encoding.ZLIB,
                                          doc=f"{cfg.representation} frames in [0, 1]")
        features = {name: events,
                    # Names come from the manual dir's folders, set in _split_generators.
                    "label": tfds.features.ClassLabel(),
                    "key": tfds.features.Text(doc="path of the event file")}
        if self.HAS_IMAGES:
            features["image"] = tfds.features.Image(
                shape=(size, size, 1), dtype=np.uint8, encoding_format="png",
                doc="paired image, grayscale, CLIP resize and centre crop")
        return tfds.core.DatasetInfo(
            builder=self, description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(features),
            supervised_keys=(name, "label"), homepage=self.HOMEPAGE)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager
                          ) -> dict[str, Iterator[tuple[int, dict]]]:
        # TFDS refuses a missing or empty manual_dir, quoting MANUAL_DOWNLOAD_INSTRUCTIONS.
        manual_dir = epath.Path(dl_manager.manual_dir)
        splits = self._split_items(manual_dir)
        names = {split: names for split, (_, names) in splits.items()}
        first = next(iter(names.values()))
        for split, split_names in names.items():
            if split_names != first:
                raise ValueError(f"{manual_dir}: split {split!r} has classes "
                                 f"{split_names[:5]}...; expected the same classes as the "
                                 f"other splits ({first[:5]}...)")
        self.info.features["label"].names = list(first)
        self._class_counts = {split: [0] * len(first) for split in splits}
        return {split: self._generate_examples(items, split)
                for split, (items, _) in splits.items()}

    def _generate_examples(self, items: list[records.PairedItem], split: str
                           ) -> Iterator[tuple[int, dict]]:
        """One example per item, keyed by its index in the layout's list (the window seed)."""
        cfg = self.builder_config
        counts = cfg.representation == "evclip"
        for index, item in enumerate(items):
            events = records.item_events(
                item, index, split=split, out_size=cfg.out_size, sensor_size=cfg.sensor_size,
                clamp=cfg.clamp, window_k=cfg.window_k, seed=cfg.seed,
                representation=cfg.representation, num_frames=cfg.num_frames)
            example = {"label": item.label, "key": item.event_path}
            if counts:  # the records' PNG bytes, stored as they are
                example["event_counts"] = records.encode_png(events)
            else:
                example["event_frames"] = events.astype(np.float32)
            if self.HAS_IMAGES:
                example["image"] = records.encode_png(
                    records.load_gray_image(item.image_path, cfg.out_size))
            self._class_counts[split][item.label] += 1
            yield index, example

    def _download_and_prepare(self, dl_manager: tfds.download.DownloadManager,
                              download_config: tfds.download.DownloadConfig) -> None:
        super()._download_and_prepare(dl_manager, download_config)
        for split, info in self.info.splits.items():
            path = epath.Path(self.data_dir) / f"{split}.manifest.json"
            path.write_text(json.dumps(self._manifest(split, info), indent=2))

    def _manifest(self, split: str, info: tfds.core.SplitInfo) -> dict:
        """The keys and values ``records.write_tfrecords`` writes for the same items."""
        cfg = self.builder_config
        names = list(self.info.features["label"].names)
        manifest = {
            "format_version": records.FORMAT_VERSION, "split": split,
            "num_examples": info.num_examples, "shards": list(info.filenames),
            "shard_num_examples": list(info.shard_lengths), "shuffled": True,
            "class_names": names, "num_classes": len(names),
            "class_counts": self._class_counts[split],
            "image_size": cfg.out_size, "image_shape": [cfg.out_size] * 2,
            "has_images": self.HAS_IMAGES, "has_captions": False, "teacher_emb_dim": None,
            "representation": cfg.representation,
            "event_shape": records.event_shape(cfg.representation, cfg.out_size,
                                               cfg.num_frames),
            "event_feature": "event_counts" if cfg.representation == "evclip"
            else "event_frames",
            "representation_options": records.representation_options(cfg.representation,
                                                                      cfg.num_frames),
            "window": records.window_rule(split),
            "sensor_size": None if cfg.sensor_size is None else list(cfg.sensor_size),
            "clamp": cfg.clamp, "window_k": cfg.window_k, "seed": cfg.seed,
            "source": f"tfds {self.info.full_name}",
        }
        if cfg.representation == "evclip":
            manifest["event_counts_shape"] = [cfg.out_size] * 2
        return manifest


def _local(manual_dir: epath.Path, *parts: str) -> str:
    """A local path under the manual dir (the layout readers use the local filesystem)."""
    return str(manual_dir.joinpath(*parts))


class NMnist(_EventBuilder):
    """N-MNIST (Orchard et al. 2015): event-only, splits train and test."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Unzip N-MNIST's Train.zip and Test.zip into manual_dir:
    <manual_dir>/Train/<digit>/<n>.bin and <manual_dir>/Test/<digit>/<n>.bin
    """
    BUILDER_CONFIGS = [EventConfig(
        name="evclip", description="Eq. 1 counts of 2000 events, clamp 10, 34x34 sensor",
        window_k=2000, clamp=10, sensor_size=layouts.NMNIST_SENSOR_SIZE)]
    HOMEPAGE = "https://www.garrickorchard.com/datasets/n-mnist"
    DESCRIPTION = "N-MNIST: MNIST digits recorded by an ATIS event camera on a moving base."

    def _split_items(self, manual_dir: epath.Path
                     ) -> dict[str, tuple[list[records.PairedItem], list[str]]]:
        root = _local(manual_dir)
        return {"train": layouts.nmnist_items(root, "Train"),
                "test": layouts.nmnist_items(root, "Test")}


class NCaltech101(_EventBuilder):
    """N-Caltech101 (Orchard et al. 2015) paired with Caltech101's images: split test."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Unzip N-Caltech101's Caltech101.zip and Caltech101's 101_ObjectCategories into manual_dir:
    <manual_dir>/Caltech101/<class>/image_XXXX.bin and
    <manual_dir>/101_ObjectCategories/<class>/image_XXXX.jpg (the same class and index).
    The BACKGROUND_Google folder is left out.
    """
    BUILDER_CONFIGS = [EventConfig(
        name="evclip",
        description="Eq. 1 counts of 30000 events, clamp 20, sensor: per-file max + 1",
        window_k=30_000, clamp=20, sensor_size=None)]
    HAS_IMAGES = True
    HOMEPAGE = "https://www.garrickorchard.com/datasets/n-caltech101"
    DESCRIPTION = ("N-Caltech101: Caltech101 images recorded by an ATIS event camera on a "
                   "moving base, paired with the images.")

    def _split_items(self, manual_dir: epath.Path
                     ) -> dict[str, tuple[list[records.PairedItem], list[str]]]:
        return {"test": layouts.ncaltech101_items(
            _local(manual_dir, "Caltech101"), _local(manual_dir, "101_ObjectCategories"),
            exclude_classes=NCALTECH101_EXCLUDED)}


class Cifar10Dvs(_EventBuilder):
    """CIFAR10-DVS (Li et al. 2017): event-only AEDAT 2.0 recordings, split test."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Unzip CIFAR10-DVS's per-class archives into manual_dir:
    <manual_dir>/<class>/cifar10_<class>_<n>.aedat (classes airplane ... truck).
    """
    # The paper does not evaluate CIFAR10-DVS; the window and clamp follow N-Caltech101's, the
    # other monitor recording.
    BUILDER_CONFIGS = [EventConfig(
        name="evclip", description="Eq. 1 counts of 30000 events, clamp 20, 128x128 sensor",
        window_k=30_000, clamp=20, sensor_size=CIFAR10_DVS_SENSOR_SIZE)]
    HOMEPAGE = "https://figshare.com/articles/dataset/CIFAR10-DVS_New/4724671"
    DESCRIPTION = "CIFAR10-DVS: CIFAR-10 images shown on a monitor and recorded by a DVS128."

    def _split_items(self, manual_dir: epath.Path
                     ) -> dict[str, tuple[list[records.PairedItem], list[str]]]:
        classes = sorted(p.name for p in manual_dir.iterdir() if p.is_dir())
        if not classes:
            raise ValueError(f"{manual_dir}: no class folders; expected "
                             "<manual_dir>/<class>/*.aedat")
        items = [records.PairedItem(str(path), None, label)
                 for label, name in enumerate(classes)
                 for path in sorted((manual_dir / name).glob("*.aedat"))]
        return {"test": (items, classes)}


class NImagenet(_EventBuilder):
    """N-ImageNet (Kim et al. 2021) paired with ImageNet's images: splits train and val."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Put N-ImageNet and the ImageNet images in manual_dir (symbolic links are fine):
    <manual_dir>/N_Imagenet/extracted_train/<wnid>/<stem>.npz
    <manual_dir>/N_Imagenet/extracted_val/<wnid>/<stem>.npz
    <manual_dir>/imagenet/train/<wnid>/<stem>.JPEG
    <manual_dir>/imagenet/val/<stem>.JPEG (or val/<wnid>/<stem>.JPEG)
    and optionally <manual_dir>/LOC_synset_mapping.txt for the class names (else the WNIDs).
    """
    BUILDER_CONFIGS = [
        NImagenetConfig(name="mini", subset="mini",
                        description="first 100 WNIDs; train: classes 0-79, val: all 100",
                        window_k=30_000, sensor_size=layouts.NIMAGENET_SENSOR_SIZE),
        NImagenetConfig(name="full", subset="full", description="all classes",
                        window_k=30_000, sensor_size=layouts.NIMAGENET_SENSOR_SIZE),
    ]
    HAS_IMAGES = True
    HOMEPAGE = "https://github.com/82magnolia/n_imagenet"
    DESCRIPTION = ("N-ImageNet: ImageNet images recorded by a moving event camera, paired with "
                   "the images.")

    def _split_items(self, manual_dir: epath.Path
                     ) -> dict[str, tuple[list[records.PairedItem], list[str]]]:
        cfg = self.builder_config
        mapping = manual_dir / "LOC_synset_mapping.txt"
        common = {"image_root": _local(manual_dir, "imagenet"), "subset": cfg.subset,
                  "synset_mapping": str(mapping) if mapping.exists() else None}
        events = _local(manual_dir, "N_Imagenet")
        return {
            "train": layouts.nimagenet_items(
                events, "extracted_train", image_split="train",
                classes="pretrain" if cfg.subset == "mini" else "all", **common),
            "val": layouts.nimagenet_items(events, "extracted_val", image_split="val",
                                           classes="all", **common),
        }
