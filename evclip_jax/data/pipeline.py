"""tf.data input pipeline: paired TFRecords -> per-host integer batches -> global jax.Arrays.

With data/bad_records.py, the only library module that imports TensorFlow at top level. The
host parses, decodes (raw bytes, or PNG for png records) and batches; nothing else. What
turns a batch into the towers' inputs -- the Eq. 1 normalisation, the augmentation, the
3-channel expansion and CLIP mean/std -- runs on the device (``device_prep``): inside the
jitted train step, and for evaluation in ``global_batches``.

A batch (B rows per host; S = the records' ``image_size``, T = ``num_frames``):

* "events": ``evclip`` records: the Eq. 1 counts, uint16 (png records) or the manifest's
  ``event_dtype`` (raw), [B, S, S]; ``eventclip`` float32 [B, S, S, 3] and ``eventbind``
  float32 [B, T, S, S, 3] frames in [0, 1];
* "images" uint8 [B, S, S], the gray paired images (black when the records have none);
* "labels" int32 [B]; "mask" bool [B] (False on evaluation padding, labels PAD_LABEL);
  "index" int32 [B] (the record's global index, -1 on padding) and "epoch" int32 [B],
  which seed the device augmentation; optional "teacher_emb" float32 [B, D].

Records with several event windows (``num_windows`` > 1, training splits) give one per epoch
in training, drawn from (seed, epoch, global record index); evaluation reads the first.

Determinism does not depend on parallelism: the record order is a function of (seed, epoch)
only (seeded piece order, deterministic interleave, seeded shuffle buffer), and every random
draw (the window here, the augmentation on the device) is seeded by (seed, epoch, global
record index). So an iterator resumed at ``start_step`` yields exactly the batches an
uninterrupted one yields from there.

Host sharding: host h of P reads the contiguous block of global record indices
[h*N//P, (h+1)*N//P) -- disjoint, covering, and each host only opens the shards that overlap
its block. The writer shuffles training splits, so blocks mix classes.

Note: tf.data seeds are combined with TensorFlow's global seed; calling
``tf.random.set_seed`` changes the order (not the windows or augmentations).

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

from evclip_jax.data import device_prep
from evclip_jax.data.bad_records import BadRecordCounter, Checks, existing, readable
from evclip_jax.data.bad_records import BadRecordError as BadRecordError  # raised through here
from evclip_jax.data.record_codec import parse_example, record_format
from evclip_jax.data.records import manifest_path, read_manifest

# Functions given to tf.data hold no Python control flow on tensors: skip AutoGraph's
# source conversion, which costs seconds of tracing per dataset.
_plain = tf.autograph.experimental.do_not_convert
DEFAULT_SHUFFLE_BUFFER = 10_000
PAD_LABEL = -1
# What Checks.example reads beside the batch fields; dropped per batch.
_BOOKKEEPING = ("pos", "bad", "bad_shard", "bad_index", "shard", "lost")
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
      train: True: seeded per-epoch shuffle and event window, endless repeat, full batches.
        False: file order, the first window, one pass, the last batch padded to full size
        with "mask" False (labels PAD_LABEL); every host yields the same number of batches.
      seed: drives the order and the windows (and, on the device, the augmentation: the
        batches carry each record's epoch and global index for it).
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
      shuffle_buffer: decoded examples in the shuffle buffer (train); its memory is this
        times an example's arrays (about 150 KB at 224 px with uint16 counts).
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
    if max_bad_fraction is not None and not 0 <= max_bad_fraction < 1:
        raise ValueError(f"max_bad_fraction={max_bad_fraction}: expected a share in [0, 1)")

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
    decode = _Decoder(manifest, emb_dim=emb_dim, seed=seed, train=train)
    reader = _Reader(pieces, decode, seed=seed, train=train, shuffle_buffer=shuffle_buffer,
                     checks=checks, compression=manifest["compression"] or "")

    if train:
        epochs = tf.data.Dataset.counter(start=first_epoch)
    else:
        epochs = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64))

    def epoch_records(epoch: tf.Tensor) -> tf.data.Dataset:
        records = reader.epoch(epoch)
        # Resume: drop the examples of the first epoch that earlier steps consumed.
        return records.skip(tf.where(epoch == first_epoch, tf.constant(skip_first, tf.int64),
                                     tf.constant(0, tf.int64)))

    ds = epochs.flat_map(_plain(epoch_records))

    if train:
        ds = ds.batch(batch, drop_remainder=True)
    else:
        # Pad every host to the same number of full batches: ceil(ceil(N / P) / B).
        num_batches = math.ceil(math.ceil(num_examples / pcount) / batch)
        ds = ds.concatenate(tf.data.Dataset.from_tensors(decode.padding()).repeat())
        ds = ds.batch(batch, drop_remainder=True).take(num_batches)
    # Per batch, not per record: the decode bookkeeping goes.
    ds = ds.map(_plain(lambda b: {k: v for k, v in b.items() if k not in _BOOKKEEPING}))
    options = tf.data.Options()
    options.deterministic = deterministic
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def global_batches(
    dataset: tf.data.Dataset | Iterable[Mapping[str, Any]],
    mesh: Mesh,
    batch_axes: tuple[str, ...] = ("data", "fsdp"),
    *,
    tower_inputs: bool = True,
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
    interrupted: Callable[[], bool] | None = None,
    source: str = "the input pipeline",
) -> Iterator[dict[str, jax.Array]]:
    """Turns per-host batches into global jax.Arrays sharded on the batch dim over ``batch_axes``.

    ``tower_inputs``: True maps each batch to the towers' inputs on the device, without
    augmentation (``device_prep.tower_inputs``: evaluation); False yields the batches as they
    came, integers (the train step maps and augments them itself, ``device_prep.prepare``).
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
    prepare = _tower_inputs if tower_inputs else None
    fetcher = _Fetcher(it)
    try:
        while True:
            batch = fetcher.get(stall_timeout_s, interrupted, source)
            if batch is None:
                return
            batch = {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
                     for k, v in batch.items()}
            yield prepare(batch) if prepare is not None else batch
    finally:
        fetcher.stop()


