"""models.layer_norm.LayerNorm against torch.nn.LayerNorm in float64: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from evclip_jax.models.layer_norm import LayerNorm


def _torch_reference(x, scale, bias, g, eps):
    """torch's LayerNorm in float64: output and the gradients of sum(out * g)."""
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    ln = torch.nn.LayerNorm(x.shape[-1], eps=eps, dtype=torch.float64)
    with torch.no_grad():
        ln.weight.copy_(torch.tensor(scale))
        ln.bias.copy_(torch.tensor(bias))
    out = ln(xt)
    (out * torch.tensor(g, dtype=torch.float64)).sum().backward()
    return (out.detach().numpy(), xt.grad.numpy(), ln.weight.grad.numpy(),
            ln.bias.grad.numpy())


def _inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=shape) * 3 + 1.5).astype(np.float32)
    scale = rng.normal(size=shape[-1:]).astype(np.float32)
    bias = rng.normal(size=shape[-1:]).astype(np.float32)
    g = rng.normal(size=shape).astype(np.float32)
    return x, scale, bias, g


def _grads(x, params, g, dtype):
    ln = LayerNorm(1e-5, dtype)

    def f(params, x):
        return jnp.sum(ln.apply(params, x).astype(jnp.float32) * g)

    out = ln.apply(params, x)
    dparams, dx = jax.grad(f, argnums=(0, 1))(params, x)
    return out, dx, dparams["params"]["scale"], dparams["params"]["bias"]


@pytest.mark.parametrize("shape", [(3, 7, 16), (5, 32)])
def test_float32_values_and_gradients_match_torch(shape):
    x, scale, bias, g = _inputs(shape)
    params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    out, dx, dscale, dbias = _grads(jnp.asarray(x), params, g, jnp.float32)
    ref = _torch_reference(x, scale, bias, g, 1e-5)
    for got, want, name in zip((out, dx, dscale, dbias), ref, ("out", "dx", "dscale", "dbias"),
                               strict=True):
        assert got.shape == want.shape, name
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-5, atol=2e-5,
                                   err_msg=name)


def test_bfloat16_input_gives_bfloat16_output_and_input_gradient():
    x, scale, bias, g = _inputs((4, 9, 64), seed=1)
    params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    xb = jnp.asarray(x, jnp.bfloat16)
    out, dx, dscale, dbias = _grads(xb, params, g, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16
    assert dscale.dtype == jnp.float32 and dbias.dtype == jnp.float32
    # The reference sees the same bf16-rounded input; the statistics are float32 on our side.
    ref = _torch_reference(np.asarray(xb, np.float32), scale, bias, g, 1e-5)
    for got, want, name in zip((out, dx, dscale, dbias), ref, ("out", "dx", "dscale", "dbias"),
                               strict=True):
        scale_of = np.max(np.abs(want))
        err = np.max(np.abs(np.asarray(got, np.float64) - want)) / scale_of
        assert err < 1e-2, (name, err)


def test_params_are_named_like_flax_layernorm():
    """Checkpoint conversion maps HF's weight/bias to these names."""
    variables = LayerNorm(1e-5, jnp.float32).init(jax.random.key(0), jnp.ones((2, 8)))
    params = variables["params"]
    assert sorted(params) == ["bias", "scale"]
    np.testing.assert_array_equal(np.asarray(params["scale"].value), np.ones(8))
    np.testing.assert_array_equal(np.asarray(params["bias"].value), np.zeros(8))
