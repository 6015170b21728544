"""``EventCLIP``: inference with the three towers of an event CLIP, and export to HF."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from evclip_jax import checkpoints, convert, text
from evclip_jax.embed import embed_text, embed_vision, events_to_tower_input, l2_normalize
from evclip_jax.models.clip import CLIPConfig, Towers


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
        vision, text_tower = self.towers.vision, self.towers.text
        self._vision = jax.jit(lambda p, x: embed_vision(vision, p, x))
        self._text = jax.jit(lambda p, x: embed_text(text_tower, p, x))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> EventCLIP:
        """Any model path (checkpoints.load_model): an HF CLIP dir (the event tower is a copy of
        the image tower), an evclip checkpoint dir, or a training workdir (its latest
        checkpoint). A tokenizer beside it is loaded."""
        config, params, tok_dir = checkpoints.load_model(path)
        params = jax.tree.map(jnp.asarray, params)
        return cls(config, params, tokenizer=text.load_tokenizer(tok_dir),
                   tokenizer_dir=tok_dir, **kwargs)

    @property
    def logit_scale(self) -> jax.Array:
        return self.params["logit_scale"]

    def encode_images(self, pixel_values, normalize: bool = False) -> jax.Array:
        """Float [B, H, W, 3], already CLIP-normalised -> [B, D] projected embeddings."""
        out = self._vision(self.params["image_tower"], jnp.asarray(pixel_values, jnp.float32))
        return l2_normalize(out) if normalize else out

    def encode_events(self, frames, normalize: bool = False,
                      representation: str = "evclip") -> jax.Array:
        """Event representations -> [B, D]: [B, H, W] Eq. 1 frames in [0, 1) (or [B, H, W, 3]
        tower input), or another representation as ``embed.events_to_tower_input`` takes it."""
        out = self._vision(self.params["event_tower"],
                           events_to_tower_input(frames, representation))
        return l2_normalize(out) if normalize else out

    def tokenize(self, texts: list[str]) -> np.ndarray:
        if self.tokenizer is None:
            raise ValueError(
                "encode_text got strings but this checkpoint dir holds no tokenizer "
                "(vocab.json + merges.txt or tokenizer.json); pass token ids instead"
            )
        return text.token_ids(texts, self.config.text, self.tokenizer)

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
