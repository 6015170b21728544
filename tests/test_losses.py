"""evclip_jax.losses against float64 NumPy transcriptions of METHOD.md written here."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from evclip_jax import losses

D, M = 16, 5
N = 8  # one batch size for most tests: eager JAX caches compiled ops per shape
LOGIT_SCALE = math.log(1 / 0.07)  # CLIP init
RTOL = 1e-5  # float32 value vs float64 reference
GRAD_RTOL = 1e-4  # float32 jax.grad vs float64 central differences


# ----------------------------------------------------------------------------------------------
# float64 NumPy references (literal transcriptions of METHOD.md)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def np_softmax(x):
    z = np.exp(np.asarray(x, np.float64))
    return z / z.sum(axis=-1, keepdims=True)


def np_ce(logits, labels):
    """Mean over rows of -log softmax(logits)[label]."""
    lsm = np_log_softmax(logits)
    return np.mean([-lsm[i, labels[i]] for i in range(len(labels))])


def ref_ct(e, v, tau):
    total = 0.0
    for i in range(e.shape[0]):
        z = np.exp(e[i] @ v.T / tau)
        total += -np.log(z[i] / z.sum())
    return total / e.shape[0]


def ref_distill(teacher, student, T):
    p = np_softmax(teacher / T)
    return T**2 * np.mean(-np.sum(p * np_log_softmax(student / T), axis=-1))


def ref_zs(e, v, t, logit_scale, T=2.0, form="zscl", labels=None, e_teacher=None):
    """e_teacher: event side used where cur is a teacher (held fixed in finite differences)."""
    e_teacher = e if e_teacher is None else e_teacher
    s = np.exp(logit_scale)
    ref, cur, cur_teacher = s * v @ t.T, s * e @ t.T, s * e_teacher @ t.T
    if form == "zscl":
        return ref_distill(ref, cur, T) + ref_distill(ref.T, cur.T, T)
    if form == "release":
        return ref_distill(ref, cur, T) + ref_distill(cur_teacher.T, ref.T, T)
    return np_ce(cur, labels) + np_ce(ref, labels)


def ref_sinkhorn(S, iters=3):
    """The released algorithm, literally, with exp in float64."""
    A = np.exp(np.asarray(S, np.float64)).T
    K, B = A.shape
    A = A / np.sum(A)
    for _ in range(iters):
        A = A / np.sum(A, axis=1, keepdims=True)
        A = A / K
        A = A / np.sum(A, axis=0, keepdims=True)
        A = A / B
    A = A * B
    return A.T


def ref_kl(e, v, temperature=0.01, iters=3):
    n = e.shape[0]
    Q = np_log_softmax(v @ e.T / temperature)
    P = ref_sinkhorn(v @ v.T / temperature, iters)
    total = 0.0
    for i in range(n):
        for j in range(n):
            if P[i, j] > 0:
                total += P[i, j] * (np.log(P[i, j]) - Q[i, j])
    return total / n


def ref_pred(e, t, labels, logit_scale=None, form="ce"):
    if form == "ce":
        return np_ce(np.exp(logit_scale) * e @ t.T, labels)
    cos = [e[i] @ t[labels[i]] / (np.linalg.norm(e[i]) * np.linalg.norm(t[labels[i]]))
           for i in range(e.shape[0])]
    return np.mean(1.0 - np.array(cos))


def ref_mod(e, v, norm="l1", tau=None):
    d = e - v
    out = np.mean(np.abs(d)) if norm == "l1" else np.mean(d**2)
    if tau is not None:
        out += ref_ct(unit(e), unit(v), tau)
    return out


def ref_htca(e, v, t, labels, logit_scale):
    s = np.exp(logit_scale)
    l_ei = 0.5 * (ref_ct(e, v, 1 / s) + ref_ct(v, e, 1 / s))
    l_et = np_ce(s * e @ t.T, labels)
    p, q = np_softmax(s * v @ t.T), np_softmax(s * e @ t.T)
    l_it = np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1))
    return l_ei + l_et + l_it


def fd_grad(f, x, h=1e-6):
    """Central finite differences of a float64 scalar function."""
    g = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        g[idx] = (f(xp) - f(xm)) / (2 * h)
    return g


# ----------------------------------------------------------------------------------------------
# data


def make_batch(n, seed=0, correlated=False):
    rng = np.random.default_rng(seed)
    v = unit(rng.normal(size=(n, D)))
    e = unit(v + 0.5 * rng.normal(size=(n, D))) if correlated else unit(rng.normal(size=(n, D)))
    t = unit(rng.normal(size=(M, D)))
    labels = rng.integers(0, M, size=n)
    return e, v, t, labels


def f32(x):
    return jnp.asarray(x, jnp.float32)


def assert_grad_close(g_jax, g_ref):
    g_jax = np.asarray(g_jax, np.float64)
    assert np.all(np.isfinite(g_jax))
    np.testing.assert_allclose(g_jax, g_ref, rtol=GRAD_RTOL, atol=GRAD_RTOL * np.abs(g_ref).max())


# ----------------------------------------------------------------------------------------------
# values


@pytest.mark.parametrize("tau", [1.0, 0.07, 0.02])
def test_loss_ct_value(tau):
    e, v, _, _ = make_batch(N, seed=0)
    out = losses.loss_ct(f32(e), f32(v), tau)
    assert out.dtype == jnp.float32 and out.shape == ()
    np.testing.assert_allclose(float(out), ref_ct(e, v, tau), rtol=RTOL)


def test_loss_ct_release_value_and_zero_grad():
    e, v, _, _ = make_batch(N, seed=1, correlated=True)
    out = losses.loss_ct(f32(e), f32(v), 1.0, release=True)  # tau argument ignored
    np.testing.assert_allclose(float(out), 0.04 * ref_ct(e, v, 0.02), rtol=RTOL)

    g_rel = jax.grad(lambda x: losses.loss_ct(x, f32(v), 0.5, release=True))(f32(e))
    assert np.all(np.asarray(g_rel) == 0.0)
    g_def = jax.grad(lambda x: losses.loss_ct(x, f32(v), 0.5))(f32(e))
    assert np.abs(np.asarray(g_def)).max() > 1e-3


@pytest.mark.parametrize("form", ["zscl", "release", "label"])
@pytest.mark.parametrize("T", [2.0, 1.0])
def test_loss_zs_value(form, T):
    e, v, t, labels = make_batch(N, seed=10)
    out = losses.loss_zs(f32(e), f32(v), f32(t), LOGIT_SCALE, T=T, form=form, labels=labels)
    assert out.dtype == jnp.float32 and out.shape == ()
    expected = ref_zs(e, v, t, LOGIT_SCALE, T=T, form=form, labels=labels)
    np.testing.assert_allclose(float(out), expected, rtol=RTOL)


def test_loss_zs_forms_differ_and_zero_at_match():
    e, v, t, labels = make_batch(N, seed=3)
    vals = {f: float(losses.loss_zs(f32(e), f32(v), f32(t), LOGIT_SCALE, form=f, labels=labels))
            for f in losses.ZS_FORMS}
    assert len({round(x, 6) for x in vals.values()}) == 3
    # Event logits equal to image logits: the distillation KL part vanishes, what is left is the
    # teachers' entropy, T^2 * (H(softmax(ref/T)) + H(softmax(ref^T/T))).
    same = float(losses.loss_zs(f32(v), f32(v), f32(t), LOGIT_SCALE, form="zscl"))
    ref = np.exp(LOGIT_SCALE) * v @ t.T
    ent = sum(4 * np.mean(-np.sum(np_softmax(r / 2) * np_log_softmax(r / 2), -1))
              for r in (ref, ref.T))
    np.testing.assert_allclose(same, ent, rtol=RTOL)


def test_loss_zs_errors():
    e, v, t, _ = make_batch(6)
    with pytest.raises(ValueError, match="labels"):
        losses.loss_zs(f32(e), f32(v), f32(t), LOGIT_SCALE, form="label")
    with pytest.raises(ValueError, match="zscl.*release.*label"):
        losses.loss_zs(f32(e), f32(v), f32(t), LOGIT_SCALE, form="paper")
    with pytest.raises(ValueError, match="text_emb"):
        losses.loss_zs(f32(e), f32(v), f32(t[:, :8]), LOGIT_SCALE)


@pytest.mark.parametrize("correlated", [False, True])
@pytest.mark.parametrize("temperature", [0.01, 0.1])
def test_loss_kl_value(correlated, temperature):
    e, v, _, _ = make_batch(N, seed=20, correlated=correlated)
    out = losses.loss_kl(f32(e), f32(v), temperature=temperature)
    assert out.dtype == jnp.float32 and out.shape == ()
    np.testing.assert_allclose(float(out), ref_kl(e, v, temperature), rtol=RTOL)


def test_loss_kl_bf16_finite_and_close():
    e, v, _, _ = make_batch(N, seed=4, correlated=True)
    eb, vb = jnp.asarray(e, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16)
    out = losses.loss_kl(eb, vb, temperature=0.01)
    assert out.dtype == jnp.float32 and np.isfinite(float(out))
    # Upcast inside: same as float32 on the bf16-rounded inputs...
    same = losses.loss_kl(eb.astype(jnp.float32), vb.astype(jnp.float32), temperature=0.01)
    np.testing.assert_allclose(float(out), float(same), rtol=RTOL)
    # ...and within bf16 input-rounding tolerance of the float32 result.
    np.testing.assert_allclose(float(out), float(losses.loss_kl(f32(e), f32(v))), rtol=5e-2)
    g = jax.grad(lambda x: losses.loss_kl(x, vb))(eb)
    assert np.all(np.isfinite(np.asarray(g, np.float32)))


def test_loss_kl_finite_where_float32_exp_overflows():
    e, v, _, _ = make_batch(N, seed=5)
    S = v @ v.T / 0.01  # diagonal = 100
    with np.errstate(over="ignore"):
        assert not np.all(np.isfinite(np.exp(S.astype(np.float32))))
    for temperature in (0.01, 0.001):  # 0.001: exp(1000) overflows even float64; P underflows
        out = losses.loss_kl(f32(e), f32(v), temperature=temperature)
        assert np.isfinite(float(out))


@pytest.mark.parametrize("form", ["ce", "cosine"])
def test_loss_pred_value(form):
    e, _, t, labels = make_batch(N, seed=30)
    if form == "cosine":  # release feeds unnormalised features
        e, t = 3.0 * e + 0.1, 0.5 * t
    out = losses.loss_pred(f32(e), f32(t), labels, logit_scale=math.log(100.0), form=form)
    assert out.dtype == jnp.float32 and out.shape == ()
    expected = ref_pred(e, t, labels, math.log(100.0), form)
    np.testing.assert_allclose(float(out), expected, rtol=RTOL)


def test_loss_pred_errors():
    e, _, t, labels = make_batch(6)
    with pytest.raises(ValueError, match="logit_scale"):
        losses.loss_pred(f32(e), f32(t), labels, form="ce")
    with pytest.raises(ValueError, match="ce.*cosine"):
        losses.loss_pred(f32(e), f32(t), labels, 1.0, form="mse")
    with pytest.raises(ValueError, match="labels"):
        losses.loss_pred(f32(e), f32(t), labels[:3], 1.0)


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("tau", [None, 0.07])
def test_loss_mod_value(norm, tau):
    rng = np.random.default_rng(40)
    e, v = 2.0 * rng.normal(size=(N, D)), 2.0 * rng.normal(size=(N, D))  # unnormalised
    out = losses.loss_mod(f32(e), f32(v), norm=norm, contrastive_tau=tau)
    assert out.dtype == jnp.float32 and out.shape == ()
    np.testing.assert_allclose(float(out), ref_mod(e, v, norm, tau), rtol=RTOL)


def test_loss_htca_value():
    e, v, t, labels = make_batch(N, seed=50)
    out = losses.loss_htca(f32(e), f32(v), f32(t), labels, LOGIT_SCALE)
    assert out.dtype == jnp.float32 and out.shape == ()
    np.testing.assert_allclose(float(out), ref_htca(e, v, t, labels, LOGIT_SCALE), rtol=RTOL)


def ref_clip(v, t, logit_scale):
    """CLIP's symmetric loss: both directions of InfoNCE at temperature 1 / s."""
    s = np.exp(logit_scale)
    return 0.5 * (ref_ct(v, t, 1 / s) + ref_ct(t, v, 1 / s))


