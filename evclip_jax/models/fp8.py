"""fp8 (e4m3) matmuls for a frozen tower's forward (``model.teacher_fp8``).

Each ``nn.Dense`` call inside ``dense_in_fp8()`` quantises its input and kernel to float8_e4m3fn
with one scale per tensor taken from the tensor's own absolute maximum (current scaling), and
multiplies the dequantised operands: the quantise-dequantise-dot pattern that XLA's GPU GEMM
rewriter fuses into one fp8 cuBLASLt GEMM with the two scales on Hopper; elsewhere the same
numbers are computed in the compute dtype. Forward only: nothing here has a useful gradient.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = float(jnp.finfo(E4M3).max)  # 448


def quantize(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(a / scale as e4m3, scale) with scale = max|a| / 448, so that max|a| maps to e4m3's
    largest finite value; float32 scale."""
    scale = jnp.max(jnp.abs(a)).astype(jnp.float32) / E4M3_MAX
    scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero tensor stays zero
    q = jnp.clip(a.astype(jnp.float32) / scale, -E4M3_MAX, E4M3_MAX).astype(E4M3)
    return q, scale


def fp8_matmul(x: jax.Array, kernel: jax.Array, dtype) -> jax.Array:
    """x [..., K] @ kernel [K, N] with both operands quantised to e4m3; result in ``dtype``."""
    xq, xs = quantize(x)
    kq, ks = quantize(kernel)
    x_dq = xq.astype(dtype) * xs.astype(dtype)
    k_dq = kq.astype(dtype) * ks.astype(dtype)
    return jnp.matmul(x_dq, k_dq, preferred_element_type=jnp.float32).astype(dtype)


def _dense_in_fp8(next_fun, args, kwargs, context):
    module = context.module
    if not (isinstance(module, nn.Dense) and context.method_name == "__call__"):
        return next_fun(*args, **kwargs)
    (x,) = args
    dtype = module.dtype or x.dtype
    y = fp8_matmul(x, module.get_variable("params", "kernel"), dtype)
    if module.use_bias:
        y = y + module.get_variable("params", "bias").astype(dtype)
    return y


@contextlib.contextmanager
def dense_in_fp8():
    """Every ``nn.Dense`` applied inside computes its matmul in fp8 (see the module doc)."""
    with nn.intercept_methods(_dense_in_fp8):
        yield
