"""Bad records and missing shards, found inside tf.data and reported by name.

``make_dataset`` (pipeline.py) decodes records with errors caught, so that one bad record
does not end the dataset unnamed; the predicates here then either raise at the first (an
assertion whose message carries a tag, turned into BadRecordError / FileNotFoundError by
``readable``), or count, log at 1, 2, 4, ... skipped records and give up past a share
(skip_bad_records). A shard is checked to exist before it is opened: TFRecordDataset with
ignore_errors() would retry a missing file forever.
"""

from __future__ import annotations

import sys

import tensorflow as tf

BAD_RECORD_TAG = "evclip_jax bad record"
MISSING_TAG = "evclip_jax missing shard"


class BadRecordError(ValueError):
    """A corrupt record or shard met while iterating (skip_bad_records=False), or too many of
    them (skip_bad_records=True, past max_bad_fraction); names the shard."""


class BadRecordCounter:
    """Counts records skipped by ``make_dataset(skip_bad_records=True)``.

    Readable at any time while iterating (``.value``; ``.read``: records read, good or bad).
    A record that stays bad is counted again on every epoch pass. Records lost to a
    truncated/corrupt shard are counted when the reader reaches the end of that shard's piece.
    """

    def __init__(self) -> None:
        self.variable = tf.Variable(0, dtype=tf.int64, trainable=False, name="bad_records")
        self.read_variable = tf.Variable(0, dtype=tf.int64, trainable=False, name="read_records")
        # Skips are logged when the count reaches this, which then doubles (1, 2, 4, ...).
        self.next_log = tf.Variable(1, dtype=tf.int64, trainable=False, name="next_log")

    @property
    def value(self) -> int:
        return int(self.variable.numpy())

    @property
    def read(self) -> int:
        return int(self.read_variable.numpy())


def existing(path: tf.Tensor) -> tf.Tensor:
    """``path``, once it is checked to exist (else an assertion naming it, MISSING_TAG)."""
    found = tf.py_function(lambda p: tf.io.gfile.exists(p.numpy().decode()), [path], tf.bool)
    with tf.control_dependencies([tf.debugging.Assert(found, [
            f"{MISSING_TAG}: TFRecord shard", path, "is gone (the data dir was moved or "
            "deleted while the run read it)"])]):
        return tf.identity(path)


def readable(error: Exception) -> Exception:
    """The pipeline's tagged assertion errors as BadRecordError / FileNotFoundError, in one
    sentence without TF's iterator path; other errors as they are."""
    if not isinstance(error, tf.errors.InvalidArgumentError):
        return error
    for tag, kind in ((BAD_RECORD_TAG, BadRecordError), (MISSING_TAG, FileNotFoundError)):
        if tag in error.message:
            # The assertion's "[part] [part]" data as one sentence.
            text = error.message[error.message.index(tag):].split("\n")[0]
            out = kind(text.replace("] [", " ").rstrip("]"))
            out.__cause__ = error
            return out
    return error


class Checks:
    """The filter() predicates that find bad records: raising on the first (skip_bad False),
    or counting, logging at 1, 2, 4, ... skipped, and giving up once an epoch's worth of
    records held no good one or more than ``max_bad`` of the records read, of an epoch's at
    least, were bad (skip_bad True)."""

    def __init__(self, skip_bad: bool, counter: BadRecordCounter, *, num_classes: int,
                 max_bad: float | None, epoch_records: int) -> None:
        self.skip_bad = skip_bad
        self.counter = counter
        self.num_classes = num_classes
        self.max_bad = max_bad
        self.epoch_records = epoch_records

    def lost(self, rec: dict[str, tf.Tensor], path: tf.Tensor) -> tf.Tensor:
        """Drops a shard piece's end sentinel after checking how many of its records never
        arrived (a corrupt or truncated shard)."""
        lost = rec["lost"]
        deps = self._bad(lost, lost, [
            "TFRecord shard is corrupt or truncated:", path, "records lost:", lost,
            "(pass skip_bad_records=True to skip them)"], ["records of corrupt shard", path])
        with tf.control_dependencies(deps):
            return rec["index"] >= 0

    def example(self, ex: dict[str, tf.Tensor]) -> tf.Tensor:
        """Drops decode group end markers, after checking the group's failed records, and
        examples whose label is outside the manifest's classes."""
        end = ex["pos"] < 0
        bad = ex["bad"]
        deps = self._bad(bad, bad, [
            "bad record (undecodable PNG or frames, wrong shape or missing feature) at global "
            "index", ex["bad_index"], "in TFRecord shard", ex["bad_shard"],
            "(pass skip_bad_records=True to skip bad records)"],
            ["bad record(s) of a decode group, first: index", ex["bad_index"], "of shard",
             ex["bad_shard"]])
        label = ex["labels"]
        wrong = tf.logical_and(tf.logical_not(end), tf.logical_or(
            label < 0, label >= self.num_classes))
        n_wrong = tf.cast(wrong, tf.int64)
        with tf.control_dependencies(deps):  # one count after the other
            deps = self._bad(n_wrong, tf.cast(tf.logical_not(end), tf.int64), [
                "label", label, f"outside [0, {self.num_classes}) (the manifest's "
                f"{self.num_classes} class_names) at global index", ex["index"],
                "in TFRecord shard", ex["shard"]],
                ["record(s) with a label outside the classes, latest: index", ex["index"],
                 "of shard", ex["shard"]])
        with tf.control_dependencies(deps):
            return tf.logical_and(tf.logical_not(end), tf.logical_not(wrong))

    def _bad(self, n: tf.Tensor, n_read: tf.Tensor, error: list, skipped: list) -> list:
        """The ops that check ``n`` bad of ``n_read`` records read."""
        if not self.skip_bad:
            return [tf.debugging.Assert(n <= 0, [f"{BAD_RECORD_TAG}:", *error])]
        c = self.counter
        bad = c.variable.assign_add(n)
        read = c.read_variable.assign_add(n_read)
        all_bad = tf.logical_and(bad >= read, read >= self.epoch_records)
        too_many = all_bad
        if self.max_bad is not None:
            allowed = self.max_bad * tf.cast(tf.maximum(read, self.epoch_records), tf.float64)
            too_many = tf.logical_or(too_many, tf.cast(bad, tf.float64) > allowed)
        give_up = tf.debugging.Assert(tf.logical_not(too_many), [
            f"{BAD_RECORD_TAG}: gave up skipping:", bad, "of", read, "records read were bad "
            f"(an epoch has {self.epoch_records}; at most a share max_bad_fraction="
            f"{self.max_bad} (config.data.max_bad_fraction) may be, and never all); the last:",
            *skipped])

        def log() -> tf.Tensor:
            with tf.control_dependencies([tf.print(
                    "evclip_jax.data.pipeline: skipped", bad, "bad record(s) so far; now",
                    n, *skipped, "(logged again when the count doubles)",
                    output_stream=sys.stderr)]):
                return c.next_log.assign(2 * bad)

        logged = tf.cond(tf.logical_and(n > 0, bad >= c.next_log), log, c.next_log.read_value)
        return [logged, give_up]
