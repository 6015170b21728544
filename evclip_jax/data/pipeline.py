"""tf.data input pipeline: paired TFRecords -> per-host batches -> global jax.Arrays.

With data/augment.py and data/bad_records.py, the only library modules that import TensorFlow at
top level.
A batch (B rows per host; S = the records' ``image_size``, T = ``num_frames``):

* "events" float32, the event tower's input exactly as
  ``evclip_jax.embed.events_to_tower_input(frames, representation)`` makes it from the
  frames of the manifest's ``representation`` (evclip_jax.data.records): ``evclip``
  [B, S, S, 3] = (E - 0.5) * 2 of the Eq. 1 frame E = counts / (max + 1), replicated, in
  [-1, 1) (no CLIP mean/std, as the release); ``eventclip`` [B, S, S, 3] and ``eventbind``
  [B, T, S, S, 3]: the [0, 1] frames, CLIP mean/std normalised (``embed.CLIP_MEAN``, ...).
* "images" float32 [B, S, S, 3]: ``embed.images_to_tower_input`` of the gray paired images
  (0..255; black when the records have none).
* "labels" int32 [B]; "mask" bool [B] (False on evaluation padding, labels PAD_LABEL);
  optional "teacher_emb" float32 [B, D].
The tf maps here are twins of embed's jnp functions, and tested against them.

Determinism does not depend on parallelism: the record order is a function of (seed, epoch)
only (seeded piece order, deterministic interleave, seeded shuffle buffer), and every random
augmentation is a stateless op seeded by (seed, epoch, global record index). So an iterator
resumed at ``start_step`` yields exactly the batches an uninterrupted one yields from there.

Host sharding: host h of P reads the contiguous block of global record indices
[h*N//P, (h+1)*N//P) -- disjoint, covering, and each host only opens the shards that overlap
its block. The writer shuffles training splits, so blocks mix classes.

Note: tf.data seeds are combined with TensorFlow's global seed; calling
``tf.random.set_seed`` changes the order (not the augmentations).

Nothing here hangs: a shard that is missing when its turn comes is fatal at once, naming it;
skipping bad records gives up past ``max_bad_fraction``; ``global_batches`` fetches on a
background thread, so the caller's thread keeps handling signals (a preemption save while
input is stuck) and ends the run when no batch comes for ``stall_timeout_s``.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import tensorflow as tf
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from evclip_jax import embed
from evclip_jax.data.augment import Augment, check_augment
from evclip_jax.data.bad_records import BadRecordCounter, Checks, existing, readable
from evclip_jax.data.bad_records import BadRecordError as BadRecordError  # raised through here
from evclip_jax.data.records import manifest_path, parse_example, read_manifest
from evclip_jax.events.frames import counts_to_frame_tf

# Functions given to tf.data hold no Python control flow on tensors: skip AutoGraph's
# source conversion, which costs seconds of tracing per dataset.
_plain = tf.autograph.experimental.do_not_convert
DEFAULT_SHUFFLE_BUFFER = 10_000
PAD_LABEL = -1
_DECODE_GROUP = 32  # records per error-catching decode group (at most 63: an int64 bitmask)
_BOOKKEEPING = ("pos", "bad", "bad_shard", "bad_index", "index", "shard")
DEFAULT_STALL_TIMEOUT_S = 600.0
_POLL_S = 0.2  # how often a waiting consumer looks at its interrupt flag


class InputStallError(RuntimeError):
    """The input pipeline yielded no batch for stall_timeout_s seconds."""


def make_dataset(
    data_dir: str | os.PathLike,
    split: str,
    *,
    global_batch_size: int,
    out_size: int,
    train: bool,
    seed: int,
    augment: Mapping[str, Any] | None = None,
    paired_aug: bool = True,
    skip_bad_records: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
    teacher_emb: bool = False,
    start_step: int = 0,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    deterministic: bool = True,
    bad_records: BadRecordCounter | None = None,
    representation: str | None = None,
    max_bad_fraction: float | None = None,
) -> tf.data.Dataset:
    """Per-host batches (dicts of tensors; ``as_numpy_iterator`` gives NumPy) of a split.

    Args:
      data_dir, split: where ``<split>.manifest.json`` and its shards are.
      global_batch_size: batch over all hosts; each host yields global_batch_size // P rows.
      out_size: must equal the records' ``image_size``.
      train: True: seeded per-epoch shuffle, augmentation, endless repeat, full batches.
        False: file order, no augmentation, one pass, the last batch padded to full size with
        "mask" False (labels PAD_LABEL); every host yields the same number of batches.
      seed: drives the order and the augmentations.
      augment: None (off) or a dict-like with keys of ``augment.RELEASE_AUGMENT`` (train
        only). Event frames are resampled nearest-neighbour, every channel and frame alike;
        Eq. 1 counts are shifted before the frame is normalised (the release shifts events).
      paired_aug: True: one geometric transform for the event frames and the image of a pair
        (evclip_jax default, METHOD.md). False: independent draws for each, as the release's
        separate event/image transforms.
      skip_bad_records: False: a bad record (undecodable, a label outside the manifest's
        classes) or corrupt/truncated shard raises an error naming the shard. True: skip it,
        count it in ``bad_records`` and log to stderr (at 1, 2, 4, ... skipped records). Gives
        up (BadRecordError) once an epoch's worth of records is read without a good one (it
        would loop forever), or more than ``max_bad_fraction`` of the records read (of an
        epoch's at least) are bad.
        A shard missing when its turn comes is always fatal, naming it.
      process_index, process_count: host sharding; default jax.process_index()/count().
      teacher_emb: also yield "teacher_emb" [B, D] (records must have it).
      start_step: resume: yield the batches a fresh iterator yields from this step on
        (train only; exact as long as no records are skipped as bad).
      shuffle_buffer: records in the shuffle buffer (train).
      deterministic: keep element order fixed across parallel map/interleave.
      bad_records: counter to add skipped records to (with skip_bad_records).
      representation: what the caller expects the records to hold
        (``config.data.representation``); None takes the manifest's. A different one raises
        ValueError naming the manifest.
      max_bad_fraction: with skip_bad_records, the share of bad records tolerated, in [0, 1);
        None: any share short of all.
    """
    _hide_gpus_from_tf()
    data_dir = os.fspath(data_dir)
    manifest = read_manifest(data_dir, split)
    where = manifest_path(data_dir, split)
    stored = manifest["representation"]
    if representation is not None and representation != stored:
        raise ValueError(f"{where}: the records hold the {stored!r} event representation; "
                         f"config.data.representation={representation!r}. Rebuild the records "
                         f"with --representation={representation} or set "
                         f"config.data.representation={stored!r}")
    if manifest["image_size"] != out_size:
        raise ValueError(f"{where}: records are {manifest['image_size']} px; out_size={out_size}")
    emb_dim = manifest.get("teacher_emb_dim") if teacher_emb else None
    if teacher_emb and not emb_dim:
        raise ValueError(f"{where}: teacher_emb=True but the records have no teacher_emb")
    if not train and start_step:
        raise ValueError(f"start_step={start_step} is only supported with train=True")
    if not train and augment:
        raise ValueError("augment must be None with train=False (evaluation is deterministic)")
    if max_bad_fraction is not None and not 0 <= max_bad_fraction < 1:
        raise ValueError(f"max_bad_fraction={max_bad_fraction}: expected a share in [0, 1)")
    aug = check_augment(augment)

    pindex = jax.process_index() if process_index is None else int(process_index)
    pcount = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= pindex < pcount:
        raise ValueError(f"process_index {pindex} outside [0, {pcount})")
    if global_batch_size % pcount:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by "
                         f"process_count {pcount}")
    batch = global_batch_size // pcount
    num_examples = int(manifest["num_examples"])
    pieces = _host_pieces(data_dir, manifest, pindex, pcount)
    host_records = sum(p[2] for p in pieces)
    if host_records == 0:
        raise ValueError(f"{where}: host {pindex} of {pcount} gets no records "
                         f"({num_examples} in the split)")

    if train:
        consumed = start_step * batch
        first_epoch, skip_first = consumed // host_records, consumed % host_records
    else:
        first_epoch, skip_first = 0, 0
    counter = bad_records if bad_records is not None else BadRecordCounter()
    checks = Checks(skip_bad_records, counter, num_classes=len(manifest["class_names"]),
                     max_bad=max_bad_fraction, epoch_records=host_records)
    reader = _Reader(pieces, seed=seed, train=train, shuffle_buffer=shuffle_buffer,
                     checks=checks)

    if train:
        epochs = tf.data.Dataset.counter(start=first_epoch)
    else:
        epochs = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64))

    def epoch_records(epoch: tf.Tensor) -> tf.data.Dataset:
        records = reader.epoch(epoch)
        # Resume: drop the records of the first epoch that earlier steps consumed, before
        # any parsing.
        return records.skip(tf.where(epoch == first_epoch, tf.constant(skip_first, tf.int64),
                                     tf.constant(0, tf.int64)))

    records = epochs.flat_map(_plain(epoch_records))

    decode = _Decoder(manifest, emb_dim=emb_dim, seed=seed,
                      augment=Augment(aug, out_size) if train and aug else None,
                      paired=paired_aug)

    # Records are decoded in groups of _DECODE_GROUP (see _decode_group: per-record errors are
    # caught, counted and named). block_length > group size keeps the record order whatever
    # cycle_length the autotuner picks; groups decode in parallel.
    ds = records.batch(_DECODE_GROUP).interleave(
        _plain(lambda group: _decode_group(group, decode)), cycle_length=tf.data.AUTOTUNE,
        block_length=_DECODE_GROUP + 1, num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic)
    ds = ds.filter(_plain(checks.example))
    ds = ds.map(_plain(lambda ex: {k: v for k, v in ex.items() if k not in _BOOKKEEPING}))

    if train:
        ds = ds.batch(batch, drop_remainder=True)
    else:
        # Pad every host to the same number of full batches: ceil(ceil(N / P) / B).
        num_batches = math.ceil(math.ceil(num_examples / pcount) / batch)
        ds = ds.concatenate(tf.data.Dataset.from_tensors(decode.padding()).repeat())
        ds = ds.batch(batch, drop_remainder=True).take(num_batches)
    ds = ds.map(_plain(lambda b: _to_tower_inputs(b, stored)),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    options = tf.data.Options()
    options.deterministic = deterministic
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def global_batches(
    dataset: tf.data.Dataset | Iterable[Mapping[str, Any]],
    mesh: Mesh,
    batch_axes: tuple[str, ...] = ("data", "fsdp"),
    *,
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
    interrupted: Callable[[], bool] | None = None,
    source: str = "the input pipeline",
) -> Iterator[dict[str, jax.Array]]:
    """Turns per-host batches into global jax.Arrays sharded on the batch dim over ``batch_axes``.

    Axes of ``batch_axes`` that the mesh lacks are ignored. Every host must call this with its
    own per-host batches in the same step order. A corrupt record or shard (with
    skip_bad_records=False) surfaces as BadRecordError naming the shard, a shard that vanished
    as FileNotFoundError naming it.

    Batches are fetched on a background thread while the caller's thread waits in short
    slices: the iteration ends early (returns) once ``interrupted()`` is true, e.g. after
    SIGTERM, and raises InputStallError naming ``source`` when no batch came for
    ``stall_timeout_s`` seconds.
    """
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    if not axes:
        raise ValueError(f"none of batch_axes {batch_axes} is a mesh axis {mesh.axis_names}")
    sharding = NamedSharding(mesh, PartitionSpec(axes))
    it = dataset.as_numpy_iterator() if isinstance(dataset, tf.data.Dataset) else iter(dataset)
    fetcher = _Fetcher(it)
    try:
        while True:
            batch = fetcher.get(stall_timeout_s, interrupted, source)
            if batch is None:
                return
            yield {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
                   for k, v in batch.items()}
    finally:
        fetcher.stop()


class _Fetcher:
    """Runs ``next(it)`` on a daemon thread, one batch ahead. A thread stuck inside TensorFlow
    cannot be stopped, but it no longer holds the caller, and it dies with the process."""

    def __init__(self, it: Iterator) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(it,), daemon=True,
                                        name="evclip_jax input")
        self._thread.start()

    def _run(self, it: Iterator) -> None:
        while not self._stopped.is_set():
            try:
                item = ("batch", next(it))
            except StopIteration:
                item = ("end", None)
            except Exception as e:  # handed to the consumer, raised there
                item = ("error", e)
            while not self._stopped.is_set():
                try:
                    self._queue.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if item[0] != "batch":
                return

    def get(self, stall_timeout_s: float, interrupted: Callable[[], bool] | None,
            source: str) -> Mapping[str, Any] | None:
        """The next batch; None at the end or once ``interrupted()``."""
        waited = time.monotonic()
        while interrupted is None or not interrupted():
            try:
                kind, value = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if time.monotonic() - waited > stall_timeout_s:
                    raise InputStallError(
                        f"{source}: no batch for {stall_timeout_s:g} s "
                        "(config.data.stall_timeout_s); is the data still there and readable?"
                    ) from None
                continue
            if kind == "error":
                raise readable(value)
            return value if kind == "batch" else None
        return None

    def stop(self) -> None:
        self._stopped.set()


# --------------------------------------------------------------------------------------------
# Reading records.


def _hide_gpus_from_tf() -> None:
    """Keeps TensorFlow off the accelerators that JAX uses (input pipelines run on CPU)."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices; nothing to do
        pass


def _host_pieces(data_dir: str, manifest: Mapping[str, Any], pindex: int,
                 pcount: int) -> list[tuple[str, int, int, int]]:
    """(shard path, first record in shard, record count, global index of that record) of the
    shards overlapping this host's block of global indices [h*N//P, (h+1)*N//P)."""
    n = int(manifest["num_examples"])
    lo, hi = (pindex * n) // pcount, ((pindex + 1) * n) // pcount
    pieces, offset = [], 0
    for name, count in zip(manifest["shards"], manifest["shard_num_examples"], strict=True):
        start, stop = max(lo, offset), min(hi, offset + count)
        if start < stop:
            pieces.append((os.path.join(data_dir, name), start - offset, stop - start, start))
        offset += count
    return pieces


class _Reader:
    """One epoch of raw records of this host: {"serialized", "index", "shard", "epoch"}."""

    def __init__(self, pieces: list[tuple[str, int, int, int]], *, seed: int, train: bool,
                 shuffle_buffer: int, checks: Checks) -> None:
        self.files = tf.constant([p[0] for p in pieces])
        self.starts = tf.constant([p[1] for p in pieces], tf.int64)
        self.counts = tf.constant([p[2] for p in pieces], tf.int64)
        self.offsets = tf.constant([p[3] for p in pieces], tf.int64)
        self.num_pieces = len(pieces)
        self.seed = seed
        self.train = train
        self.shuffle_buffer = shuffle_buffer
        self.checks = checks

    def epoch(self, epoch: tf.Tensor) -> tf.data.Dataset:
        pieces = (self.files, self.starts, self.counts, self.offsets)
        if self.train:
            order_seed = _fold(self.seed, 1, epoch)
            order = tf.argsort(tf.random.stateless_uniform([self.num_pieces], order_seed))
            pieces = tuple(tf.gather(t, order) for t in pieces)
        ds = tf.data.Dataset.from_tensor_slices(pieces)
        # Training mixes up to 16 pieces record by record; evaluation reads them in order.
        cycle = min(self.num_pieces, 16) if self.train else 1
        ds = ds.interleave(_plain(self._piece), cycle_length=cycle, block_length=1,
                           num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if self.train:
            shuffle_seed = tf.random.stateless_uniform([], _fold(self.seed, 2, epoch),
                                                       minval=0, maxval=2**62, dtype=tf.int64)
            ds = ds.shuffle(self.shuffle_buffer, seed=shuffle_seed)
        return ds.map(_plain(lambda r: {**r, "epoch": epoch}))

    def _piece(self, path: tf.Tensor, start: tf.Tensor, count: tf.Tensor,
               offset: tf.Tensor) -> tf.data.Dataset:
        # A corrupt record makes TFRecordDataset raise DataLossError (without the file name)
        # and a truncated file just ends early; ignore_errors() ends the piece at the damage
        # and the end-of-piece sentinel below finds how many records never arrived. A missing
        # file would make ignore_errors() retry the open forever: it is checked first.
        records = tf.data.TFRecordDataset(existing(path)).ignore_errors().skip(start).take(count)
        records = records.map(_plain(lambda s: {"serialized": s,
                                                "index": tf.constant(0, tf.int64)}))
        sentinel = tf.data.Dataset.from_tensors({"serialized": tf.constant(""),
                                                 "index": tf.constant(-1, tf.int64)})

        def number(seen: tf.Tensor, rec: dict[str, tf.Tensor]) -> tuple[tf.Tensor, dict]:
            end = rec["index"] < 0
            index = tf.where(end, tf.constant(-1, tf.int64), offset + seen)
            return seen + 1, {"serialized": rec["serialized"], "index": index,
                              "lost": tf.where(end, count - seen, tf.constant(0, tf.int64))}

        ds = records.concatenate(sentinel).scan(tf.constant(0, tf.int64), _plain(number))
        ds = ds.filter(_plain(lambda rec: self.checks.lost(rec, path)))
        return ds.map(_plain(lambda rec: {"serialized": rec["serialized"],
                                          "index": rec["index"], "shard": path}))


def _fold(seed: int, stream: int, value: tf.Tensor) -> tf.Tensor:
    """A stateless seed [2] for (seed, stream, value); stream keeps the uses independent."""
    base = tf.constant([seed, stream], tf.int64)
    return tf.random.experimental.stateless_fold_in(base, tf.cast(value, tf.int64))


# --------------------------------------------------------------------------------------------
# Decoding, augmentation, normalisation.


class _Decoder:
    """Record -> example: the event frames (augmented in training) and the gray image [S, S]
    (0..255), label, mask[, teacher_emb], and the record's position in its decode group
    ("pos"), global index and shard. Whole batches become tower inputs in
    ``_to_tower_inputs``."""

    def __init__(self, manifest: Mapping[str, Any], *, emb_dim: int | None, seed: int,
                 augment: Augment | None, paired: bool) -> None:
        self.size = int(manifest["image_size"])
        self.representation = manifest["representation"]
        self.event_shape = list(manifest["event_shape"])
        # What enters where a shift moves content away: no events (EventBind: its background).
        self.fill = float(manifest.get("representation_options", {}).get("background", 0.0))
        self.has_images = manifest.get("has_images", True)
        self.num_examples = int(manifest["num_examples"])
        self.emb_dim = emb_dim
        self.seed = seed
        self.augment = augment
        self.paired = paired

    def __call__(self, rec: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        parsed = parse_example(rec["serialized"], self.size, self.emb_dim,
                               has_images=self.has_images, representation=self.representation,
                               num_frames=self.event_shape[0])
        image = tf.cast(parsed["image"], tf.float32)
        if self.representation == "evclip":
            events = tf.cast(parsed["event_counts"], tf.float32)
        else:
            events = parsed["event_frames"]
        if self.augment is not None:
            # One seed per (seed, epoch, record): independent of parallelism and host count.
            seed = _fold(self.seed, 3, rec["epoch"] * self.num_examples + rec["index"])
            events, image = self._augment_pair(events, image, seed)
        elif self.representation == "evclip":
            events = counts_to_frame_tf(events)
        out = {"events": events, "images": image, "labels": parsed["label"],
               "mask": tf.constant(True)}
        if self.emb_dim:
            out["teacher_emb"] = parsed["teacher_emb"]
        out.update(pos=rec["pos"], index=rec["index"], shard=rec["shard"])
        return out

    def padding(self) -> dict[str, tf.Tensor]:
        """An empty example (zero frames, black image) with mask False (eval padding)."""
        out = {"events": tf.zeros(self.event_shape), "images": tf.zeros([self.size] * 2),
               "labels": tf.constant(PAD_LABEL, tf.int32), "mask": tf.constant(False)}
        if self.emb_dim:
            out["teacher_emb"] = tf.zeros([self.emb_dim])
        return out

    def end_marker(self) -> dict[str, tf.Tensor]:
        """Closes a decode group (pos -1)."""
        return {**self.padding(), "pos": tf.constant(-1, tf.int64),
                "index": tf.constant(-1, tf.int64), "shard": tf.constant("")}

    def _augment_pair(self, events: tf.Tensor, image: tf.Tensor,
                      seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Release augmentation of a pair: shift, random resized crop, horizontal flip. Eq. 1
        counts are shifted (events leaving the sensor are dropped, as the release does), then
        normalised to the frame; event frames are resampled nearest-neighbour, the image
        bilinearly."""
        aug = self.augment
        if self.paired:
            event_t = image_t = aug.draw(seed)
        else:  # release: event and image transforms are drawn independently
            event_t = aug.draw(tf.random.experimental.stateless_fold_in(seed, 1))
            image_t = aug.draw(tf.random.experimental.stateless_fold_in(seed, 2))
        # As stacks [N, S, S, C]: Eq. 1 [1, S, S, 1], EventCLIP [1, S, S, 3], EventBind as is.
        stack = {"evclip": events[None, :, :, None], "eventclip": events[None],
                 "eventbind": events}[self.representation]
        stack = aug.shift(stack, event_t, self.fill)
        if self.representation == "evclip":
            stack = counts_to_frame_tf(stack)
        stack = aug.crop_flip(stack, event_t, "nearest")
        events = tf.reshape(stack, self.event_shape)
        image = aug.crop_flip(aug.shift(image[None, :, :, None], image_t), image_t, "bilinear")
        return events, image[0, :, :, 0]


def _decode_group(group: dict[str, tf.Tensor], decode: _Decoder) -> tf.data.Dataset:
    """Decodes a group of records in order, dropping those whose decoding fails (bad PNG or
    frames, wrong shape, missing feature) and closing with a marker that reports how many failed and
    the shard and global index of the first failure."""
    n = tf.shape(group["index"], out_type=tf.int64)[0]
    records = tf.data.Dataset.from_tensor_slices({**group, "pos": tf.range(n)})
    decoded = records.map(_plain(decode)).ignore_errors()
    ends = tf.data.Dataset.from_tensors(decode.end_marker())

    def track(received: tf.Tensor, ex: dict[str, tf.Tensor]) -> tuple[tf.Tensor, dict]:
        is_end = ex["pos"] < 0
        bit = tf.bitwise.left_shift(tf.constant(1, tf.int64), tf.maximum(ex["pos"], 0))
        got = tf.bitwise.bitwise_and(tf.bitwise.right_shift(received, tf.range(n)), 1)
        missing = tf.reshape(tf.where(tf.equal(got, 0)), [-1])
        first = tf.concat([missing, tf.zeros([1], tf.int64)], 0)[0]
        report = {
            "bad": tf.where(is_end, tf.size(missing, out_type=tf.int64),
                            tf.constant(0, tf.int64)),
            "bad_shard": tf.where(is_end, group["shard"][first], ""),
            "bad_index": tf.where(is_end, group["index"][first], tf.constant(-1, tf.int64)),
        }
        return tf.bitwise.bitwise_or(received, bit), {**ex, **report}

    return decoded.concatenate(ends).scan(tf.constant(0, tf.int64), _plain(track))


def _to_tower_inputs(batch: dict[str, tf.Tensor], representation: str) -> dict[str, tf.Tensor]:
    """Per-example frames and gray images -> the batch contract (module docstring); tf twins
    of ``embed.events_to_tower_input`` and ``embed.images_to_tower_input``. Done per batch:
    fewer, larger ops than per example."""
    mean, std = np.array(embed.CLIP_MEAN, np.float32), np.array(embed.CLIP_STD, np.float32)
    if representation == "evclip":
        # [B, S, S] Eq. 1 frames -> (E - 0.5) * 2 replicated to 3 channels, no CLIP mean/std.
        scaled = (batch["events"] - 0.5) * 2.0
        events = tf.broadcast_to(scaled[..., None], scaled.shape.concatenate([3]))
    else:
        events = (batch["events"] - mean) / std
    # Gray 0..255 -> / 255, CLIP mean/std, folded into one scale and bias per channel.
    images = batch["images"][..., None] * (1.0 / (255.0 * std)) - mean / std
    return {**batch, "events": events, "images": images}
