"""E-CLIP / EventBind (Zhou et al., ECCV 2024): its temporal event encoder and the learnable
parts of its hybrid text prompts, built from the CLIP blocks of models/clip.py.

The temporal encoder (``EventBindTower``) embeds T event frames per example, [B, T, H, W, C]
-> [B, projection_dim]: a shared patch embedding with spatial and temporal position
embeddings and a [CLS] token per frame; before every transformer block the frames' [CLS]
tokens pass LayerNorm and self-attention across the frames ("cross-frame prompts"), and each
frame's sequence gets its cross-frame prompt and the block's learnable event prompt tokens
(visual prompt tuning); the frames' [CLS] outputs are projected and averaged.

Parameters: the image tower's tree (so CLIP's image tower drops in) plus EventBind's parts,
named as in its description:

    vision_model/embeddings/...             shared patch embedding, [CLS], spatial positions
    vision_model/temporal_embedding         [T, width] temporal position embedding
    vision_model/encoder/layers_{i}/...     CLIP's blocks
    vision_model/encoder/cross_frame_prompts_{i}/{layer_norm, self_attn}   before block i
    vision_model/encoder/event_prompts_{i}  [P, width] block i's event prompt tokens
    vision_model/encoder/prompt_gate_{i}    [heads] block i's gate of the prompt tokens

Every new parameter starts with no effect, so at initialisation the encoder is CLIP's image
tower applied to each frame with the T embeddings averaged (``embed.embed_vision`` on
[B, T, H, W, C]): the temporal embedding is zero, and the prompt tokens (event prompts and
cross-frame prompt) reach the frame's tokens only through attention scaled by a gate that
starts at zero (models/clip.Attention). Deviations from EventBind's release: the gate is ours
(LLaMA-Adapter's zero-init attention; the release's prompts act at full strength from the
first step, so its encoder is not CLIP at initialisation), and the release's linear map of the
[CLS] tokens before the cross-frame LayerNorm, which the description does not have, is left
out.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from evclip_jax.models.clip import (
    ACTIVATION_AXES,
    Attention,
    Dtype,
    TowerConfig,
    VisionEmbeddings,
    _dense,
    _layer_norm,
    encoder_layer,
)


class CrossFramePrompt(nn.Module):
    """Cross-frame prompts of one block: each frame's [CLS] token plus the self-attention of
    the LayerNormed [CLS] tokens of its example's T frames. [B, T, width] -> [B, T, width]."""

    cfg: TowerConfig
    dtype: Dtype
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, cls_tokens):
        h = _layer_norm(self.cfg, self.dtype, "layer_norm")(cls_tokens)
        return cls_tokens + Attention(self.cfg, self.dtype, False, self.attention_impl,
                                      name="self_attn")(h)


