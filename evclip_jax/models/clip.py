"""Flax CLIP towers that compute the same function as transformers' CLIPModel.

Module and parameter names mirror the HF state dict (``vision_model.encoder.layers_0.self_attn
.q_proj.kernel`` <-> ``vision_model.encoder.layers.0.self_attn.q_proj.weight``), so conversion
(evclip_jax/convert.py) is a renaming table plus transposes. Parameters carry logical axis
names (``embed``, ``mlp``, ``heads``, ``vocab``) that the trainer maps onto a device mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from evclip_jax.models.layer_norm import LayerNorm

Dtype = Any

# Activations [batch, length, width] are constrained on the batch dim only; GSPMD places the rest.
ACTIVATION_AXES = ("batch", None, None)

# Activation names used in HF CLIP configs.
_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


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


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """Transformer sizes of one tower; the fields and defaults follow HF CLIP{Vision,Text}Config."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    projection_dim: int
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # Vision only.
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    # Text only.
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    eos_token_id: int = 49407

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is not supported; expected one of "
                f"{sorted(_ACTIVATIONS)}"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Both towers of a CLIP model plus the initial logit scale, and what an event CLIP adds.

    The additions have no field in HF's CLIPModel; the defaults are the paper's model:
    ``event_encoder`` "vit" (the image tower's architecture) or "eventbind" (E-CLIP/EventBind's
    temporal encoder over ``num_frames`` frames with ``event_prompts`` prompt tokens per block,
    models/eventbind.py); ``text_prompts`` "handcrafted" (the class prompts as written) or
    "hybrid" (EventBind's learned context and content prompts, models/eventbind.py).
    """

    vision: TowerConfig
    text: TowerConfig
    projection_dim: int
    logit_scale_init_value: float = 2.6592
    event_encoder: str = "vit"
    num_frames: int = 1
    event_prompts: int = 0
    text_prompts: str = "handcrafted"

    def __post_init__(self):
        if self.event_encoder not in EVENT_ENCODERS:
            raise ValueError(f"event_encoder={self.event_encoder!r}: expected one of "
                             f"{EVENT_ENCODERS}")
        if self.text_prompts not in TEXT_PROMPTS:
            raise ValueError(f"text_prompts={self.text_prompts!r}: expected one of "
                             f"{TEXT_PROMPTS}")
        if self.num_frames < 1 or self.event_prompts < 0:
            raise ValueError(f"num_frames={self.num_frames}, event_prompts="
                             f"{self.event_prompts}: expected >= 1 and >= 0")

    def additions(self) -> dict:
        """The event-CLIP fields that differ from their defaults (evclip.json stores them)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name in _ADDITIONS and getattr(self, f.name) != f.default}

    @classmethod
    def from_hf_dict(cls, config: dict) -> CLIPConfig:
        """Builds the config from an HF ``config.json`` dict, with HF's own defaults."""
        import transformers

        hf = transformers.CLIPConfig.from_dict(config)
        fields = {f.name for f in dataclasses.fields(TowerConfig)}

        def tower(sub) -> TowerConfig:
            values = {k: getattr(sub, k) for k in fields if hasattr(sub, k)}
            values["projection_dim"] = hf.projection_dim
            return TowerConfig(**values)

        additions = config.get(ADDITIONS_KEY) or {}
        unknown = sorted(set(additions) - set(_ADDITIONS))
        if unknown:
            raise ValueError(f"{ADDITIONS_KEY}: unknown field(s) {unknown}; expected some of "
                             f"{list(_ADDITIONS)}")
        return cls(
            vision=tower(hf.vision_config),
            text=tower(hf.text_config),
            projection_dim=hf.projection_dim,
            logit_scale_init_value=hf.logit_scale_init_value,
            **additions,
        )

    def to_hf_dict(self) -> dict:
        """The HF ``CLIPConfig`` dict for this model (what ``config.json`` holds); the event-CLIP
        additions that differ from their defaults go under ``ADDITIONS_KEY``."""
        import transformers

        vision_keys = ("hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "layer_norm_eps", "hidden_act", "image_size",
                       "patch_size", "num_channels", "projection_dim")
        text_keys = ("hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "layer_norm_eps", "hidden_act", "vocab_size",
                     "max_position_embeddings", "eos_token_id", "projection_dim")
        text = {k: getattr(self.text, k) for k in text_keys}
        if self.text.vocab_size <= 49406:
            # HF's default bos id (49406) lies outside a small test vocabulary.
            text["bos_token_id"] = min(self.text.vocab_size - 1, self.text.eos_token_id)
        hf = transformers.CLIPConfig(
            text_config=text,
            vision_config={k: getattr(self.vision, k) for k in vision_keys},
            projection_dim=self.projection_dim,
            logit_scale_init_value=self.logit_scale_init_value,
        )
        out = hf.to_dict()
        if self.additions():
            out[ADDITIONS_KEY] = self.additions()
        return out


