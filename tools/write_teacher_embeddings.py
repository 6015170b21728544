r"""Writes the frozen image tower's embeddings into existing record splits, so that a run with
``--config.data.teacher_emb=True`` reads them instead of running the image tower every step
(the cached-teacher step).

One pass over each split, in file order: each record's paired image (its ``image`` feature)
becomes the image tower's input (``embed.images_to_tower_input``), and the projected float32
embedding [D] (unnormalised, as the step's frozen tower gives it) goes into the record's
``teacher_emb``; every other feature stays as it was. Batches are sharded over all local
devices (a data-parallel mesh; the last batch is padded). The new shards are written under
temporary names, and only once every one is complete do they replace the old shards, with the
manifest (``teacher_emb_dim`` set) written last (``records.publish_split``); a failed run
leaves the split as it was.

Train with the same model as ``--checkpoint`` (``config.model.checkpoint``). The embeddings are
of the stored image: with augmentation on, a step's event frames are cropped and flipped, while
its cached image side is the un-augmented image's.

    python tools/write_teacher_embeddings.py --data_dir=/data/tfr/nimagenet_mini \
      --checkpoint=/ckpt/vitl14_evclip --split=train --batch_size=1024
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import numpy as np
from absl import app, flags

from evclip_jax import checkpoints, config_base, embed, sharding, step
from evclip_jax.data import record_codec, records
from evclip_jax.models.clip import CLIPConfig

_DATA_DIR = flags.DEFINE_string("data_dir", None, "folder of the record splits")
_SPLIT = flags.DEFINE_list("split", [], "splits to fill in; empty: every split of --data_dir")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "the model whose image tower embeds the images: an HF CLIP dir, an "
    "evclip dir, a training workdir or an OpenAI-layout checkpoint file")
_BATCH = flags.DEFINE_integer("batch_size", 256,
                              "images per step over all devices (rounded up to a multiple of "
                              "the device count)")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "compute dtype of the image tower (params stay float32)")

Embedder = Callable[[np.ndarray], jax.Array]


def make_image_embedder(clip_config: CLIPConfig, image_params: dict,
                        devices: list[jax.Device], dtype: str = "float32") -> Embedder:
    """gray uint8 [B, S, S] (B a multiple of ``len(devices)``) -> the image tower's float32
    embeddings [B, D], sharded over a data-parallel mesh of ``devices`` and returned without
    waiting for them (so the host writes the previous batch meanwhile)."""
    config = config_base.base_config()
    config.model.dtype = dtype
    vision = step.make_towers(config, clip_config).vision
    mesh = sharding.make_mesh(data=-1, devices=devices)
    params = jax.device_put(image_params, sharding.replicated(mesh))
    embed_gray = jax.jit(
        lambda p, gray: embed.embed_vision(vision, p, embed.images_to_tower_input(gray)),
        in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh, 3)),
        out_shardings=sharding.replicated(mesh))
    return lambda gray: embed_gray(params, gray)


def split_names(data_dir: str) -> list[str]:
    """Every split with a manifest in ``data_dir``, sorted; ValueError naming it if none."""
    import tensorflow as tf

    suffix = ".manifest.json"
    found = tf.io.gfile.glob(os.path.join(data_dir, "*" + suffix))
    if not found:
        raise ValueError(f"--data_dir={data_dir}: no <split>{suffix} in it")
    return sorted(os.path.basename(path)[:-len(suffix)] for path in found)


def write_split(data_dir: str, split: str, embed_images: Embedder, *, batch_size: int,
                image_size: int, progress: bool = True) -> dict:
    """Rewrites ``split`` with every record's ``teacher_emb`` (module docstring); returns the
    new manifest. ``batch_size`` is a multiple of the embedder's device count; ``image_size``
    is the model's (checked against the records)."""
    import tensorflow as tf
    from tqdm import tqdm

    manifest = records.read_manifest(data_dir, split)
    where = records.manifest_path(data_dir, split)
    if not manifest.get("has_images", True):
        raise ValueError(f"{where}: the records have no paired images; the image tower needs "
                         "them (has_images true)")
    size = int(manifest["image_size"])
    if size != image_size:
        raise ValueError(f"{where}: the records' images are {size} px; the model's image tower "
                         f"takes {image_size} px")

    def parse(serialized):
        parsed = record_codec.parse_example(serialized, size,
                                            **record_codec.record_format(manifest))
        return serialized, parsed["image"]

    partial, emb_dim = [], None
    try:
        with tqdm(total=int(manifest["num_examples"]), desc=f"{split} teacher_emb",
                  disable=not progress) as bar:
            for name, expected in zip(manifest["shards"], manifest["shard_num_examples"],
                                      strict=True):
                shard = os.path.join(data_dir, name)
                partial.append(shard + records.PARTIAL_SUFFIX)
                compression = manifest["compression"] or ""  # written as it was read
                batches = (tf.data.TFRecordDataset(shard, compression_type=compression)
                           .map(parse, num_parallel_calls=tf.data.AUTOTUNE)
                           .batch(batch_size).prefetch(2))
                with tf.io.TFRecordWriter(partial[-1], options=compression) as writer:
                    count, dim = _write_shard(shard, batches, embed_images, writer,
                                              batch_size, bar)
                emb_dim = dim or emb_dim
                if count != expected:
                    raise ValueError(f"{shard}: {count} records; {where} says {expected}")
    except BaseException:  # a bad shard, Ctrl-C: the split stays as it was
        for path in partial:
            if tf.io.gfile.exists(path):
                tf.io.gfile.remove(path)
        raise
    manifest = {**manifest, "teacher_emb_dim": emb_dim}
    records.publish_split(data_dir, split, partial, manifest)
    return manifest


