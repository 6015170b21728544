"""The one definition of each embedding helper: normalisation, tower inputs, tower embeddings.

Event representations (``config.data.representation``; the records say which they hold):

* ``evclip`` (the paper, Eq. 1): one count frame E / (max E + 1) in [0, 1), [B, H, W]. As in
  the release it enters the tower as (E - 0.5) * 2 replicated to 3 channels, with NO CLIP
  mean/std.
* ``eventclip`` (EventCLIP, Wu et al.): a polarity histogram image in [0, 1], [B, H, W, 3],
  CLIP mean/std normalised like an RGB image (EventCLIP feeds it to CLIP's preprocessing).
* ``eventbind`` (EventBind / E-CLIP, Zhou et al.): T polarity-coloured frames in [0, 1],
  [B, T, H, W, 3], CLIP mean/std normalised. A single-frame vision tower embeds each frame and
  averages the T embeddings (what EventBind's temporal encoder, models/eventbind.py, is at
  initialisation); the temporal encoder takes the T frames together.

Grey paired images are CLIP-preprocessed: 0..255 -> / 255 -> CLIP mean/std, 3 channels.
The input pipeline applies these very functions on the device (``data/device_prep.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from evclip_jax.models.eventbind import EventBindTower

REPRESENTATIONS = ("evclip", "eventclip", "eventbind")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / ||x|| along ``axis`` (jnp; works on NumPy arrays too)."""
    return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


def l2_normalize_f64(x, axis: int = -1) -> np.ndarray:
    """The NumPy float64 twin of ``l2_normalize`` for metrics; an all-zero vector stays zero
    (similarity 0) instead of becoming NaN."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def check_representation(name: str, field: str = "config.data.representation") -> str:
    if name not in REPRESENTATIONS:
        raise ValueError(f"{field}={name!r}: expected one of {', '.join(REPRESENTATIONS)}")
    return name


def frame_ndim(representation: str) -> int:
    """Rank of one example's event representation (no batch axis)."""
    return {"evclip": 2, "eventclip": 3, "eventbind": 4}[check_representation(representation)]


def clip_normalize(rgb01: jax.Array) -> jax.Array:
    """[..., 3] in [0, 1] -> CLIP mean/std normalised."""
    return (rgb01 - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


def events_to_tower_input(frames, representation: str = "evclip") -> jax.Array:
    """A batch of event representations -> the event tower's input (see the module docstring).

    ``evclip``: [B, H, W] Eq. 1 frames -> [B, H, W, 3] in [-1, 1] ([B, H, W, 3] is taken as
    tower input already); ``eventclip`` [B, H, W, 3]
    and ``eventbind`` [B, T, H, W, 3] in [0, 1] -> CLIP-normalised, same shape.
    """
    frames = jnp.asarray(frames, jnp.float32)
    if representation == "evclip" and frames.ndim == 4 and frames.shape[-1] == 3:
        return frames  # already tower input
    want = frame_ndim(representation) + 1
    if frames.ndim != want or (representation != "evclip" and frames.shape[-1] != 3):
        layout = {"evclip": "[B, H, W]", "eventclip": "[B, H, W, 3]",
                  "eventbind": "[B, T, H, W, 3]"}[representation]
        raise ValueError(f"{representation} event frames have shape {tuple(frames.shape)}; "
                         f"expected {layout}")
    if representation == "evclip":
        return jnp.repeat(((frames - 0.5) * 2.0)[..., None], 3, axis=-1)
    return clip_normalize(frames)


def images_to_tower_input(gray255) -> jax.Array:
    """Grey images [B, H, W] in 0..255 -> CLIP-preprocessed [B, H, W, 3] (METHOD.md: luma,
    replicated to 3 channels, CLIP mean/std)."""
    gray = jnp.asarray(gray255, jnp.float32) / 255.0
    return clip_normalize(jnp.repeat(gray[..., None], 3, axis=-1))


def embed_vision(vision, params, x: jax.Array) -> jax.Array:
    """Projected float32 embeddings [B, D] of a vision tower on tower input.

    [B, H, W, C] is one image per example; [B, T, H, W, C] goes whole to EventBind's temporal
    encoder, while a single-frame tower embeds each of the T frames and averages their
    embeddings.
    """
    if x.ndim == 5 and not isinstance(vision, EventBindTower):
        b, t = x.shape[:2]
        out = vision.apply({"params": params}, x.reshape((b * t, *x.shape[2:])))
        return out.astype(jnp.float32).reshape(b, t, -1).mean(axis=1)
    return vision.apply({"params": params}, x).astype(jnp.float32)


def embed_text(text, params, ids: jax.Array, token_offsets: jax.Array | None = None
               ) -> jax.Array:
    """Projected float32 embeddings [B, D] of a text tower on int token ids [B, L], with
    optional offsets [B, L, width] of their token embeddings (learned prompts)."""
    return text.apply({"params": params}, ids, token_offsets).astype(jnp.float32)


def class_text_embeddings(text, params, token_ids) -> jax.Array:
    """Normalised text embeddings [M, D] of the class prompts, computed once (frozen tower)."""
    ids = jnp.asarray(np.asarray(token_ids), jnp.int32)
    return l2_normalize(jax.jit(lambda p, i: embed_text(text, p, i))(params, ids))
