"""Flax CLIP towers that compute the same function as transformers' CLIPModel.

Module and parameter names mirror the HF state dict (``vision_model.encoder.layers_0.self_attn
.q_proj.kernel`` <-> ``vision_model.encoder.layers.0.self_attn.q_proj.weight``), so conversion
(evclip_jax/convert.py) is a renaming table plus transposes. Parameters carry logical axis
names (``embed``, ``mlp``, ``heads``, ``vocab``) that the trainer maps onto a device mesh.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# CLIPConfig too: callers name the configs clip.CLIPConfig and clip.TowerConfig.
from evclip_jax.models.config import ACTIVATIONS, CLIPConfig, TowerConfig  # noqa: F401
from evclip_jax.models.layer_norm import LayerNorm

Dtype = Any

# Activations [batch, length, width] are constrained on the batch dim only; GSPMD places the rest.
ACTIVATION_AXES = ("batch", None, None)


def _matmuls_and_fused_attention(prim, *args, **params) -> bool:
    """Saves the weight matmuls' outputs and cuDNN fused attention's outputs (the attention
    output and its softmax statistics, the residuals of its backward kernel)."""
    return (prim.name == "dot_product_attention_fwd_wrapper"
            or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params))


# What a transformer block keeps for the backward pass (``model.remat``): "none" keeps every
# activation; "matmuls" keeps the outputs of the block's weight matmuls and recomputes the
# rest (LayerNorms, the activation, attention); "matmuls_attention" also keeps cuDNN fused
# attention's outputs, so that only the LayerNorms and the activation are recomputed; "full"
# keeps only the block's input.
REMAT_POLICIES = {
    "none": None,
    "matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "matmuls_attention": _matmuls_and_fused_attention,
    "full": jax.checkpoint_policies.nothing_saveable,
}


# Random init (demo and tests; converted checkpoints replace it): fan-in scaled kernels, so a
# random tower's output depends on its input. With HF's 0.02-std kernels a small random tower
# gives nearly one embedding for every image (cosine 0.9999), which leaves nothing to learn.
_KERNEL_INIT = nn.initializers.lecun_normal()


def _dense(features: int, names: tuple[str, str], dtype: Dtype, use_bias: bool = True,
           name: str | None = None) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(_KERNEL_INIT, names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (names[1],)),
        name=name,
    )


def _layer_norm(cfg: TowerConfig, dtype: Dtype, name: str) -> LayerNorm:
    return LayerNorm(cfg.layer_norm_eps, dtype, name=name)


class Projection(nn.Module):
    """The params of an ``nn.Dense`` of this name (``kernel`` [in, features], ``bias``
    [features]), returned for a caller that applies them itself."""

    features: int
    names: tuple[str, str]

    @nn.compact
    def __call__(self, in_features: int):
        kernel = self.param("kernel", nn.with_logical_partitioning(_KERNEL_INIT, self.names),
                            (in_features, self.features), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                               (self.names[1],)),
                          (self.features,), jnp.float32)
        return kernel, bias


class Attention(nn.Module):
    """Multi-head self-attention through ``jax.nn.dot_product_attention``.

    The key and value biases are not added to the tokens: a key bias adds the same logit to
    every key of a query's softmax, which cancels; a value bias adds itself to every output row
    (a softmax sums to one), so it goes into out_proj's bias (out_proj(y + b_v) = out_proj(y)
    + b_v W_o). The function is HF's; the backward has two bias-gradient sums over
    [B, T, width] fewer per block (ViT-L/14 step +1.8% on an H200).

    With ``prompts`` [B, P, width] (already layer-normed), the queries also attend to the
    prompt tokens, through the same key and value projections, in a softmax of their own whose
    output is scaled per head by ``prompt_gate`` [heads] and added (LLaMA-Adapter's zero-init
    attention): a zero gate leaves the output exactly that of the plain attention. The prompt
    tokens themselves produce no output (the temporal event encoder, models/eventbind.py).
    ``first_token_only``: only the first token queries, [B, T, width] -> [B, 1, width] (the
    last block of a tower pooled at its [CLS] token), in XLA's attention (one query).
    """

    cfg: TowerConfig
    dtype: Dtype
    causal: bool
    attention_impl: str | None = None
    first_token_only: bool = False

    @nn.compact
    def __call__(self, x, lengths=None, prompts=None, prompt_gate=None):
        cfg, width = self.cfg, self.cfg.hidden_size
        heads, head_dim = cfg.num_attention_heads, width // cfg.num_attention_heads
        (wq, bq), (wk, _), (wv, bv), (wo, bo) = (
            Projection(width, names, name=name)(width)
            for name, names in (("q_proj", ("embed", "heads")), ("k_proj", ("embed", "heads")),
                                ("v_proj", ("embed", "heads")), ("out_proj", ("heads", "embed"))))

        def cast(a):
            return a.astype(self.dtype)

        def split_heads(a):
            return a.reshape(*a.shape[:2], heads, head_dim)

        def keys_values(tokens):
            return split_heads(tokens @ cast(wk)), split_heads(tokens @ cast(wv))

        queries, query_lengths, impl = ((x[:, :1], None, None) if self.first_token_only else
                                        (x, lengths, self.attention_impl))
        q = split_heads(queries @ cast(wq) + cast(bq))
        # Scaling by head_dim**-0.5 is the default of dot_product_attention, as in HF.
        y = jax.nn.dot_product_attention(
            q, *keys_values(x), is_causal=self.causal, query_seq_lengths=query_lengths,
            key_value_seq_lengths=lengths, implementation=impl
        )
        value_bias = bv
        if prompts is not None:
            y = y + prompt_gate.astype(y.dtype)[:, None] * jax.nn.dot_product_attention(
                q, *keys_values(prompts), implementation=impl)
            value_bias = (bv.reshape(heads, head_dim) * (1 + prompt_gate)[:, None]).reshape(-1)
        y = y.reshape(*q.shape[:2], width)
        out_bias = bo + jnp.dot(value_bias, wo, precision=jax.lax.Precision.HIGHEST)
        return y @ cast(wo) + cast(out_bias)


class MLP(nn.Module):
    cfg: TowerConfig
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        act = ACTIVATIONS[self.cfg.hidden_act]
        x = _dense(self.cfg.intermediate_size, ("embed", "mlp"), self.dtype, name="fc1")(x)
        x = act(x)
        return _dense(self.cfg.hidden_size, ("mlp", "embed"), self.dtype, name="fc2")(x)


class EncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)); with
    ``first_token_only``, of the first token only: [B, T, width] -> [B, 1, width]."""

    cfg: TowerConfig
    dtype: Dtype
    causal: bool
    attention_impl: str | None = None
    first_token_only: bool = False

    @nn.compact
    def __call__(self, x, lengths=None, prompts=None, prompt_gate=None):
        layer_norm1 = _layer_norm(self.cfg, self.dtype, "layer_norm1")
        prompts = None if prompts is None else layer_norm1(prompts)  # see Attention
        y = Attention(self.cfg, self.dtype, self.causal, self.attention_impl,
                      self.first_token_only, name="self_attn")(layer_norm1(x), lengths, prompts,
                                                                prompt_gate)
        x = x[:, :y.shape[1]] + y
        h = _layer_norm(self.cfg, self.dtype, "layer_norm2")(x)
        x = x + MLP(self.cfg, self.dtype, name="mlp")(h)
        return nn.with_logical_constraint(x, ACTIVATION_AXES)


