"""model.teacher_fp8: fp8 (e4m3) matmuls with per-tensor scales, against float64 NumPy on the
same quantised operands, and in the loss only where the frozen image tower runs."""

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from evclip_jax import config_base, objectives
from evclip_jax.models import clip, fp8
from evclip_jax.models.towers import Towers


def _quantized64(a: np.ndarray) -> np.ndarray:
    """a rounded to e4m3 after scaling max|a| to 448, scaled back; float64."""
    scale = np.float32(np.abs(a).max()) / np.float32(448.0)
    return (a / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * np.float64(scale)


def test_fp8_matmul_is_the_product_of_the_quantised_operands():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 64)).astype(np.float32) * 3
    w = rng.normal(size=(64, 48)).astype(np.float32) * 0.1
    got = np.asarray(jax.jit(fp8.fp8_matmul, static_argnums=2)(x, w, jnp.float32))
    expected = _quantized64(x) @ _quantized64(w)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    exact = x.astype(np.float64) @ w
    error = np.abs(got - exact).max() / np.abs(exact).max()
    assert 1e-3 < error < 0.06  # e4m3 keeps 3 mantissa bits: a few % of the largest value


def test_dense_in_fp8_replaces_only_dense_matmuls():
    dense = nn.Dense(8)
    x = jax.random.normal(jax.random.key(1), (4, 16))
    params = dense.init(jax.random.key(0), x)
    params = {"params": {"kernel": params["params"]["kernel"],
                         "bias": jnp.arange(8, dtype=jnp.float32)}}
    with fp8.dense_in_fp8():
        got = dense.apply(params, x)
    expected = fp8.fp8_matmul(x, params["params"]["kernel"], jnp.float32) + jnp.arange(8)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(dense.apply(params, x), x @ params["params"]["kernel"]
                               + jnp.arange(8), rtol=1e-6)  # outside: unchanged


def test_teacher_fp8_changes_the_image_side_of_the_loss_only():
    """The evclip loss with the teacher in fp8: the same event embeddings and the same
    gradient path (the event tower only), image embeddings within fp8 rounding of bf16."""
    cfg = clip.CLIPConfig(
        clip.TowerConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, projection_dim=32, image_size=32, patch_size=8),
        clip.TowerConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, projection_dim=32, vocab_size=100,
                         max_position_embeddings=8, eos_token_id=99), 32)
    base = Towers(cfg, dtype=jnp.bfloat16)
    params = jax.jit(base.init)(jax.random.key(0))
    rng = np.random.default_rng(1)
    batch = {"events": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
             "images": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
             "labels": np.arange(8, dtype=np.int32) % 4}
    classes = jax.random.normal(jax.random.key(2), (4, 32))
    classes /= jnp.linalg.norm(classes, axis=-1, keepdims=True)
    objective = objectives.get("evclip")
    config = config_base.base_config()
    trainable = objectives.initial_trainable(objective, params, config.loss)
    frozen = {k: params[k] for k in objective.frozen}
    out = {}
    for teacher_fp8 in (False, True):
        towers = Towers(cfg, dtype=jnp.bfloat16, teacher_fp8=teacher_fp8)
        loss_fn = objectives.make_loss_fn(objective, towers, config.loss)
        loss, grads = jax.jit(jax.value_and_grad(
            lambda p, fn=loss_fn: fn(p, frozen, classes, batch, 0)[0]))(trainable)
        images = objectives.embed_vision(towers.vision, frozen["image_tower"], batch["images"])
        with fp8.dense_in_fp8() if teacher_fp8 else contextlib.nullcontext():
            teacher = objectives.embed_vision(towers.vision, frozen["image_tower"],
                                              batch["images"])
        out[teacher_fp8] = (float(loss), grads, np.asarray(teacher), np.asarray(images))
    (loss_bf16, _, teacher_bf16, _), (loss_fp8, grads_fp8, teacher_fp8_emb, plain) = \
        out[False], out[True]
    np.testing.assert_array_equal(plain, teacher_bf16)  # outside the loss: model.dtype
    cos = np.sum(teacher_fp8_emb * teacher_bf16, -1) / (
        np.linalg.norm(teacher_fp8_emb, axis=-1) * np.linalg.norm(teacher_bf16, axis=-1))
    assert np.all(cos > 0.99) and not np.array_equal(teacher_fp8_emb, teacher_bf16)
    assert loss_fp8 != loss_bf16 and abs(loss_fp8 - loss_bf16) < 0.05 * abs(loss_bf16)
    assert set(grads_fp8) == set(trainable)  # still only the trainable params
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads_fp8))
