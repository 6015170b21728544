r"""Builds paired event/image TFRecords (+ <split>.manifest.json) from a dataset layout.

Layouts (pairing rules in evclip_jax/data/layouts.py; record format in
evclip_jax/data/records.py):
  nimagenet    <event_root>/<split>/<wnid>/*.npz, images <image_root>/<split>/<wnid>/<stem>.JPEG
  ncaltech101  <event_root>/<class>/image_XXXX.bin, images <image_root>/<class>/image_XXXX.jpg
  nmnist       <event_root>/<split>/<digit>/*.bin (images optional)
  list         --list_file CSV rows event_path,image_path,label (relative to the CSV)

Per-layout defaults (METHOD.md): window_k 30000/30000/2000, clamp None/20/10, sensor 640x480 /
per-file max coordinate + 1 / 34x34. --representation picks what the records store: evclip
(paper Eq. 1 counts, the default), eventclip (EventCLIP histogram) or eventbind
(--num_frames EventBind frames of fixed-count windows); the clamp applies to evclip only.
--encoding=raw stores the arrays' bytes (no image codec to read: the host only copies them),
--compression=GZIP|ZLIB compresses the shards (smaller, at a CPU cost per read), and
--windows=K stores K random event windows per training record (the pipeline draws one per
epoch, as the paper takes a random window each time an example is seen; other splits keep
the one fixed evaluation window). tools/bench_data.py measures bytes and host cost of each.

    python tools/build_tfrecords.py --layout=nimagenet --event_root=/data/N_Imagenet \
      --source_split=extracted_train --image_root=/data/imagenet --image_split=train \
      --split=train --classes=pretrain \
      --synset_mapping=/data/LOC_synset_mapping.txt --out_dir=/data/tfr/nimagenet_mini \
      --num_shards=64 --encoding=raw --windows=4
    python tools/build_tfrecords.py --layout=ncaltech101 --event_root=/data/N-Caltech101 \
      --out_dir=/data/tfr/ncaltech101 --split=test
"""

from __future__ import annotations

import sys
import time

from absl import app, flags

from evclip_jax.data import layouts, records
from evclip_jax.events import frames

_LAYOUT = flags.DEFINE_enum("layout", None, ["nimagenet", "ncaltech101", "nmnist", "list"],
                            "source dataset layout")
_EVENT_ROOT = flags.DEFINE_string("event_root", None, "root of the event files")
_IMAGE_ROOT = flags.DEFINE_string("image_root", None, "root of the paired images (optional)")
_LIST_FILE = flags.DEFINE_string("list_file", None, "CSV event_path,image_path,label (list)")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "output folder for shards and manifest")
_SPLIT = flags.DEFINE_string(
    "split", "train", "split name: names the shards and manifest and, for nimagenet/nmnist, "
    "the source sub-folder; train*/pretrain* splits get random windows and are shuffled")
_SOURCE_SPLIT = flags.DEFINE_string(
    "source_split", None, "source sub-folder if it differs from --split (e.g. extracted_val)")
_IMAGE_SPLIT = flags.DEFINE_string(
    "image_split", None, "nimagenet: image sub-folder if it differs from the source split")
_OUT_SIZE = flags.DEFINE_integer("out_size", 224, "frame and image side")
_CLAMP = flags.DEFINE_integer("clamp", None, "count clamp; default per layout, 0 = none")
_WINDOW_K = flags.DEFINE_integer("window_k", None,
                                 "events per window; default per layout, 0 = whole file")
_SENSOR = flags.DEFINE_list("sensor_size", None,
                            "H,W of the sensor; default per layout (none: per-file max + 1)")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 16, "TFRecord shards")
_SEED = flags.DEFINE_integer("seed", 0, "window and shuffle seed")
_CLASSES = flags.DEFINE_enum("classes", "pretrain", ["pretrain", "heldout", "all"],
                             "nimagenet: classes 0-79, 80-99 or all of the subset")
_SUBSET = flags.DEFINE_enum("subset", "mini", ["mini", "full"],
                            "nimagenet: first 100 sorted WNIDs or all")
_SYNSET = flags.DEFINE_string("synset_mapping", None,
                              "nimagenet: LOC_synset_mapping.txt for class names")
_EXCLUDE = flags.DEFINE_list("exclude_classes", [], "ncaltech101: class folders to leave out")
_CLASS_NAMES = flags.DEFINE_string("class_names", None,
                                   "list: text file with one class name per line")
_REPRESENTATION = flags.DEFINE_enum("representation", "evclip", list(frames.REPRESENTATIONS),
                                    "event representation the records store")