EVENT_ENCODERS = ("vit", "eventbind")
TEXT_PROMPTS = ("handcrafted", "hybrid")
_ADDITIONS = ("event_encoder", "num_frames", "event_prompts", "text_prompts")
# The key of the HF config dict under which CLIPConfig.to_hf_dict stores the additions.
ADDITIONS_KEY = "evclip_additions"


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


class Attention(nn.Module):
    """Multi-head self-attention through ``jax.nn.dot_product_attention``.

    With ``prompts`` [B, P, width] (already layer-normed), the queries also attend to the
    prompt tokens, through the same key and value projections, in a softmax of their own whose
    output is scaled per head by ``prompt_gate`` [heads] and added (LLaMA-Adapter's zero-init
    attention): a zero gate leaves the output exactly that of the plain attention. The prompt
    tokens themselves produce no output (the temporal event encoder, models/eventbind.py).
    """

    cfg: TowerConfig
    dtype: Dtype
    causal: bool
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, lengths=None, prompts=None, prompt_gate=None):
        cfg = self.cfg
        heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        b, t, _ = x.shape
        proj = {name: _dense(cfg.hidden_size, ("embed", "heads"), self.dtype, name=name)
                for name in ("q_proj", "k_proj", "v_proj")}

        def project(name, tokens):
            return proj[name](tokens).reshape(*tokens.shape[:2], heads, head_dim)

        q, k, v = project("q_proj", x), project("k_proj", x), project("v_proj", x)
        # Scaling by head_dim**-0.5 is the default of dot_product_attention, as in HF.
        y = jax.nn.dot_product_attention(
            q, k, v, is_causal=self.causal, query_seq_lengths=lengths,
            key_value_seq_lengths=lengths, implementation=self.attention_impl
        )
        if prompts is not None:
            y_prompts = jax.nn.dot_product_attention(
                q, project("k_proj", prompts), project("v_proj", prompts),
                implementation=self.attention_impl)
            y = y + prompt_gate.astype(y.dtype)[:, None] * y_prompts
        y = y.reshape(b, t, cfg.hidden_size)
        return _dense(cfg.hidden_size, ("heads", "embed"), self.dtype, name="out_proj")(y)


class MLP(nn.Module):
    cfg: TowerConfig
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        act = _ACTIVATIONS[self.cfg.hidden_act]
        x = _dense(self.cfg.intermediate_size, ("embed", "mlp"), self.dtype, name="fc1")(x)
        x = act(x)
        return _dense(self.cfg.hidden_size, ("mlp", "embed"), self.dtype, name="fc2")(x)


class EncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    cfg: TowerConfig
    dtype: Dtype
    causal: bool
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, lengths=None, prompts=None, prompt_gate=None):
        layer_norm1 = _layer_norm(self.cfg, self.dtype, "layer_norm1")
        prompts = None if prompts is None else layer_norm1(prompts)  # see Attention
        x = x + Attention(self.cfg, self.dtype, self.causal, self.attention_impl,
                          name="self_attn")(layer_norm1(x), lengths, prompts, prompt_gate)
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
    cfg: TowerConfig
    dtype: Dtype
    causal: bool
    attention_impl: str | None = None
    remat: str = "none"

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
        for i in range(self.cfg.num_hidden_layers):
            x = layer_cls(self.cfg, self.dtype, self.causal, self.attention_impl,
                          name=f"layers_{i}")(x, lengths)
        return x[:, :length]


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
        x = Encoder(cfg, self.dtype, False, self.attention_impl, self.remat, name="encoder")(x)
        return _layer_norm(cfg, self.dtype, "post_layernorm")(x[:, 0])


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