def test_loss_clip_value_and_grad():
    e, v, _, _ = make_batch(N, seed=51)
    out = losses.loss_clip(f32(v), f32(e), LOGIT_SCALE)
    assert out.dtype == jnp.float32 and out.shape == ()
    np.testing.assert_allclose(float(out), ref_clip(v, e, LOGIT_SCALE), rtol=RTOL)
    # Hand case: two orthogonal pairs at s = 1: each row's CE is log(1 + e^-1).
    hand = losses.loss_clip(jnp.eye(2), jnp.eye(2), 0.0)
    np.testing.assert_allclose(float(hand), np.log(1 + np.exp(-1.0)), rtol=1e-6)
    g = jax.grad(lambda x: losses.loss_clip(f32(v), x, LOGIT_SCALE))(f32(e))
    assert_grad_close(g, fd_grad(lambda x: ref_clip(v, x, LOGIT_SCALE), e))
    with pytest.raises(ValueError, match="same"):
        losses.loss_clip(f32(v), f32(e[:-1]), LOGIT_SCALE)


def test_all_losses_other_batch_size():
    e, v, t, labels = make_batch(6, seed=55, correlated=True)
    e, v = 1.3 * e, 0.8 * v  # unnormalised, for loss_mod and the cosine form of loss_pred
    eu, vu = unit(e), unit(v)

    @jax.jit  # one compilation for all of them (eager compiles each op per new shape: slow)
    def all_losses(e, v, eu, vu, t, labels):
        return jnp.stack([
            losses.loss_ct(eu, vu, 0.1),
            losses.loss_ct(eu, vu, 0.1, release=True),
            *[losses.loss_zs(eu, vu, t, LOGIT_SCALE, form=f, labels=labels)
              for f in losses.ZS_FORMS],
            losses.loss_kl(eu, vu),
            losses.loss_pred(eu, t, labels, LOGIT_SCALE),
            losses.loss_pred(e, t, labels, form="cosine"),
            losses.loss_mod(e, v, "l2", 0.2),
            losses.loss_htca(eu, vu, t, labels, LOGIT_SCALE),
        ])

    want = [
        ref_ct(eu, vu, 0.1),
        0.04 * ref_ct(eu, vu, 0.02),
        *[ref_zs(eu, vu, t, LOGIT_SCALE, form=f, labels=labels) for f in losses.ZS_FORMS],
        ref_kl(eu, vu),
        ref_pred(eu, t, labels, LOGIT_SCALE),
        ref_pred(e, t, labels, form="cosine"),
        ref_mod(e, v, "l2", 0.2),
        ref_htca(eu, vu, t, labels, LOGIT_SCALE),
    ]
    got = all_losses(f32(e), f32(v), f32(eu), f32(vu), f32(t), jnp.asarray(labels, jnp.int32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL)


def test_shape_errors():
    e, v, _, _ = make_batch(6)
    with pytest.raises(ValueError, match="event_emb.*image_emb"):
        losses.loss_ct(f32(e), f32(v[:5]), 1.0)
    with pytest.raises(ValueError, match="norm"):
        losses.loss_mod(f32(e), f32(v), norm="l3")


# ----------------------------------------------------------------------------------------------
# gradients wrt event_emb: jax.grad (float32) vs float64 central differences


def test_grad_loss_ct():
    e, v, _, _ = make_batch(N, seed=60)
    g = jax.grad(lambda x: losses.loss_ct(x, f32(v), 0.07))(f32(e))
    assert_grad_close(g, fd_grad(lambda x: ref_ct(x, v, 0.07), e))


@pytest.mark.parametrize("form", ["zscl", "release", "label"])
def test_grad_loss_zs(form):
    e, v, t, labels = make_batch(N, seed=61)
    g = jax.grad(
        lambda x: losses.loss_zs(x, f32(v), f32(t), LOGIT_SCALE, form=form, labels=labels)
    )(f32(e))
    # Teachers are constants: in the release form cur^T is held at e while e is perturbed.
    g_ref = fd_grad(lambda x: ref_zs(x, v, t, LOGIT_SCALE, form=form, labels=labels, e_teacher=e),
                    e)
    assert_grad_close(g, g_ref)


@pytest.mark.parametrize("correlated", [False, True])
def test_grad_loss_kl(correlated):
    e, v, _, _ = make_batch(N, seed=62, correlated=correlated)
    g = jax.grad(lambda x: losses.loss_kl(x, f32(v)))(f32(e))
    assert_grad_close(g, fd_grad(lambda x: ref_kl(x, v), e))


@pytest.mark.parametrize("form", ["ce", "cosine"])
def test_grad_loss_pred(form):
    e, _, t, labels = make_batch(N, seed=63)
    e = 1.5 * e  # off the sphere: the cosine form's normalisation matters
    g = jax.grad(lambda x: losses.loss_pred(x, f32(t), labels, LOGIT_SCALE, form=form))(f32(e))
    assert_grad_close(g, fd_grad(lambda x: ref_pred(x, t, labels, LOGIT_SCALE, form), e))


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("tau", [None, 0.1])
def test_grad_loss_mod(norm, tau):
    rng = np.random.default_rng(64)
    e, v = rng.normal(size=(N, D)), rng.normal(size=(N, D))
    g = jax.grad(lambda x: losses.loss_mod(x, f32(v), norm=norm, contrastive_tau=tau))(f32(e))
    assert_grad_close(g, fd_grad(lambda x: ref_mod(x, v, norm, tau), e))


def test_grad_loss_htca():
    e, v, t, labels = make_batch(N, seed=65)
    g = jax.grad(lambda x: losses.loss_htca(x, f32(v), f32(t), labels, LOGIT_SCALE))(f32(e))
    assert_grad_close(g, fd_grad(lambda x: ref_htca(x, v, t, labels, LOGIT_SCALE), e))


# ----------------------------------------------------------------------------------------------
# Sinkhorn


@pytest.mark.parametrize("iters", [1, 3, 5])
@pytest.mark.parametrize("shape", [(8, 8), (6, 4)])
def test_sinkhorn_matches_release(iters, shape):
    rng = np.random.default_rng(70)
    a, b = unit(rng.normal(size=(shape[0], D))), unit(rng.normal(size=(shape[1], D)))
    S = a @ b.T / 0.01  # up to exp(100): fine in float64
    P = losses.sinkhorn(f32(S), iters=iters)
    assert P.shape == shape and P.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(P).sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(P), ref_sinkhorn(S, iters), rtol=1e-4, atol=1e-7)