_NUM_FRAMES = flags.DEFINE_integer("num_frames", 3, "eventbind: frames per example")
_ENCODING = flags.DEFINE_enum("encoding", "png", list(records.ENCODINGS),
                              "png: PNG counts and images; raw: their bytes (no codec to read)")
_COMPRESSION = flags.DEFINE_enum("compression", "none", ["none", "GZIP", "ZLIB"],
                                 "TFRecord shard compression")
_WINDOWS = flags.DEFINE_integer("windows", 1, "event windows per record of a training split")

# layout -> (window_k, clamp, sensor_size (H, W))
LAYOUT_DEFAULTS = {
    "nimagenet": (30_000, None, layouts.NIMAGENET_SENSOR_SIZE),
    "ncaltech101": (30_000, 20, None),
    "nmnist": (2_000, 10, layouts.NMNIST_SENSOR_SIZE),
    "list": (None, None, None),
}


def _items() -> tuple[list[records.PairedItem], list[str]]:
    layout, root = _LAYOUT.value, _EVENT_ROOT.value
    source = _SOURCE_SPLIT.value or _SPLIT.value
    if layout != "list" and not root:
        raise app.UsageError(f"--event_root is required for --layout={layout}")
    if layout == "nimagenet":
        return layouts.nimagenet_items(root, source, _IMAGE_ROOT.value, subset=_SUBSET.value,
                                       classes=_CLASSES.value, synset_mapping=_SYNSET.value,
                                       image_split=_IMAGE_SPLIT.value)
    if layout == "ncaltech101":
        return layouts.ncaltech101_items(root, _IMAGE_ROOT.value, exclude_classes=_EXCLUDE.value)
    if layout == "nmnist":
        return layouts.nmnist_items(root, source, _IMAGE_ROOT.value)
    if not _LIST_FILE.value:
        raise app.UsageError("--list_file is required for --layout=list")
    names = None
    if _CLASS_NAMES.value:
        with open(_CLASS_NAMES.value) as f:
            names = [line.strip() for line in f if line.strip()]
    return layouts.list_items(_LIST_FILE.value, names)


def main(argv: list[str]) -> None:
    del argv
    window_k, clamp, sensor = LAYOUT_DEFAULTS[_LAYOUT.value]
    if _WINDOW_K.value is not None:
        window_k = _WINDOW_K.value or None
    if _CLAMP.value is not None:
        clamp = _CLAMP.value or None
    if _REPRESENTATION.value != "evclip":
        if _CLAMP.value:
            raise app.UsageError(f"--clamp: the count clamp is Eq. 1's; "
                                 f"--representation={_REPRESENTATION.value} takes none")
        clamp = None
    if _SENSOR.value:
        if len(_SENSOR.value) != 2:
            raise app.UsageError(f"--sensor_size: expected H,W; got {_SENSOR.value}")
        sensor = tuple(int(s) for s in _SENSOR.value)
    items, class_names = _items()
    print(f"{len(items)} items, {len(class_names)} classes; representation="
          f"{_REPRESENTATION.value} window_k={window_k} windows={_WINDOWS.value} clamp={clamp} "
          f"encoding={_ENCODING.value} compression={_COMPRESSION.value} "
          f"sensor_size={sensor or 'per-file max + 1'} out_size={_OUT_SIZE.value}")
    start = time.perf_counter()
    try:
        manifest = records.write_tfrecords(
            items, _OUT_DIR.value, class_names=class_names, out_size=_OUT_SIZE.value,
            sensor_size=sensor, clamp=clamp, window_k=window_k, num_shards=_NUM_SHARDS.value,
            split=_SPLIT.value, seed=_SEED.value, representation=_REPRESENTATION.value,
            num_frames=_NUM_FRAMES.value, encoding=_ENCODING.value,
            compression=None if _COMPRESSION.value == "none" else _COMPRESSION.value,
            num_windows=_WINDOWS.value, progress=True)
    except ValueError as e:  # a bad item or setting, named; nothing was published
        sys.exit(f"error: {e}\nThe records of split {_SPLIT.value!r} in {_OUT_DIR.value} are as "
                 "they were before this build (shards are published with their manifest, last).")
    seconds = time.perf_counter() - start
    present = sum(1 for c in manifest["class_counts"] if c)
    print(f"wrote {manifest['num_examples']} records ({present} classes) in "
          f"{len(manifest['shards'])} shards to {_OUT_DIR.value} in {seconds:.1f} s "
          f"({manifest['num_examples'] / max(seconds, 1e-9):.1f} records/s); manifest "
          f"{records.manifest_path(_OUT_DIR.value, _SPLIT.value)}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["layout", "out_dir"])
    app.run(main)
