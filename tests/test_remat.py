"""model.remat policies: the same gradients as keeping everything, and each keeps what its
name says (the residuals JAX saves for the backward pass, read with saved_residuals)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from evclip_jax.models import clip

CFG = clip.TowerConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, projection_dim=16)


def _loss(remat, attention_impl="xla", dtype=jnp.float32):
    encoder = clip.Encoder(CFG, dtype, causal=False, attention_impl=attention_impl, remat=remat)

    def loss(params, x):
        return jnp.sum(jnp.sin(encoder.apply(params, x).astype(jnp.float32)))

    return encoder, loss


def test_every_policy_gives_the_gradients_of_none():
    x = jax.random.normal(jax.random.key(1), (3, 6, CFG.hidden_size))
    encoder, loss = _loss("none")
    params = encoder.init(jax.random.key(0), x)
    expected = jax.jit(jax.grad(loss))(params, x)
    for remat in clip.REMAT_POLICIES:
        got = jax.jit(jax.grad(_loss(remat)[1]))(params, x)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-6, err_msg=remat)


def _saved(remat, monkeypatch, capsys):
    """The residuals of two cuDNN-attention layers as (dtype[shape], source) lines from
    print_saved_residuals, traced on any host (cuDNN's version check is answered; nothing is
    compiled), without the arguments."""
    from jax._src.cudnn import fused_attention_stablehlo as fused
    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fused, "check_compute_capability", lambda capability: True)
    x = jnp.ones((2, 8, CFG.hidden_size), jnp.bfloat16)
    encoder, loss = _loss(remat, "cudnn", jnp.bfloat16)
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype),
                          jax.eval_shape(encoder.init, jax.random.key(0), x))
    capsys.readouterr()
    print_saved_residuals(loss, params, x)
    lines = capsys.readouterr().out.splitlines()
    return [tuple(line.split(" ", 1)) for line in lines if "from the argument" not in line]


@pytest.mark.parametrize("remat, attention_kept", [("matmuls", False),
                                                    ("matmuls_attention", True)])
def test_policy_keeps_the_fused_attention_outputs_or_not(remat, attention_kept, monkeypatch,
                                                         capsys):
    saved = _saved(remat, monkeypatch, capsys)
    attention = sorted(a for a, source in saved if "dot_product_attention" in source)
    matmuls = sorted(a for a, source in saved if "dot_general" in source)
    # Per layer: q, k, v, out_proj (width 32) and fc1 (width 128); fc2's output is not needed;
    # and out_proj's bias with the value bias folded in (b_v W_o, see clip.Attention).
    assert matmuls == sorted(["bf16[2,8,32]"] * 8 + ["bf16[2,8,128]"] * 2 + ["f32[32]"] * 2)
    if attention_kept:  # the output [B, T, heads, head_dim] and the softmax statistics
        assert attention == sorted(["bf16[2,8,4,8]", "f32[2,4,8]"] * 2)
    else:
        assert attention == []
    # Besides, only each block's output (the next one's input, and the loss's, in bf16 and in
    # float32); no LayerNorm or activation output.
    rest = [a for a, source in saved
            if "dot_general" not in source and "dot_product_attention" not in source]
    assert rest == ["bf16[2,8,32]", "f32[2,8,32]"]
