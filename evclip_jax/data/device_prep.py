"""The device side of the input pipeline: the pipeline's integer batches -> the towers' inputs.

The host (``pipeline.make_dataset``) only parses, decodes and batches; batches travel as
integers. Here, in jnp (no TensorFlow: accelerator hosts need not have it), inside the jitted
train step (``prepare``) and right after the transfer for evaluation (``tower_inputs``):

* training augmentation (``data/augment.py``): shift, random resized crop, horizontal flip;
* the Eq. 1 normalisation E = counts / (max + 1) of the shifted counts (the release shifts
  events, then builds the frame), event frames resampled nearest-neighbour;
* ``embed.events_to_tower_input`` and ``embed.images_to_tower_input``: the 3-channel expansion
  and CLIP mean/std, the one definition of each map.

Batch in (B rows; S = image_size, T = num_frames): "events" evclip uint8/uint16 Eq. 1 counts
[B, S, S] (integer events are always counts), eventclip float32 [B, S, S, 3], eventbind
float32 [B, T, S, S, 3] in [0, 1]; "images" uint8 [B, S, S] gray (black without images);
"labels", "mask", optional "teacher_emb" pass through; "index" (global record index) and
"epoch" int32 [B] seed the augmentation and are dropped. Batch out: float32 tower inputs,
"events" [B, S, S, 3] or [B, T, S, S, 3], "images" [B, S, S, 3].

Each example's transform is drawn from key(seed) folded with its epoch and global record
index: it depends on which record is seen in which epoch only, never on the step, the batch
layout or the host count, so a resumed run prepares exactly the batches an uninterrupted one
does. Every op works per example (vmap) along the batch dim, so the batch stays sharded as it
arrived.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from evclip_jax import embed
from evclip_jax.data.augment import Augment, check_augment

_AUGMENT_STREAM = 3  # keeps the augmentation's keys apart from other uses of config.seed
_SEED_KEYS = ("index", "epoch")


class InputPrep:
    """What the train step does to a batch before the loss: the representation's maps and,
    when ``augment`` is set, the release augmentation (``paired``: one transform for the
    events and the image of a pair, else independent draws, as the release)."""

    def __init__(self, representation: str, size: int, *, augment: Mapping[str, Any] | None,
                 paired: bool = True, fill: float = 0.0, seed: int = 0) -> None:
        self.representation = embed.check_representation(representation)
        settings = check_augment(augment)
        self.augment = None if settings is None else Augment(settings, size)
        self.paired = bool(paired)
        self.fill = float(fill)
        self.seed = int(seed)

    @classmethod
    def from_config(cls, config, manifest: Mapping[str, Any]) -> InputPrep:
        """The trainer's: config.data's augmentation (``augment.enabled``, ``paired_aug``) on
        the records the manifest describes (size; EventBind frames shift in their
        background)."""
        augment = dict(config.data.augment)
        augment = augment if augment.pop("enabled") else None
        options = manifest.get("representation_options", {})
        return cls(manifest["representation"], int(manifest["image_size"]), augment=augment,
                   paired=config.data.paired_aug, fill=float(options.get("background", 0.0)),
                   seed=config.seed)


def tower_inputs(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The towers' inputs of a batch, no augmentation (evaluation). Fields a batch lacks are
    left out; the seeding fields are dropped."""
    out = {k: v for k, v in batch.items() if k not in _SEED_KEYS}
    if "events" in batch:
        events = batch["events"]
        if jnp.issubdtype(events.dtype, jnp.integer):
            out["events"] = embed.events_to_tower_input(_eq1(events, axes=(-2, -1)), "evclip")
        else:
            out["events"] = embed.events_to_tower_input(events, _frames_representation(events))
    if "images" in batch:
        out["images"] = embed.images_to_tower_input(batch["images"])
    return out


def prepare(batch: Mapping[str, jax.Array], prep: InputPrep) -> dict[str, jax.Array]:
    """The train step's map of a batch (module docstring): ``tower_inputs`` with ``prep``'s
    augmentation drawn per example from (seed, epoch, index)."""
    if prep.augment is None:
        return tower_inputs(batch)
    aug = prep.augment
    counts = prep.representation == "evclip"
    base = jax.random.fold_in(jax.random.key(prep.seed), _AUGMENT_STREAM)

    def one(events: jax.Array, image: jax.Array, epoch: jax.Array, index: jax.Array
            ) -> tuple[jax.Array, jax.Array]:
        key = jax.random.fold_in(jax.random.fold_in(base, epoch), index)
        if prep.paired:
            event_t = image_t = aug.draw(key)
        else:  # the release draws the event and image transforms independently
            event_t = aug.draw(jax.random.fold_in(key, 1))
            image_t = aug.draw(jax.random.fold_in(key, 2))
        if counts:
            # Eq. 1 of the shifted counts: their max is over what stays in the frame.
            peak = jnp.max(jnp.where(aug.visible(event_t), events, 0))
            moved = aug.resample(events[..., None], event_t, "nearest")[..., 0]
            events = moved.astype(jnp.float32) / (peak.astype(jnp.float32) + 1.0)
        else:
            stack = events if events.ndim == 4 else events[None]
            events = aug.resample(stack, event_t, "nearest", prep.fill).reshape(events.shape)
        image = aug.resample(image[..., None], image_t, "bilinear")[..., 0]
        return events, image

    events, images = jax.vmap(one)(batch["events"], batch["images"], batch["epoch"],
                                   batch["index"])
    out = {k: v for k, v in batch.items() if k not in _SEED_KEYS}
    out["events"] = embed.events_to_tower_input(events, prep.representation)
    out["images"] = embed.images_to_tower_input(images)
    return out


def _eq1(counts: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Eq. 1 normalisation per example: counts / (max + 1), float32 (exact below 2**24)."""
    counts = counts.astype(jnp.float32)
    return counts / (jnp.max(counts, axis=axes, keepdims=True) + 1.0)


def _frames_representation(frames: jax.Array) -> str:
    """Float event frames: EventBind's [B, T, S, S, 3] or EventCLIP's [B, S, S, 3] (both in
    [0, 1], CLIP mean/std normalised alike)."""
    return "eventbind" if frames.ndim == 5 else "eventclip"
