"""``EventCLIP``: inference with the three towers of an event CLIP, and export to HF and to
OpenAI layout."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from evclip_jax import checkpoint_files, checkpoints, convert, text
from evclip_jax.checkpoint_files import FileOptions
from evclip_jax.embed import embed_text, embed_vision, events_to_tower_input, l2_normalize
from evclip_jax.models.clip import CLIPConfig
from evclip_jax.models.towers import Towers

# Why EventBind's temporal event encoder cannot be exported to HF or OpenAI layout.
NO_HF_TWIN = (
    "the temporal event encoder (event_encoder='eventbind') has no HF transformers twin: "
    "CLIPVisionModelWithProjection (and OpenAI's and open_clip's visual tower) embeds one "
    "image, and has no temporal position embedding, no cross-frame prompts among an example's "
    "T frames, no event prompt tokens and no average over the frames. Keep it in our own "
    "format (save_pretrained: an evclip checkpoint dir); the image and text towers export as "
    "usual")


class EventCLIP:
    """Event, image and text towers with their params; each encoder is jitted once per shape.

    Params: {"image_tower", "event_tower", "text_tower", "logit_scale"}, float32 (and
    "text_prompts" with hybrid prompts).
    """

    def __init__(self, config: CLIPConfig, params: dict, tokenizer: Any = None,
                 dtype: Any = jnp.float32, attention_impl: str | None = None,
                 tokenizer_dir: str | os.PathLike | None = None):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.tokenizer_dir = tokenizer_dir
        self.towers = Towers(config, dtype=dtype, attention_impl=attention_impl)
        vision, event, text_tower = self.towers.vision, self.towers.event, self.towers.text
        self._vision = jax.jit(lambda p, x: embed_vision(vision, p, x))
        self._event = jax.jit(lambda p, x: embed_vision(event, p, x))
        self._text = jax.jit(lambda p, x: embed_text(text_tower, p, x))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, file_options: FileOptions | None = None,
                        **kwargs) -> EventCLIP:
        """Any model path (checkpoints.load_model): an HF CLIP dir (the event tower is a copy of
        the image tower), an evclip checkpoint dir, a training workdir (its latest checkpoint),
        or a checkpoint file in OpenAI layout (OpenAI, open_clip or the paper's release; read as
        ``file_options`` say). A tokenizer beside it is loaded; without one, a CLIP vocabulary
        is encoded by open_clip's tokenizer (text.token_ids)."""
        config, params, tok_dir = checkpoints.load_model(path, options=file_options)
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
        out = self._event(self.params["event_tower"],
                          events_to_tower_input(frames, representation))
        return l2_normalize(out) if normalize else out

    def tokenize(self, texts: list[str]) -> np.ndarray:
        """Token ids [N, L] of ``texts`` (text.token_ids): the checkpoint's tokenizer, or
        open_clip's for a CLIP vocabulary."""
        if self.tokenizer is None and self.config.text.vocab_size < text.CLIP_VOCAB_SIZE:
            raise ValueError(
                "encode_text got strings but this model has no tokenizer (vocab.json + "
                "merges.txt or tokenizer.json) and a vocabulary other than CLIP's; pass token "
                "ids instead")
        return text.token_ids(texts, self.config.text, self.tokenizer,
                              self.tokenizer_dir or "this model")

    def encode_text(self, input_ids, normalize: bool = False) -> jax.Array:
        """Int [B, L] token ids, or a list of strings when a tokenizer is loaded -> [B, D]."""
        if isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], str):
            input_ids = self.tokenize(input_ids)
        out = self._text(self.params["text_tower"], jnp.asarray(input_ids, jnp.int32))
        return l2_normalize(out) if normalize else out

    def save_pretrained_hf(self, out_dir: str | os.PathLike, tower: str = "event",
                           overwrite: bool = False) -> Path:
        """"event" | "image" -> a CLIPVisionModelWithProjection dir; "clip" -> a CLIPModel dir
        (with the image tower as its vision model). ValueError for the event tower of a
        temporal encoder (``NO_HF_TWIN``)."""
        params = jax.tree.map(np.asarray, self.params)
        return convert.save_hf(params, self._exported_config(tower == "event"), out_dir, tower,
                               tokenizer_dir=self.tokenizer_dir, overwrite=overwrite)

    def save_pretrained_openai(self, out: str | os.PathLike, tower: str = "event",
                               layout: str = "openai", overwrite: bool = False) -> Path:
        """A checkpoint file in OpenAI layout (checkpoint_files.save_file): layout "openai" ->
        a CLIP state dict with ``tower`` ("event", "image") as its image tower, which open_clip
        and OpenAI's clip load; "release" -> the paper's release layout (event tower).
        ValueError for the event tower of a temporal encoder (``NO_HF_TWIN``)."""
        params = jax.tree.map(np.asarray, self.params)
        config = self._exported_config(tower == "event" or layout == "release")
        return checkpoint_files.save_file(params, config, out, tower, layout, overwrite)

    def _exported_config(self, with_event_tower: bool) -> CLIPConfig:
        """The plain CLIP architecture of an export; the event-CLIP additions stay in our
        format (the learned prompts are left out, with a warning)."""
        if with_event_tower and self.config.event_encoder == "eventbind":
            raise ValueError(f"cannot export the event tower: {NO_HF_TWIN}")
        if "text_prompts" in self.params:
            logging.warning("the hybrid prompts' learned context and content MLP have no place "
                            "in an HF or OpenAI-layout CLIP; they are not exported (they stay in "
                            "this model's evclip checkpoint)")
        defaults = {f.name: f.default for f in dataclasses.fields(CLIPConfig)
                    if f.name in self.config.additions()}
        return dataclasses.replace(self.config, **defaults)

    def save_pretrained(self, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
        """An evclip checkpoint dir (Orbax params + evclip.json + tokenizer files)."""
        params = jax.tree.map(np.asarray, self.params)
        return convert.save_evclip(params, self.config, out_dir,
                                   tokenizer_dir=self.tokenizer_dir, overwrite=overwrite)
