"""Training losses of evclip_jax (METHOD.md, "Losses").

Every loss takes embeddings of the GLOBAL batch: under `jax.jit` with batch-sharded inputs GSPMD
inserts the collectives, so there is no pmap/psum here. Batch reductions are means. Maths is
done in at least float32 (bf16 inputs are cast up) and each loss returns a float32 scalar.
Paper-vs-release differences are keyword switches; the paper's form is the default.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

# Release L_ct: temperature fixed to 0.02 and the loss scaled by 2 * tau.
RELEASE_CT_TAU = 0.02

ZS_FORMS = ("zscl", "release", "label")
PRED_FORMS = ("ce", "cosine")
MOD_NORMS = ("l1", "l2")


def _up(x: jax.Array) -> jax.Array:
    """Cast to at least float32 (bf16/f16 -> float32; float64 stays under x64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_emb(name: str, x: jax.Array, dim: int | None = None) -> None:
    if x.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D [N, D] array of embeddings, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"`{name}` must have embedding dim {dim}, got shape {x.shape}")


def _check_pair(event_emb: jax.Array, image_emb: jax.Array) -> None:
    _check_emb("event_emb", event_emb)
    _check_emb("image_emb", image_emb)
    if event_emb.shape != image_emb.shape:
        raise ValueError(
            f"`event_emb` {event_emb.shape} and `image_emb` {image_emb.shape} must have the same "
            "[N, D] shape (row i of each is one pair)"
        )


def _check_labels(labels: jax.Array | None, n: int) -> jax.Array:
    if labels is None:
        raise ValueError("`labels` is required for this loss form (int class ids, shape [N])")
    labels = jnp.asarray(labels)
    if labels.shape != (n,) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"`labels` must be an integer array of shape ({n},), got {labels.dtype} {labels.shape}"
        )
    return labels