def _write_shard(shard: str, batches, embed_images: Embedder, writer, batch_size: int,
                 bar) -> tuple[int, int | None]:
    """Writes one shard's records with their embeddings; returns the record count and the
    embedding width (None for an empty shard). The next batch is on the devices while the host
    writes the previous one."""
    import tensorflow as tf

    pending, count, emb_dim = None, 0, None

    def write(serialized, emb) -> None:
        emb = np.asarray(emb)[:len(serialized)]
        for record, row in zip(serialized, emb, strict=True):
            writer.write(record_codec.with_teacher_emb(record, row))
        bar.update(len(serialized))

    try:
        for serialized, gray in batches.as_numpy_iterator():
            padded = np.zeros((batch_size, *gray.shape[1:]), np.uint8)
            padded[:len(gray)] = gray
            emb = embed_images(padded)
            emb_dim = int(emb.shape[1])
            if pending is not None:
                write(*pending)
            pending, count = (serialized, emb), count + len(serialized)
    except tf.errors.OpError as e:  # a truncated or corrupt shard, an undecodable image
        raise ValueError(f"{shard}: cannot read its records ({e.message.splitlines()[0]})") \
            from e
    if pending is not None:
        write(*pending)
    return count, emb_dim


def main(argv: list[str]) -> None:
    del argv
    clip_config, params, _ = checkpoints.load_model(_CHECKPOINT.value, "--checkpoint")
    devices = jax.local_devices()
    batch_size = -(-max(_BATCH.value, 1) // len(devices)) * len(devices)
    embed_images = make_image_embedder(clip_config, params["image_tower"], devices,
                                       _DTYPE.value)
    for split in _SPLIT.value or split_names(_DATA_DIR.value):
        manifest = write_split(_DATA_DIR.value, split, embed_images, batch_size=batch_size,
                               image_size=clip_config.vision.image_size)
        print(f"{records.manifest_path(_DATA_DIR.value, split)}: {manifest['num_examples']} "
              f"records with teacher_emb [{manifest['teacher_emb_dim']}]", flush=True)


if __name__ == "__main__":
    flags.mark_flags_as_required(["data_dir", "checkpoint"])
    app.run(main)