_tower_inputs = jax.jit(device_prep.tower_inputs)  # one compile per batch layout


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
    """One epoch of this host's decoded examples (``_Decoder``), bad ones checked and dropped.

    Each shard piece is read, numbered and decoded record by record with decoding errors
    dropped; a gap in the numbering (a record that failed to decode, or the records a corrupt
    or truncated shard never delivered, found by an end-of-piece sentinel) is reported
    through ``Checks.lost`` naming the shard, and labels outside the classes through
    ``Checks.example``. Few stages per record: each one costs CPU on every sample.
    """

    def __init__(self, pieces: list[tuple[str, int, int, int]], decode: _Decoder, *,
                 seed: int, train: bool, shuffle_buffer: int, checks: Checks,
                 compression: str) -> None:
        self.files = tf.constant([p[0] for p in pieces])
        self.starts = tf.constant([p[1] for p in pieces], tf.int64)
        self.counts = tf.constant([p[2] for p in pieces], tf.int64)
        self.offsets = tf.constant([p[3] for p in pieces], tf.int64)
        self.num_pieces = len(pieces)
        self.decode = decode
        self.seed = seed
        self.train = train
        self.shuffle_buffer = shuffle_buffer
        self.checks = checks
        self.compression = compression  # "", "GZIP" or "ZLIB" (the manifest's)

    def epoch(self, epoch: tf.Tensor) -> tf.data.Dataset:
        pieces = (self.files, self.starts, self.counts, self.offsets)
        if self.train:
            order_seed = _fold(self.seed, 1, epoch)
            order = tf.argsort(tf.random.stateless_uniform([self.num_pieces], order_seed))
            pieces = tuple(tf.gather(t, order) for t in pieces)
        ds = tf.data.Dataset.from_tensor_slices(pieces)
        # Training mixes up to 16 pieces record by record; evaluation reads them in order.
        cycle = min(self.num_pieces, 16) if self.train else 1
        ds = ds.interleave(_plain(lambda *piece: self._piece(*piece, epoch)),
                           cycle_length=cycle, block_length=1,
                           num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if self.train:
            shuffle_seed = tf.random.stateless_uniform([], _fold(self.seed, 2, epoch),
                                                       minval=0, maxval=2**62, dtype=tf.int64)
            ds = ds.shuffle(self.shuffle_buffer, seed=shuffle_seed)
        return ds

    def _piece(self, path: tf.Tensor, start: tf.Tensor, count: tf.Tensor, offset: tf.Tensor,
               epoch: tf.Tensor) -> tf.data.Dataset:
        # A corrupt record makes TFRecordDataset raise DataLossError (without the file name)
        # and a truncated file just ends early; ignore_errors() ends the piece at the damage.
        # A missing file would make ignore_errors() retry the open forever: checked first.
        records = tf.data.TFRecordDataset(existing(path), compression_type=self.compression)
        records = records.ignore_errors().skip(start).take(count).enumerate()
        examples = records.map(
            _plain(lambda i, s: self.decode(s, offset + i, epoch, path)),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
        # The sentinel's index is the piece's end: the gap before it counts what never came.
        sentinel = {**self.decode.padding(), "index": tf.cast(offset + count, tf.int32),
                    "pos": tf.constant(-1, tf.int64), "shard": path}
        ds = examples.concatenate(tf.data.Dataset.from_tensors(sentinel))

        def gaps(last: tf.Tensor, ex: dict[str, tf.Tensor]) -> tuple[tf.Tensor, dict]:
            index = tf.cast(ex["index"], tf.int64)
            end = ex["pos"] < 0
            ex = {**ex, "lost": index - last - 1,
                  "index": tf.where(end, tf.constant(-1, tf.int32), ex["index"])}
            return index, ex

        ds = ds.scan(offset - 1, _plain(gaps))
        return ds.filter(_plain(lambda ex: tf.logical_and(self.checks.lost(ex, path),
                                                          self.checks.example(ex))))


def _fold(seed: int, stream: int, value: tf.Tensor) -> tf.Tensor:
    """A stateless seed [2] for (seed, stream, value); stream keeps the uses independent."""
    base = tf.constant([seed, stream], tf.int64)
    return tf.random.experimental.stateless_fold_in(base, tf.cast(value, tf.int64))


# --------------------------------------------------------------------------------------------
# Decoding.


class _Decoder:
    """Record -> example: the event window (drawn per epoch in training), the gray image, label,
    mask, global index, epoch[, teacher_emb] (the batch contract), and the bookkeeping that
    ``Checks`` reads (its shard; "pos" -1 marks a piece's end, "lost" the records missing
    before it)."""

    def __init__(self, manifest: Mapping[str, Any], *, emb_dim: int | None, seed: int,
                 train: bool) -> None:
        self.size = int(manifest["image_size"])
        self.format = record_format(manifest)
        self.event_shape = list(manifest["event_shape"])
        self.event_dtype = (tf.as_dtype(manifest["event_dtype"])
                            if manifest["representation"] == "evclip" else tf.float32)
        self.num_windows = int(manifest["num_windows"])
        self.num_examples = int(manifest["num_examples"])
        self.emb_dim = emb_dim
        self.seed = seed
        self.train = train

    def __call__(self, serialized: tf.Tensor, index: tf.Tensor, epoch: tf.Tensor,
                 shard: tf.Tensor) -> dict[str, tf.Tensor]:
        window = tf.constant(0, tf.int64)
        if self.train and self.num_windows > 1:
            # One window per (seed, epoch, record): the paper's random window per visit.
            draw = _fold(self.seed, 4, epoch * self.num_examples + index)
            window = tf.random.stateless_uniform([], draw, minval=0, maxval=self.num_windows,
                                                 dtype=tf.int64)
        parsed = parse_example(serialized, self.size, self.emb_dim, window=window,
                               **self.format)
        events = parsed["event_counts" if "event_counts" in parsed else "event_frames"]
        out = {**self.padding(), "events": events, "images": parsed["image"],
               "labels": parsed["label"], "mask": tf.constant(True),
               "index": tf.cast(index, tf.int32), "epoch": tf.cast(epoch, tf.int32),
               "shard": shard}
        if self.emb_dim:
            out["teacher_emb"] = parsed["teacher_emb"]
        return out

    def padding(self) -> dict[str, tf.Tensor]:
        """An empty example (zero events, black image) with mask False (eval padding), with
        the bookkeeping of a good record."""
        out = {"events": tf.zeros(self.event_shape, self.event_dtype),
               "images": tf.zeros([self.size] * 2, tf.uint8),
               "labels": tf.constant(PAD_LABEL, tf.int32), "mask": tf.constant(False),
               "index": tf.constant(-1, tf.int32), "epoch": tf.constant(0, tf.int32),
               "pos": tf.constant(0, tf.int64), "shard": tf.constant(""),
               "bad": tf.constant(0, tf.int64), "bad_shard": tf.constant(""),
               "bad_index": tf.constant(-1, tf.int64), "lost": tf.constant(0, tf.int64)}
        if self.emb_dim:
            out["teacher_emb"] = tf.zeros([self.emb_dim])
        return out