def _ce_labels(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over rows of cross entropy of `logits` [N, C] against integer targets [N]."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _info_nce(queries: jax.Array, keys: jax.Array, tau: jax.Array | float) -> jax.Array:
    """mean_i CE(q_i . k_j / tau over j, target i)."""
    logits = queries @ keys.T / tau
    return _ce_labels(logits, jnp.arange(queries.shape[0]))


def _distill(teacher: jax.Array, student: jax.Array, T: float) -> jax.Array:
    """ZSCL distillation: T^2 * mean over rows of CE(student / T, softmax(teacher / T))."""
    target = jax.nn.softmax(jax.lax.stop_gradient(teacher) / T, axis=-1)
    return T**2 * jnp.mean(optax.softmax_cross_entropy(student / T, target))


def loss_ct(
    event_emb: jax.Array, image_emb: jax.Array, tau: jax.Array | float, release: bool = False
) -> jax.Array:
    """L_ct (paper Eq. 2): InfoNCE with events as queries and images as keys.

    `tau` is the temperature itself (paper: learnable, init 1). `release=True` reproduces the
    public release: tau fixed to 0.02 (argument ignored), loss times 2 * tau, and the event side
    behind stop_gradient (the release's no-grad all-gather), so L_ct sends no gradient to the
    event tower -- a defect kept only for comparison.
    """
    _check_pair(event_emb, image_emb)
    e, v = _up(event_emb), _up(image_emb)
    if release:
        tau = RELEASE_CT_TAU
        loss = 2.0 * tau * _info_nce(jax.lax.stop_gradient(e), v, tau)
    else:
        loss = _info_nce(e, v, _up(tau))
    return loss.astype(jnp.float32)


def loss_zs(
    event_emb: jax.Array,
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array | float,
    T: float = 2.0,
    form: str = "zscl",
    labels: jax.Array | None = None,
) -> jax.Array:
    """L_zs (paper Eq. 3 / Prop. 1): keep event-text logits close to the image-text ones.

    With s = exp(logit_scale), ref = s v t^T and cur = s e t^T ([N, M]), and
    distill(teacher, student, T) = T^2 * mean_rows CE(student / T, softmax(teacher / T)) with the
    teacher under stop_gradient:
      form="zscl"    (default, ZSCL): distill(ref, cur) + distill(ref^T, cur^T).
      form="release" : distill(ref, cur) + distill(cur^T, ref^T) (second term reversed, as in the
                       release; its teacher cur^T is stop-gradient'ed, so that term sends no
                       gradient to event_emb). The release also feeds unnormalised features:
                       pass them in to reproduce that; this function never normalises.
      form="label"   (paper Eq. 3 literal): CE(cur, labels) + CE(ref, labels), each a mean over
                       the batch of the label cross entropy of the s-scaled cosine logits; T is
                       unused. Needs `labels` (int [N], indices into the rows of text_emb).
    """
    if form not in ZS_FORMS:
        raise ValueError(f"loss_zs `form` must be one of {ZS_FORMS}, got {form!r}")
    _check_pair(event_emb, image_emb)
    _check_emb("text_emb", text_emb, dim=event_emb.shape[1])
    e, v, t = _up(event_emb), _up(image_emb), _up(text_emb)
    s = jnp.exp(_up(logit_scale))
    ref = s * (v @ t.T)
    cur = s * (e @ t.T)
    if form == "zscl":
        loss = _distill(ref, cur, T) + _distill(ref.T, cur.T, T)
    elif form == "release":
        loss = _distill(ref, cur, T) + _distill(cur.T, ref.T, T)
    else:
        labels = _check_labels(labels, e.shape[0])
        loss = _ce_labels(cur, labels) + _ce_labels(ref, labels)
    return loss.astype(jnp.float32)


def _log_sinkhorn(S: jax.Array, iters: int) -> jax.Array:
    """log of the released Sinkhorn, every product/quotient done as a sum/difference of logs.

    Released algorithm on S [B, K]: A = exp(S)^T ([K, B]); A /= sum(A); `iters` times
    {A /= row_sums(A); A /= K; A /= col_sums(A); A /= B}; A *= B; return A^T. Each division by
    a sum becomes subtracting a logsumexp, so exp(S) (exp(100) at temperature 0.01) is never
    formed and the result is finite in float32.
    """
    n_b, n_k = S.shape
    log_a = S.T
    log_a = log_a - jax.nn.logsumexp(log_a)
    for _ in range(iters):
        log_a = log_a - jax.nn.logsumexp(log_a, axis=1, keepdims=True) - math.log(n_k)
        log_a = log_a - jax.nn.logsumexp(log_a, axis=0, keepdims=True) - math.log(n_b)
    log_a = log_a + math.log(n_b)
    return log_a.T


def sinkhorn(S: jax.Array, iters: int = 3) -> jax.Array:
    """Sinkhorn normalisation of a score matrix S [B, K] as in the release, in the log domain.

    Returns P [B, K] (float32 or wider) whose rows sum to 1. See `_log_sinkhorn` for the exact
    normalisation sequence; mathematically identical to the released exp-domain version.
    """
    S = _up(S)
    if S.ndim != 2:
        raise ValueError(f"sinkhorn `S` must be a 2-D score matrix, got shape {S.shape}")
    if iters < 1:
        raise ValueError(f"sinkhorn `iters` must be >= 1 (rows sum to 1 only then), got {iters}")
    return jnp.exp(_log_sinkhorn(S, iters))


def loss_kl(
    event_emb: jax.Array,
    image_emb: jax.Array,
    temperature: float = 0.01,
    sinkhorn_iters: int = 3,
) -> jax.Array:
    """L_kl: KL(P || Q) between Sinkhorn-balanced image-image and image-event similarities.

    Q = log_softmax(v e^T / temperature, axis=-1) (rows: images, softmax over the batch's
    events), P = stop_gradient(Sinkhorn(v v^T / temperature)), L = sum(P (log P - Q)) / N with
    0 log 0 = 0. log P comes straight from the log-domain Sinkhorn; computed in float32.
    """
    _check_pair(event_emb, image_emb)
    if sinkhorn_iters < 1:
        raise ValueError(f"loss_kl `sinkhorn_iters` must be >= 1, got {sinkhorn_iters}")
    e, v = _up(event_emb), _up(image_emb)
    log_q = jax.nn.log_softmax(v @ e.T / temperature, axis=-1)
    log_p = jax.lax.stop_gradient(_log_sinkhorn(v @ v.T / temperature, sinkhorn_iters))
    p = jnp.exp(log_p)
    terms = jnp.where(p > 0, p * (log_p - log_q), 0.0)  # 0 log 0 = 0 where P underflows
    return (jnp.sum(terms) / e.shape[0]).astype(jnp.float32)


def loss_pred(
    event_emb: jax.Array,
    text_emb: jax.Array,
    labels: jax.Array,
    logit_scale: jax.Array | float | None = None,
    form: str = "ce",
) -> jax.Array:
    """Fine-tuning / few-shot loss L_pred against class text embeddings t ([M, D]).

    form="ce" (paper Eq. 6): mean CE(s e t^T, labels), s = exp(logit_scale); `logit_scale` is
    required here. form="cosine" (release): cosine-embedding loss with target 1,
    mean_i (1 - cos(e_i, t[labels_i])); inputs need not be unit vectors, logit_scale unused.
    """
    if form not in PRED_FORMS:
        raise ValueError(f"loss_pred `form` must be one of {PRED_FORMS}, got {form!r}")
    _check_emb("event_emb", event_emb)
    _check_emb("text_emb", text_emb, dim=event_emb.shape[1])
    labels = _check_labels(labels, event_emb.shape[0])
    e, t = _up(event_emb), _up(text_emb)
    if form == "ce":
        if logit_scale is None:
            raise ValueError("loss_pred form='ce' needs `logit_scale` (log of the CLIP scale s)")
        loss = _ce_labels(jnp.exp(_up(logit_scale)) * (e @ t.T), labels)
    else:
        target = t[labels]
        # torch.nn.CosineEmbeddingLoss: dot / sqrt((|x|^2 + eps) (|y|^2 + eps)), eps 1e-12.
        eps = 1e-12
        cos = jnp.sum(e * target, axis=-1) / jnp.sqrt(
            (jnp.sum(e * e, axis=-1) + eps) * (jnp.sum(target * target, axis=-1) + eps)
        )
        loss = jnp.mean(1.0 - cos)
    return loss.astype(jnp.float32)


def loss_mod(
    event_emb: jax.Array,
    image_emb: jax.Array,
    norm: str = "l1",
    contrastive_tau: jax.Array | float | None = None,
) -> jax.Array:
    """EZSR scalar-wise modulation on UNnormalised projected embeddings.

    norm="l1": mean over batch and dimensions of |e - v| (torch L1Loss); norm="l2": mean of
    (e - v)^2 (torch MSELoss), i.e. a per-dimension distance averaged. With `contrastive_tau`
    set, adds InfoNCE (as loss_ct, events as queries) on the L2-normalised embeddings.
    """
    if norm not in MOD_NORMS:
        raise ValueError(f"loss_mod `norm` must be one of {MOD_NORMS}, got {norm!r}")
    _check_pair(event_emb, image_emb)
    e, v = _up(event_emb), _up(image_emb)
    diff = e - v
    loss = jnp.mean(jnp.abs(diff)) if norm == "l1" else jnp.mean(diff * diff)
    if contrastive_tau is not None:
        e_n = e / jnp.linalg.norm(e, axis=-1, keepdims=True)
        v_n = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
        loss = loss + _info_nce(e_n, v_n, _up(contrastive_tau))
    return loss.astype(jnp.float32)


def loss_htca(
    event_emb: jax.Array,
    image_emb: jax.Array,
    text_emb: jax.Array,
    labels: jax.Array,
    logit_scale: jax.Array | float,
) -> jax.Array:
    """EventBind / E-CLIP hierarchical triple contrastive alignment (HTCA), three terms weight 1.

    With s = exp(logit_scale) and unit e, v [N, D], t [M, D]:
      L_ei = (CE(s e v^T, diag) + CE(s v e^T, diag)) / 2   (symmetric event-image InfoNCE)
      L_et = CE(s e t^T, labels)                            (event-text, label targets)
      L_it = mean_i KL(softmax(s v_i t^T) || softmax(s e_i t^T)), the image side a
             stop-gradient teacher (image-text vs event-text alignment)
      L = L_ei + L_et + L_it.
    """
    _check_pair(event_emb, image_emb)
    _check_emb("text_emb", text_emb, dim=event_emb.shape[1])
    labels = _check_labels(labels, event_emb.shape[0])
    e, v, t = _up(event_emb), _up(image_emb), _up(text_emb)
    s = jnp.exp(_up(logit_scale))
    l_ei = loss_clip(e, v, logit_scale)
    cur = s * (e @ t.T)
    l_et = _ce_labels(cur, labels)
    log_p = jax.lax.stop_gradient(jax.nn.log_softmax(s * (v @ t.T), axis=-1))
    log_q = jax.nn.log_softmax(cur, axis=-1)
    l_it = jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))
    return (l_ei + l_et + l_it).astype(jnp.float32)


def loss_clip(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array | float
              ) -> jax.Array:
    """CLIP's symmetric contrastive loss on N matched pairs of unit embeddings [N, D]:
    (CE(s v t^T, diag) + CE(s t v^T, diag)) / 2, s = exp(logit_scale)."""
    _check_emb("image_emb", image_emb)
    _check_emb("text_emb", text_emb, dim=image_emb.shape[1])
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"`image_emb` {image_emb.shape} and `text_emb` {text_emb.shape} must "
                         "have the same [N, D] shape (row i of each is one pair)")
    v, t = _up(image_emb), _up(text_emb)
    tau = 1.0 / jnp.exp(_up(logit_scale))
    return (0.5 * (_info_nce(v, t, tau) + _info_nce(t, v, tau))).astype(jnp.float32)
