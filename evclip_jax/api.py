"""``EventCLIP``: inference with the three towers of an event CLIP, and export to HF."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from evclip_jax import convert
from evclip_jax.models.clip import CLIPConfig, Towers


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


def events_to_tower_input(frames: jax.Array) -> jax.Array:
    """Event frames -> event-tower input.

    [B, H, W] frames are paper Eq. 1 frames in [0, 1); as in the release they are mapped to
    [-1, 1] by (E - 0.5) * 2 and replicated to 3 channels, with no CLIP mean/std.
    [B, H, W, 3] arrays are taken as tower input already (what ``frame_to_tower_input`` returns).
    """
    frames = jnp.asarray(frames, jnp.float32)
    if frames.ndim == 3:
        return jnp.repeat(((frames - 0.5) * 2.0)[..., None], 3, axis=-1)
    if frames.ndim == 4 and frames.shape[-1] == 3:
        return frames
    raise ValueError(
        f"event frames have shape {tuple(frames.shape)}; expected [B, H, W] Eq. 1 frames or "
        "[B, H, W, 3] tower input"
    )


def _load_tokenizer(path: Path):
    if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        return None
    import transformers

    return transformers.CLIPTokenizer.from_pretrained(str(path))


class EventCLIP:
    """Event, image and text towers with their params; each encoder is jitted once per shape.

    Params: {"image_tower", "event_tower", "text_tower", "logit_scale"}, float32.
    """

    def __init__(self, config: CLIPConfig, params: dict, tokenizer: Any = None,
                 dtype: Any = jnp.float32, attention_impl: str | None = None,
                 tokenizer_dir: str | os.PathLike | None = None):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.tokenizer_dir = tokenizer_dir
        self.towers = Towers(config, dtype=dtype, attention_impl=attention_impl)
        vision, text = self.towers.vision, self.towers.text
        self._vision = jax.jit(lambda p, x: vision.apply({"params": p}, x).astype(jnp.float32))
        self._text = jax.jit(lambda p, x: text.apply({"params": p}, x).astype(jnp.float32))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> EventCLIP:
        """An HF CLIP dir (the event tower is a copy of the image tower), an evclip checkpoint
        dir, or a training workdir (its latest checkpoint). A tokenizer beside it is loaded."""
        from evclip_jax import train

        if train.is_workdir(path):
            model = train.load_trained(path)
            return cls(model.config, model.params, tokenizer=model.tokenizer,
                       tokenizer_dir=model.tokenizer_dir, **kwargs)
        config, params = convert.load_any(path)
        params = jax.tree.map(jnp.asarray, params)
        return cls(config, params, tokenizer=_load_tokenizer(Path(path)),
                   tokenizer_dir=path, **kwargs)

    @property
    def logit_scale(self) -> jax.Array:
        return self.params["logit_scale"]

    def encode_images(self, pixel_values, normalize: bool = False) -> jax.Array:
        """Float [B, H, W, 3], already CLIP-normalised -> [B, D] projected embeddings."""
        out = self._vision(self.params["image_tower"], jnp.asarray(pixel_values, jnp.float32))
        return l2_normalize(out) if normalize else out

    def encode_events(self, frames, normalize: bool = False) -> jax.Array:
        """Event frames ([B, H, W] in [0, 1) or [B, H, W, 3] tower input) -> [B, D]."""
        out = self._vision(self.params["event_tower"], events_to_tower_input(frames))
        return l2_normalize(out) if normalize else out

    def tokenize(self, texts: list[str]) -> np.ndarray:
        if self.tokenizer is None:
            raise ValueError(
                "encode_text got strings but this checkpoint dir holds no tokenizer "
                "(vocab.json + merges.txt or tokenizer.json); pass token ids instead"
            )
        length = self.config.text.max_position_embeddings
        out = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=length, return_tensors="np")
        return out["input_ids"]

    def encode_text(self, input_ids, normalize: bool = False) -> jax.Array:
        """Int [B, L] token ids, or a list of strings when a tokenizer is loaded -> [B, D]."""
        if isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], str):
            input_ids = self.tokenize(input_ids)
        out = self._text(self.params["text_tower"], jnp.asarray(input_ids, jnp.int32))
        return l2_normalize(out) if normalize else out

    def save_pretrained_hf(self, out_dir: str | os.PathLike, tower: str = "event",
                           overwrite: bool = False) -> Path:
        """"event" | "image" -> a CLIPVisionModelWithProjection dir; "clip" -> a CLIPModel dir
        (with the image tower as its vision model)."""
        params = jax.tree.map(np.asarray, self.params)
        return convert.save_hf(params, self.config, out_dir, tower,
                               tokenizer_dir=self.tokenizer_dir, overwrite=overwrite)

    def save_pretrained(self, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
        """An evclip checkpoint dir (Orbax params + evclip.json + tokenizer files)."""
        params = jax.tree.map(np.asarray, self.params)
        return convert.save_evclip(params, self.config, out_dir,
                                   tokenizer_dir=self.tokenizer_dir, overwrite=overwrite)