class TemporalEncoder(nn.Module):
    """CLIP's blocks with EventBind's prompts before each: [B*T, N, width] -> the frames'
    [CLS] outputs, [B*T, width]."""

    cfg: TowerConfig
    num_frames: int
    num_prompts: int
    dtype: Dtype
    attention_impl: str | None = None
    remat: str = "none"

    @nn.compact
    def __call__(self, x):
        cfg, t = self.cfg, self.num_frames
        bt, _, width = x.shape
        layer_cls = encoder_layer(self.remat)
        # EventBind's release initialises prompt tokens uniformly in +-sqrt(6 / (3 p^2 + width))
        # (Xavier over a patch's pixels and the width).
        bound = math.sqrt(6.0 / (3 * cfg.patch_size ** 2 + width))

        def uniform(key, shape, dtype=jnp.float32):
            return nn.initializers.uniform(2 * bound)(key, shape, dtype) - bound

        for i in range(cfg.num_hidden_layers):
            cls_tokens = x[:, 0].reshape(bt // t, t, width)
            cross = CrossFramePrompt(cfg, self.dtype, self.attention_impl,
                                     name=f"cross_frame_prompts_{i}")(cls_tokens)
            prompts = [cross.reshape(bt, 1, width)]
            if self.num_prompts:
                event = self.param(f"event_prompts_{i}",
                                   nn.with_logical_partitioning(uniform, (None, "embed")),
                                   (self.num_prompts, width), jnp.float32)
                prompts.insert(0, jnp.broadcast_to(event.astype(self.dtype),
                                                   (bt, self.num_prompts, width)))
            gate = self.param(f"prompt_gate_{i}",
                              nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                              (cfg.num_attention_heads,), jnp.float32)
            # The last block computes the [CLS] tokens only: nothing reads the others.
            x = layer_cls(cfg, self.dtype, False, self.attention_impl,
                          i == cfg.num_hidden_layers - 1, name=f"layers_{i}")(
                x, None, jnp.concatenate(prompts, axis=1), gate)
        return x[:, 0]


class TemporalVisionTransformer(nn.Module):
    """EventBind's vision transformer: [B, T, H, W, C] -> the frames' pooled [CLS] tokens
    after post_layernorm, [B*T, width]."""

    cfg: TowerConfig
    num_frames: int
    num_prompts: int
    dtype: Dtype
    attention_impl: str | None = None
    remat: str = "none"

    @nn.compact
    def __call__(self, frames):
        cfg = self.cfg
        expected = (self.num_frames, cfg.image_size, cfg.image_size, cfg.num_channels)
        if frames.ndim != 5 or tuple(frames.shape[1:]) != expected:
            raise ValueError(
                f"event frames have shape {tuple(frames.shape)}; the temporal event encoder "
                f"takes [batch, {', '.join(map(str, expected))}] (T = num_frames frames, NHWC)")
        b, t = frames.shape[:2]
        x = VisionEmbeddings(cfg, self.dtype, name="embeddings")(
            frames.reshape(b * t, *frames.shape[2:]))
        temporal = self.param(
            "temporal_embedding", nn.with_logical_partitioning(nn.initializers.zeros,
                                                               (None, "embed")),
            (t, cfg.hidden_size), jnp.float32)
        # Frame f of every example gets temporal_embedding[f] on each of its tokens.
        x = x + jnp.tile(temporal.astype(self.dtype), (b, 1))[:, None, :]
        x = _layer_norm(cfg, self.dtype, "pre_layrnorm")(x)  # sic: HF's spelling
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        if self.attention_impl == "cudnn":
            raise ValueError("attention_impl='cudnn': the temporal event encoder takes '' or "
                             "'xla' (its prompt attention is not padded for cuDNN)")
        x = TemporalEncoder(cfg, self.num_frames, self.num_prompts, self.dtype,
                            self.attention_impl, self.remat, name="encoder")(x)
        return _layer_norm(cfg, self.dtype, "post_layernorm")(x)


class EventBindTower(nn.Module):
    """EventBind's temporal event encoder plus ``visual_projection``.

    Input: float [B, T, H, W, C] (T = ``num_frames``). Output: [B, projection_dim],
    unnormalised: the mean over the frames of their projected [CLS] outputs.
    """

    cfg: TowerConfig
    num_frames: int
    num_prompts: int
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    remat: str = "none"

    @nn.compact
    def __call__(self, frames):
        pooled = TemporalVisionTransformer(self.cfg, self.num_frames, self.num_prompts,
                                           self.dtype, self.attention_impl, self.remat,
                                           name="vision_model")(frames)
        out = _dense(self.cfg.projection_dim, ("embed", "proj"), self.dtype, use_bias=False,
                     name="visual_projection")(pooled)
        return out.reshape(frames.shape[0], self.num_frames, -1).mean(axis=1)


# The content-prompt MLP's hidden width is embed_dim // 16, as in EventBind's release.
CONTENT_REDUCTION = 16


class HybridPrompts(nn.Module):
    """The learnable parts of EventBind's hybrid text prompts, as offsets of the prompt's token
    embeddings at each of the text tower's L positions.

    ``context`` [L, width] is the learnable context (KgCoOp: added to the hand-written prompt's
    token embeddings); the content prompt is an MLP (Linear, ReLU, Linear) of a unit image or
    event embedding [N, embed_dim], added at every context position. Both start at zero, so the
    untrained prompts are the hand-written ones. evclip_jax/prompts.py applies the offsets at
    the template's context positions. Output: [N, L, width], or [1, L, width] without ``cond``.
    """

    text_cfg: TowerConfig
    embed_dim: int

    @nn.compact
    def __call__(self, cond=None):
        length, width = self.text_cfg.max_position_embeddings, self.text_cfg.hidden_size
        context = self.param("context", nn.initializers.zeros, (length, width), jnp.float32)
        if cond is None:
            return context[None]
        hidden = max(self.embed_dim // CONTENT_REDUCTION, 1)
        h = nn.relu(nn.Dense(hidden, name="content_net_fc1")(cond.astype(jnp.float32)))
        content = nn.Dense(width, kernel_init=nn.initializers.zeros,
                           name="content_net_fc2")(h)
        return context[None] + content[:, None, :]
