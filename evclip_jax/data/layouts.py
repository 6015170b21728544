"""Dataset layouts -> ``PairedItem`` lists: N-ImageNet, N-Caltech101, N-MNIST, a CSV list.

Each builder walks a real dataset's folders (classes sorted, files sorted), pairs every event
file with its image by the layout's rule (same stem; the rules are in each docstring) and
returns ``(items, class_names)`` for ``evclip_jax.data.records.write_tfrecords``. A missing
paired image raises ValueError naming the event file and the image folder.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

from evclip_jax.data.records import PairedItem

IMAGE_EXTENSIONS = (".JPEG", ".jpeg", ".jpg", ".JPG", ".png", ".PNG")

# N-ImageNet "mini" (METHOD.md "Data and splits"): the first 100 sorted WNIDs; classes 0-79
# are pre-trained on, 80-99 are the held-out zero-/few-shot evaluation classes.
NIMAGENET_MINI_CLASSES = 100
NIMAGENET_PRETRAIN_CLASSES = 80
NIMAGENET_SENSOR_SIZE = (480, 640)  # (H, W) of the 640x480 sensor
NMNIST_SENSOR_SIZE = (34, 34)



def _sorted_dirs(path: str) -> list[str]:
    if not os.path.isdir(path):
        raise ValueError(f"{path}: directory not found")
    return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))


def _sorted_files(path: str, suffixes: tuple[str, ...]) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.lower().endswith(suffixes)
                  and os.path.isfile(os.path.join(path, f)))


class _ImageIndex:
    """Finds ``<folder>/<stem>.<ext>`` images by listing each folder once (no stat per file)."""

    def __init__(self) -> None:
        self._folders: dict[str, dict[str, str]] = {}

    def find(self, folder: str, stem: str) -> str | None:
        if folder not in self._folders:
            found: dict[str, str] = {}
            if os.path.isdir(folder):
                # Sorted, so the first extension in IMAGE_EXTENSIONS order wins deterministically.
                for name in sorted(os.listdir(folder), key=_extension_rank):
                    base, ext = os.path.splitext(name)
                    if ext in IMAGE_EXTENSIONS:
                        found.setdefault(base, os.path.join(folder, name))
            self._folders[folder] = found
        return self._folders[folder].get(stem)


def _extension_rank(name: str) -> tuple[int, str]:
    ext = os.path.splitext(name)[1]
    return (IMAGE_EXTENSIONS.index(ext) if ext in IMAGE_EXTENSIONS else len(IMAGE_EXTENSIONS),
            name)


def _raise_missing_images(missing: list[str], image_dir: str) -> None:
    if missing:
        raise ValueError(
            f"{image_dir}: no paired image for {len(missing)} event file(s), e.g. "
            f"{missing[0]}; expected an image with the same stem (extensions "
            f"{', '.join(IMAGE_EXTENSIONS)})")


def read_synset_mapping(path: str) -> dict[str, str]:
    """WNID -> class name from a LOC_synset_mapping.txt file ("n01440764 tench, Tinca tinca")."""
    mapping = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            wnid, _, name = line.partition(" ")
            if not wnid.startswith("n") or not name:
                raise ValueError(f"{path}:{lineno}: expected '<wnid> <names>', got {line!r}")
            mapping[wnid] = name.strip()
    return mapping


def nimagenet_items(
    event_root: str,
    split: str = "train",
    image_root: str | None = None,
    *,
    subset: str = "mini",
    classes: str = "pretrain",
    synset_mapping: str | None = None,
    image_split: str | None = None,
) -> tuple[list[PairedItem], list[str]]:
    """N-ImageNet items from ``<event_root>/<split>/<wnid>/*.npz``.

    Classes: all WNIDs, sorted (from ``synset_mapping`` when given, else the class folders);
    ``subset="mini"`` keeps the first 100. ``classes`` picks "pretrain" (labels 0-79),
    "heldout" (80-99) or "all"; labels always index the returned class names (the whole subset),
    so held-out labels are 80-99. Names come from the synset mapping file, else the WNID.

    Pairing rule: ``<wnid>/<stem>.npz`` pairs with ``<image_root>/<isplit>/<wnid>/<stem>.<ext>``,
    or ``<image_root>/<isplit>/<stem>.<ext>`` (ImageNet's flat val folder), ext in
    IMAGE_EXTENSIONS; ``isplit`` is ``image_split`` (default ``split``; e.g. N-ImageNet's
    "extracted_train" events pair with ImageNet's "train"). ``image_root`` None gives
    event-only items.
    """
    split_dir = os.path.join(event_root, split)
    present = _sorted_dirs(split_dir)
    names = read_synset_mapping(synset_mapping) if synset_mapping else {}
    wnids = sorted(names) if names else present
    if subset == "mini":
        wnids = wnids[:NIMAGENET_MINI_CLASSES]
    elif subset != "full":
        raise ValueError(f"subset must be 'mini' or 'full'; got {subset!r}")
    if classes == "pretrain":
        chosen = range(min(NIMAGENET_PRETRAIN_CLASSES, len(wnids)))
    elif classes == "heldout":
        chosen = range(NIMAGENET_PRETRAIN_CLASSES, len(wnids))
    elif classes == "all":
        chosen = range(len(wnids))
    else:
        raise ValueError(f"classes must be 'pretrain', 'heldout' or 'all'; got {classes!r}")

    items, missing = [], []
    image_dir = None if image_root is None else os.path.join(image_root, image_split or split)
    images = _ImageIndex()
    for label in chosen:
        wnid = wnids[label]
        class_dir = os.path.join(split_dir, wnid)
        if not os.path.isdir(class_dir):
            raise ValueError(f"{class_dir}: class folder not found (class {label} of the "
                             f"{subset} subset)")
        for name in _sorted_files(class_dir, (".npz",)):
            event_path = os.path.join(class_dir, name)
            stem = os.path.splitext(name)[0]
            image_path = None
            if image_dir is not None:
                image_path = (images.find(os.path.join(image_dir, wnid), stem)
                              or images.find(image_dir, stem))
                if image_path is None:
                    missing.append(event_path)
            items.append(PairedItem(event_path, image_path, label))
    if image_dir is not None:
        _raise_missing_images(missing, image_dir)
    return items, [names.get(w, w) for w in wnids]


def ncaltech101_items(
    event_root: str,
    image_root: str | None = None,
    *,
    exclude_classes: Sequence[str] = (),
) -> tuple[list[PairedItem], list[str]]:
    """N-Caltech101 items from ``<event_root>/<class>/image_XXXX.bin`` (classes sorted).

    Pairing rule: ``<class>/image_XXXX.bin`` pairs with ``<image_root>/<class>/image_XXXX.jpg``
    (Caltech101's 101_ObjectCategories, same index). ``exclude_classes`` drops folders such as
    "BACKGROUND_Google".
    """
    class_names = [c for c in _sorted_dirs(event_root) if c not in set(exclude_classes)]
    items, missing = [], []
    images = _ImageIndex()
    for label, name in enumerate(class_names):
        class_dir = os.path.join(event_root, name)
        for fname in _sorted_files(class_dir, (".bin",)):
            event_path = os.path.join(class_dir, fname)
            image_path = None
            if image_root is not None:
                image_path = images.find(os.path.join(image_root, name),
                                         os.path.splitext(fname)[0])
                if image_path is None:
                    missing.append(event_path)
            items.append(PairedItem(event_path, image_path, label))
    if image_root is not None:
        _raise_missing_images(missing, image_root)
    return items, class_names


def nmnist_items(
    event_root: str,
    split: str = "Test",
    image_root: str | None = None,
) -> tuple[list[PairedItem], list[str]]:
    """N-MNIST items from ``<event_root>/<split>/<digit>/*.bin``; labels are the digits.

    Optional images pair by stem: ``<image_root>/<split>/<digit>/<stem>.<ext>``.
    """
    split_dir = os.path.join(event_root, split)
    digits = _sorted_dirs(split_dir)
    if not digits or any(not d.isdigit() for d in digits):
        raise ValueError(f"{split_dir}: expected digit folders 0-9; found {digits}")
    class_names = [str(d) for d in range(max(int(d) for d in digits) + 1)]
    items, missing = [], []
    images = _ImageIndex()
    for digit in digits:
        class_dir = os.path.join(split_dir, digit)
        for fname in _sorted_files(class_dir, (".bin",)):
            event_path = os.path.join(class_dir, fname)
            image_path = None
            if image_root is not None:
                image_path = images.find(os.path.join(image_root, split, digit),
                                         os.path.splitext(fname)[0])
                if image_path is None:
                    missing.append(event_path)
            items.append(PairedItem(event_path, image_path, int(digit)))
    if image_root is not None:
        _raise_missing_images(missing, os.path.join(image_root, split))
    return items, class_names


def list_items(
    list_file: str, class_names: Sequence[str] | None = None
) -> tuple[list[PairedItem], list[str]]:
    """Items from a CSV ``event_path,image_path,label`` (optional header; empty image -> None).

    Relative paths are taken relative to the CSV's folder. Class names default to the label
    numbers ("0", "1", ...).
    """
    base = os.path.dirname(os.path.abspath(list_file))
    items = []
    with open(list_file, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip():
                continue
            if lineno == 1 and row[-1].strip() == "label":
                continue
            if len(row) != 3:
                raise ValueError(f"{list_file}:{lineno}: expected 3 columns "
                                 f"event_path,image_path,label; got {row}")
            event_path, image_path, label = (c.strip() for c in row)
            try:
                label = int(label)
            except ValueError as e:
                raise ValueError(f"{list_file}:{lineno}: label {label!r} is not an integer") \
                    from e
            items.append(PairedItem(os.path.join(base, event_path),
                                    os.path.join(base, image_path) if image_path else None,
                                    label))
    if not items:
        raise ValueError(f"{list_file}: no rows")
    if class_names is None:
        class_names = [str(i) for i in range(max(item.label for item in items) + 1)]
    return items, list(class_names)
