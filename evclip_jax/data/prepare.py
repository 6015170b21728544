"""Where a run's TFRecords come from: ``config.data.dir``, or a synthetic set built on first use."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
from jax.experimental import multihost_utils

from evclip_jax.data import records
from evclip_jax.data.synthetic import make_synthetic_dataset


def prepare_data(config, workdir: Path, image_size: int) -> Path:
    """The TFRecord dir; a synthetic config builds its dataset there on first use."""
    s = config.data.synthetic
    if s.enabled:
        data_dir = Path(config.data.dir or workdir / "data")
        # Every split's manifest: a build killed between two splits is built again.
        built = all(Path(records.manifest_path(data_dir, split)).is_file() for split in s.splits)
        if not built and jax.process_index() == 0:
            logging.info("building the synthetic dataset in %s", data_dir)
            make_synthetic_dataset(data_dir, num_classes=s.num_classes, per_class=s.per_class,
                                   image_size=image_size, seed=s.seed, splits=dict(s.splits),
                                   num_shards=s.num_shards,
                                   representation=config.data.representation,
                                   num_frames=config.data.num_frames)
        multihost_utils.sync_global_devices("synthetic data written")  # before others read it
        return data_dir
    if not config.data.dir:
        raise ValueError("config.data.dir: empty; expected a dir of TFRecord shards with "
                         "<split>.manifest.json (tools/build_tfrecords.py writes one)")
    records.read_manifest(config.data.dir, config.data.train_split)  # names a missing path
    return Path(config.data.dir)