def test_sinkhorn_finite_in_low_precision():
    _, v, _, _ = make_batch(N, seed=71)
    S = v @ v.T / 0.01
    with np.errstate(over="ignore"):
        assert not np.all(np.isfinite(np.exp(S.astype(np.float32))))  # naive float32 overflows
    ref = ref_sinkhorn(S)
    for dtype, tol in ((jnp.float32, 1e-4), (jnp.bfloat16, 5e-2)):
        P = np.asarray(losses.sinkhorn(jnp.asarray(S, dtype)), np.float64)
        assert np.all(np.isfinite(P))
        np.testing.assert_allclose(P.sum(axis=1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(P, ref, atol=tol)


def test_sinkhorn_errors():
    with pytest.raises(ValueError, match="iters"):
        losses.sinkhorn(jnp.zeros((3, 3)), iters=0)
    with pytest.raises(ValueError, match="2-D"):
        losses.sinkhorn(jnp.zeros((3,)))


# ----------------------------------------------------------------------------------------------
# global batch under jit with sharded inputs (GSPMD inserts collectives; no psum in the losses)


def test_losses_jit_sharded_match_unsharded():
    devices = np.array(jax.devices())
    n = 8
    if n % len(devices):
        pytest.skip("needs a device count dividing 8")
    e, v, t, labels = make_batch(n, seed=80, correlated=True)
    mesh = Mesh(devices, ("data",))
    shard = NamedSharding(mesh, PartitionSpec("data"))
    es, vs = jax.device_put(f32(e), shard), jax.device_put(f32(v), shard)
    ls = jax.device_put(jnp.asarray(labels, jnp.int32), shard)

    @jax.jit
    def all_losses(e, v, labels):
        return jnp.stack([
            losses.loss_ct(e, v, 0.07),
            losses.loss_zs(e, v, f32(t), LOGIT_SCALE),
            losses.loss_kl(e, v),
            losses.loss_htca(e, v, f32(t), labels, LOGIT_SCALE),
        ])

    # The batch-coupled losses (softmax / Sinkhorn over the global batch).
    expected = [ref_ct(e, v, 0.07), ref_zs(e, v, t, LOGIT_SCALE), ref_kl(e, v),
                ref_htca(e, v, t, labels, LOGIT_SCALE)]
    np.testing.assert_allclose(np.asarray(all_losses(es, vs, ls)), expected, rtol=RTOL)
