"""clip.Attention against HF's formula in NumPy float64 (biased queries, keys and values; the
gated prompt attention of the temporal encoder), and a tower pooled at its first token, whose
last block computes only that token: the full encoder's first token and its gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evclip_jax.models import clip

CFG = clip.TowerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, projection_dim=16)


@pytest.mark.parametrize("causal", [False, True])
def test_first_token_only_equals_the_full_encoders_first_token(causal):
    with jax.enable_x64(True):  # float64: the two differ by rounding only
        _check(causal)


def _check(causal):
    full = clip.Encoder(CFG, jnp.float64, causal)
    first = clip.Encoder(CFG, jnp.float64, causal, first_token_only=True)
    x = jax.random.normal(jax.random.key(0), (3, 7, CFG.hidden_size), jnp.float64)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), full.init(jax.random.key(1), x))
    weights = jax.random.normal(jax.random.key(2), (CFG.hidden_size,), jnp.float64)

    def loss(encoder, pool):
        return lambda p, x: jnp.sum(jnp.sin(pool(encoder.apply(p, x)) * weights))

    expected = loss(full, lambda y: y[:, 0])
    got = loss(first, lambda y: y)
    assert first.apply(params, x).shape == (3, CFG.hidden_size)
    np.testing.assert_allclose(got(params, x), expected(params, x), rtol=1e-12)
    grads = jax.grad(got, argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(grads),
                    jax.tree.leaves(jax.grad(expected, argnums=(0, 1))(params, x)), strict=True):
        assert a.dtype == jnp.float64
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def _reference(p, x, prompts, gate, causal, heads):
    """HF's CLIPAttention in float64, plus the gated prompt softmax (models/eventbind.py)."""
    def proj(name, a):
        return a @ p[name]["kernel"] + p[name]["bias"]

    def split(a):
        return a.reshape(*a.shape[:2], heads, -1).transpose(0, 2, 1, 3)  # [B, H, T, d]

    q = split(proj("q_proj", x))
    scale = q.shape[-1] ** -0.5

    def attend(tokens, mask=None):
        k, v = split(proj("k_proj", tokens)), split(proj("v_proj", tokens))
        logits = q @ k.transpose(0, 1, 3, 2) * scale
        if mask is not None:
            logits = np.where(mask, logits, -np.inf)
        return _softmax(logits) @ v

    t = x.shape[1]
    y = attend(x, np.tril(np.ones((t, t), bool)) if causal else None)
    if prompts is not None:
        y = y + gate[None, :, None, None] * attend(prompts)
    y = y.transpose(0, 2, 1, 3).reshape(x.shape)
    return proj("out_proj", y)


@pytest.mark.parametrize("causal, with_prompts", [(False, False), (True, False),
                                                  (False, True)])
def test_attention_equals_hfs_formula(causal, with_prompts):
    rng = np.random.default_rng(0)
    width, heads = CFG.hidden_size, CFG.num_attention_heads
    x = rng.normal(size=(2, 5, width))
    prompts = rng.normal(size=(2, 3, width)) if with_prompts else None
    gate = rng.normal(size=heads) if with_prompts else None
    params = {name: {"kernel": rng.normal(size=(width, width)) / np.sqrt(width),
                     "bias": rng.normal(size=width)}  # biases far from zero
              for name in ("q_proj", "k_proj", "v_proj", "out_proj")}
    with jax.enable_x64(True):
        got = clip.Attention(CFG, jnp.float64, causal).apply(
            {"params": params}, x, None, prompts, gate)
        assert got.dtype == jnp.float64
    # jax.nn.dot_product_attention takes its softmax in float32.
    np.testing.assert_allclose(got, _reference(params, x, prompts, gate, causal, heads),
                               rtol=1e-5, atol=1e-6)


def test_cudnn_padding_with_first_token_only(monkeypatch):
    """The cuDNN path pads an odd length by one token, masked out through the sequence lengths;
    the first-token block (XLA's attention) must mask it too. Traced on a CPU with "cudnn"
    answered by XLA's implementation, against the unpadded encoder."""
    attention = jax.nn.dot_product_attention

    def xla_for_cudnn(*args, implementation=None, **kwargs):
        return attention(*args, implementation=None if implementation == "cudnn"
                         else implementation, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", xla_for_cudnn)
    x = jax.random.normal(jax.random.key(0), (2, 7, CFG.hidden_size))  # odd: padded to 8
    plain = clip.Encoder(CFG, jnp.float32, False, attention_impl="xla")
    params = plain.init(jax.random.key(1), x)
    padded = clip.Encoder(CFG, jnp.float32, False, attention_impl="cudnn", first_token_only=True)
    np.testing.assert_allclose(padded.apply(params, x), plain.apply(params, x)[:, 0],
                               rtol=1e-5, atol=1e-5)
