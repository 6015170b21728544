"""The Flax modules of an event CLIP, chosen by its CLIPConfig, and their params.

Image and text towers are CLIP's (models/clip.py). The event tower is the image tower's
architecture (the paper) or EventBind's temporal encoder, and hybrid text prompts add a prompt
learner (models/eventbind.py). Params: {image_tower, event_tower, text_tower, logit_scale},
plus text_prompts with hybrid prompts.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from evclip_jax.models.clip import CLIPConfig, Dtype, TextTower, VisionTower
from evclip_jax.models.eventbind import EventBindTower, HybridPrompts


@dataclasses.dataclass(frozen=True)
class Towers:
    """The modules of an event CLIP with their compute dtype, attention and remat settings."""

    config: CLIPConfig
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    remat: str = "none"

    @property
    def vision(self) -> VisionTower:
        """The image tower (and the event tower of the paper's model)."""
        return VisionTower(self.config.vision, self.dtype, self.attention_impl, self.remat)

    @property
    def event(self) -> VisionTower | EventBindTower:
        """The event tower: ``vision``'s architecture, or EventBind's temporal encoder."""
        if self.config.event_encoder == "eventbind":
            return EventBindTower(self.config.vision, self.config.num_frames,
                                  self.config.event_prompts, self.dtype, self.attention_impl,
                                  self.remat)
        return self.vision

    @property
    def text(self) -> TextTower:
        return TextTower(self.config.text, self.dtype, self.attention_impl, self.remat)

    @property
    def prompts(self) -> HybridPrompts | None:
        """The learnable parts of hybrid text prompts; None with hand-written prompts."""
        if self.config.text_prompts == "hybrid":
            return HybridPrompts(self.config.text, self.config.projection_dim)
        return None

    def dummy_inputs(self):
        """Zero images [1, S, S, C] and token ids [1, L]."""
        v, t = self.config.vision, self.config.text
        return (jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32),
                jnp.zeros((1, t.max_position_embeddings), jnp.int32))

    def init(self, rng: jax.Array, boxed: bool = False) -> dict:
        """Random params. The event tower starts from the image tower, as in the method (a copy,
        or the temporal encoder holding the image tower's weights; ``complete``).

        With ``boxed`` the leaves stay ``nn.LogicallyPartitioned`` so their logical axes can
        be read.
        """
        images, ids = self.dummy_inputs()
        k_img, k_txt = jax.random.split(rng)
        image = self.vision.init(k_img, images)["params"]
        text = self.text.init(k_txt, ids)["params"]
        params = {
            "image_tower": image,
            # Copies, not the same arrays: the train step donates the event tower.
            "event_tower": jax.tree.map(jnp.copy, image),
            "text_tower": text,
            "logit_scale": jnp.asarray(self.config.logit_scale_init_value, jnp.float32),
        }
        params = self._complete(params, jax.random.fold_in(rng, 2), boxed)
        return params if boxed else nn.unbox(params)

    def complete(self, params: dict, rng: jax.Array) -> dict:
        """The params of a CLIP (an event tower of the image tower's architecture, no prompt
        learner: what HF and OpenAI-layout checkpoints hold) made this model's. The temporal
        encoder takes the image tower's weights and starts its own parameters as described in
        models/eventbind.py; the prompt learner starts at zero. Parts already there are kept."""
        return self._complete(dict(params), rng, boxed=False)

    def _complete(self, params: dict, rng: jax.Array, boxed: bool) -> dict:
        k_event, k_prompts = jax.random.split(rng)
        event = params["event_tower"]
        if self.config.event_encoder == "eventbind" and "temporal_embedding" not in event[
                "vision_model"]:
            frames = jnp.zeros((1, self.config.num_frames, *self.dummy_inputs()[0].shape[1:]))
            temporal = jax.jit(self.event.init)(k_event, frames)["params"]
            params["event_tower"] = _with_image_tower(
                temporal if boxed else nn.unbox(temporal), params["image_tower"])
        if self.prompts is not None and "text_prompts" not in params:
            cond = jnp.zeros((1, self.config.projection_dim), jnp.float32)
            params["text_prompts"] = jax.jit(self.prompts.init)(k_prompts, cond)["params"]
        return params

    def abstract_params(self) -> dict:
        """Shapes and dtypes of ``init``'s params, without allocating them."""
        return jax.eval_shape(self.init, jax.random.key(0))

    def logical_axes(self) -> dict:
        """Logical axis names of each param leaf (a PartitionSpec of names per leaf)."""
        boxed = jax.eval_shape(lambda: self.init(jax.random.key(0), boxed=True))
        return nn.get_partition_spec(boxed)


def _with_image_tower(event: dict, image: dict) -> dict:
    """The temporal encoder's params with every leaf the image tower has taken from it (fresh
    copies: the train step donates the event tower)."""
    flat = traverse_util.flatten_dict(event)
    for path, leaf in traverse_util.flatten_dict(image).items():
        if path not in flat:
            raise ValueError(f"image tower param {'/'.join(path)} has no place in the "
                             "temporal event encoder")
        flat[path] = jax.tree.map(jnp.copy, leaf)
    return traverse_util.unflatten_dict(flat)