def encoder_layer(remat: str) -> type[EncoderLayer]:
    """EncoderLayer, rematerialised under the ``model.remat`` policy (REMAT_POLICIES)."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}: expected one of {sorted(REMAT_POLICIES)}")
    return EncoderLayer if remat == "none" else nn.remat(EncoderLayer,
                                                         policy=REMAT_POLICIES[remat])


class Encoder(nn.Module):
    """The blocks of a tower: [B, T, width] -> [B, T, width], or the first token's output
    [B, width] with ``first_token_only`` (whose last block computes no other token)."""

    cfg: TowerConfig
    dtype: Dtype
    causal: bool
    attention_impl: str | None = None
    remat: str = "none"
    first_token_only: bool = False

    @nn.compact
    def __call__(self, x):
        length, lengths = x.shape[1], None
        if self.attention_impl == "cudnn" and length % 2:
            # JAX's cuDNN attention refuses odd lengths under jax.grad (ViT-L/14 has 257
            # tokens, the text tower 77): add one token, masked out of every attention through
            # the sequence lengths, and drop it at the end.
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))
            lengths = jnp.full((x.shape[0],), length, jnp.int32)
        layer_cls = encoder_layer(self.remat)
        last = self.cfg.num_hidden_layers - 1
        for i in range(self.cfg.num_hidden_layers):
            x = layer_cls(self.cfg, self.dtype, self.causal, self.attention_impl,
                          self.first_token_only and i == last, name=f"layers_{i}")(x, lengths)
        return x[:, 0] if self.first_token_only else x[:, :length]


class PatchEmbedding(nn.Module):
    """HF's stride-p ``Conv2d`` patch embedding (kernel [p, p, C, D], no bias), computed as one
    matmul of the flattened patches: the GPU runs that far faster than the convolution."""

    cfg: TowerConfig
    dtype: Dtype

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.cfg
        p, c, grid = cfg.patch_size, cfg.num_channels, cfg.image_size // cfg.patch_size
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(_KERNEL_INIT, (None, None, "channels", "embed")),
            (p, p, c, cfg.hidden_size),
            jnp.float32,
        )
        b = pixel_values.shape[0]
        # A "VALID" convolution ignores the pixels past the last whole patch.
        x = pixel_values[:, : grid * p, : grid * p].astype(self.dtype)
        x = x.reshape(b, grid, p, grid, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, grid * grid, p * p * c)  # each patch flattened as (row, col, channel)
        return x @ kernel.astype(self.dtype).reshape(p * p * c, cfg.hidden_size)


class VisionEmbeddings(nn.Module):
    cfg: TowerConfig
    dtype: Dtype

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.cfg
        patches = PatchEmbedding(cfg, self.dtype, name="patch_embedding")(pixel_values)
        b = patches.shape[0]
        cls = self.param(
            "class_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
            (cfg.hidden_size,),
            jnp.float32,
        )
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1)
        pos = nn.Embed(
            cfg.num_patches + 1,
            cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("length", "embed")),
            name="position_embedding",
        )
        return x + pos.embedding[None].astype(self.dtype)


class VisionTransformer(nn.Module):
    """HF ``CLIPVisionTransformer``: returns the pooled class token after post_layernorm."""

    cfg: TowerConfig
    dtype: Dtype
    attention_impl: str | None = None
    remat: str = "none"

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.cfg
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; expected "
                f"[batch, {', '.join(map(str, expected))}] (NHWC) for this vision config"
            )
        x = VisionEmbeddings(cfg, self.dtype, name="embeddings")(pixel_values)
        x = _layer_norm(cfg, self.dtype, "pre_layrnorm")(x)  # sic: HF's spelling
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        x = Encoder(cfg, self.dtype, False, self.attention_impl, self.remat,
                    first_token_only=True, name="encoder")(x)
        return _layer_norm(cfg, self.dtype, "post_layernorm")(x)


class TextTransformer(nn.Module):
    """HF ``CLIPTextTransformer``: causal encoder pooled at the end-of-text token."""

    cfg: TowerConfig
    dtype: Dtype
    attention_impl: str | None = None
    remat: str = "none"

    @nn.compact
    def __call__(self, input_ids, token_offsets=None):
        cfg = self.cfg
        length = input_ids.shape[1]
        if length > cfg.max_position_embeddings:
            raise ValueError(
                f"input_ids has length {length}; the text tower takes at most "
                f"max_position_embeddings={cfg.max_position_embeddings} tokens"
            )
        x = TextEmbeddings(cfg, self.dtype, name="embeddings")(input_ids, token_offsets)
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        x = Encoder(cfg, self.dtype, True, self.attention_impl, self.remat, name="encoder")(x)
        x = _layer_norm(cfg, self.dtype, "final_layer_norm")(x)
        if cfg.eos_token_id == 2:
            # Legacy configs: the end-of-text token has the largest id in the vocabulary.
            eos_index = jnp.argmax(input_ids, axis=-1)
        else:
            # First occurrence of the end-of-text token (padding may reuse the same id).
            eos_index = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
        return x[jnp.arange(x.shape[0]), eos_index]


class TextEmbeddings(nn.Module):
    """Token plus position embedding (HF ``CLIPTextEmbeddings``). ``token_offsets`` [B, L,
    width] are added to the token embeddings: learned prompts (evclip_jax/prompts.py)."""

    cfg: TowerConfig
    dtype: Dtype

    @nn.compact
    def __call__(self, input_ids, token_offsets=None):
        cfg = self.cfg
        tok = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("vocab", "embed")),
            name="token_embedding",
        )
        pos = nn.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype,
            param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.01), ("length", "embed")),
            name="position_embedding",
        )
        length = input_ids.shape[1]
        tokens = tok(input_ids)
        if token_offsets is not None:
            tokens = tokens + token_offsets.astype(self.dtype)
        return tokens + pos.embedding[None, :length].astype(self.dtype)


class VisionTower(nn.Module):
    """Image (or event) tower: vision transformer plus ``visual_projection``.

    The parameter tree equals HF ``CLIPVisionModelWithProjection``'s state dict.
    Input: float [B, H, W, C] (NHWC). Output: [B, projection_dim], unnormalised.
    """

    cfg: TowerConfig
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    remat: str = "none"

    @nn.compact
    def __call__(self, pixel_values):
        pooled = VisionTransformer(self.cfg, self.dtype, self.attention_impl, self.remat,
                                   name="vision_model")(pixel_values)
        return _dense(self.cfg.projection_dim, ("embed", "proj"), self.dtype, use_bias=False,
                      name="visual_projection")(pooled)


class TextTower(nn.Module):
    """Text tower: text transformer plus ``text_projection``.

    The parameter tree equals HF ``CLIPTextModelWithProjection``'s state dict.
    Input: int [B, L] token ids (and optional float [B, L, width] offsets of their token
    embeddings). Output: [B, projection_dim], unnormalised.
    """

    cfg: TowerConfig
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    remat: str = "none"

    @nn.compact
    def __call__(self, input_ids, token_offsets=None):
        pooled = TextTransformer(self.cfg, self.dtype, self.attention_impl, self.remat,
                                 name="text_model")(input_ids, token_offsets)
        return _dense(self.cfg.projection_dim, ("embed", "proj"), self.dtype, use_bias=False,
                      name="text_projection")(pooled)
