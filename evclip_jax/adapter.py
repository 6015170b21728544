"""The single-layer adapter of the paper's five-modality retrieval (Sec. 4.4, Fig. 3, Table 4).

A linear map with an optional bias from our CLIP space into another model's embedding space
(the paper joins the event encoder to ImageBind), so that event embeddings can be compared
with sound or depth embeddings computed there. ImageBind is not shipped, so the adapter is
fitted from pairs the user brings: our image-tower embeddings of some images (``source``)
and the target model's embeddings of the same images (``target``). The event tower is
trained into the image tower's space, so the same map then carries event embeddings.

Inputs are L2-normalised before the map, at fit and at use: retrieval ranks by cosine, and
event and image embeddings differ in norm. Targets are fitted as given. Two fits
(``config.adapter.fit``): ``lstsq``, the closed-form least-squares map; ``contrastive``,
symmetric InfoNCE between the mapped sources and their targets (Adam, minibatches), which
only asks the pairs to be each other's nearest neighbours, as the retrieval does.

The adapter lives with the checkpoint, as ``adapter.npz`` in the model's dir (training
workdir, evclip dir or HF dir): ``adapter_for_model`` fits and writes it when
``config.adapter.pairs`` names a pairs file, else reads it when it is there.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from evclip_jax.embed import l2_normalize_f64

ADAPTER_FILE = "adapter.npz"
FITS = ("lstsq", "contrastive")


@dataclasses.dataclass(frozen=True)
class Adapter:
    """y = normalize(x) @ weight + bias; weight [D_in, D_out], bias [D_out] or None."""

    weight: np.ndarray
    bias: np.ndarray | None
    fit: str

    @property
    def in_dim(self) -> int:
        return int(self.weight.shape[0])

    @property
    def out_dim(self) -> int:
        return int(self.weight.shape[1])

    def __call__(self, x) -> np.ndarray:
        """Float64 [n, D_out] of CLIP-space embeddings x [n, D_in]."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"adapter: expected embeddings [n, {self.in_dim}], got shape "
                             f"{x.shape}")
        out = l2_normalize_f64(x) @ self.weight.astype(np.float64)
        return out if self.bias is None else out + self.bias.astype(np.float64)


def _check_pairs(source, target, where: str) -> tuple[np.ndarray, np.ndarray]:
    source, target = np.asarray(source), np.asarray(target)
    if source.ndim != 2 or target.ndim != 2 or source.shape[0] != target.shape[0]:
        raise ValueError(f"{where}: expected source [n, D] and target [n, D'] with the same n, "
                         f"got {source.shape} and {target.shape}")
    if source.shape[0] < 2:
        raise ValueError(f"{where}: expected at least 2 pairs, got {source.shape[0]}")
    for name, a in (("source", source), ("target", target)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{where}: {name} contains NaN or inf")
    return source, target


def fit_lstsq(source, target, bias: bool = True) -> Adapter:
    """The least-squares map of normalize(source) (plus a ones column for the bias) onto
    target, in float64."""
    source, target = _check_pairs(source, target, "fit_lstsq")
    x = l2_normalize_f64(source)
    if bias:
        x = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    solution = np.linalg.lstsq(x, target.astype(np.float64), rcond=None)[0]
    if bias:
        return Adapter(solution[:-1].astype(np.float32), solution[-1].astype(np.float32),
                       "lstsq")
    return Adapter(solution.astype(np.float32), None, "lstsq")


def fit_contrastive(source, target, *, bias: bool = True, steps: int = 500,
                    batch_size: int = 256, lr: float = 1e-2, temperature: float = 0.07,
                    seed: int = 0) -> Adapter:
    """Adam on the symmetric InfoNCE of cos(normalize(source) W + b, target) / temperature
    over minibatches of pairs (each pair's target is the positive, the batch's others are
    negatives). W starts random (fan-in scaled, from ``seed``), b at zero."""
    source, target = _check_pairs(source, target, "fit_contrastive")
    if steps < 1 or batch_size < 2 or not lr > 0 or not temperature > 0:
        raise ValueError(f"fit_contrastive: expected steps >= 1, batch_size >= 2, lr > 0 and "
                         f"temperature > 0, got {steps}, {batch_size}, {lr}, {temperature}")
    x = l2_normalize_f64(source).astype(np.float32)
    y = l2_normalize_f64(target).astype(np.float32)
    n, d_in = x.shape
    batch_size = min(batch_size, n)
    rng = np.random.default_rng(seed)
    params = {"weight": jnp.asarray(rng.standard_normal((d_in, y.shape[1])) / np.sqrt(d_in),
                                    jnp.float32),
              "bias": jnp.zeros((y.shape[1],), jnp.float32)}
    optimizer = optax.adam(lr)

    def loss_fn(params, xb, yb):
        mapped = xb @ params["weight"] + (params["bias"] if bias else 0.0)
        mapped = mapped / jnp.linalg.norm(mapped, axis=-1, keepdims=True)
        logits = mapped @ yb.T / temperature
        labels = jnp.arange(xb.shape[0])
        return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                      + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())

    @jax.jit
    def train_step(params, opt_state, xb, yb):
        grads = jax.grad(loss_fn)(params, xb, yb)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = optimizer.init(params)
    order, cursor = rng.permutation(n), 0
    for _ in range(steps):
        if cursor + batch_size > n:  # a new epoch: reshuffle, drop the partial tail
            order, cursor = rng.permutation(n), 0
        rows = order[cursor:cursor + batch_size]
        cursor += batch_size
        params, opt_state = train_step(params, opt_state, x[rows], y[rows])
    params = jax.device_get(params)
    return Adapter(np.asarray(params["weight"]), np.asarray(params["bias"]) if bias else None,
                   "contrastive")


def load_pairs(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) of a pairs file: ``.npz`` with ``source`` [n, D] (our image-tower
    embeddings) and ``target`` [n, D'] (the target model's embeddings of the same images)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"config.adapter.pairs: {path} not found (expected an .npz with "
                         "source [n, D] and target [n, D'])")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("source", "target") if k not in data]
            if missing:
                raise ValueError(f"config.adapter.pairs: {path} lacks {missing}; expected keys "
                                 f"source [n, D] and target [n, D'], got {sorted(data)}")
            source, target = np.asarray(data["source"]), np.asarray(data["target"])
    except (OSError, EOFError) as e:
        raise ValueError(f"config.adapter.pairs: {path}: cannot read ({e})") from e
    return _check_pairs(source, target, f"config.adapter.pairs: {path}")


def check_adapter_config(adapter_config) -> None:
    """Refuses a bad ``config.adapter`` before any compute, naming the field."""
    if adapter_config.fit not in FITS:
        raise ValueError(f"config.adapter.fit={adapter_config.fit!r}: expected one of "
                         f"{', '.join(FITS)}")
    if adapter_config.fit == "contrastive":
        for field, low in (("steps", 1), ("batch_size", 2)):
            if int(adapter_config[field]) < low:
                raise ValueError(f"config.adapter.{field}={adapter_config[field]}: expected "
                                 f">= {low}")
        for field in ("lr", "temperature"):
            if not float(adapter_config[field]) > 0:
                raise ValueError(f"config.adapter.{field}={adapter_config[field]}: expected "
                                 "> 0")
    if adapter_config.pairs and not os.path.isfile(adapter_config.pairs):
        raise ValueError(f"config.adapter.pairs: {adapter_config.pairs} not found (expected an "
                         ".npz with source [n, D] and target [n, D'])")


def fit_adapter(source, target, adapter_config, seed: int = 0) -> Adapter:
    """The fit ``adapter_config.fit`` names, with the settings of ``config.adapter``."""
    check_adapter_config(adapter_config)
    if adapter_config.fit == "lstsq":
        return fit_lstsq(source, target, bias=bool(adapter_config.bias))
    return fit_contrastive(source, target, bias=bool(adapter_config.bias),
                           steps=int(adapter_config.steps),
                           batch_size=int(adapter_config.batch_size),
                           lr=float(adapter_config.lr),
                           temperature=float(adapter_config.temperature), seed=seed)


def save_adapter(adapter: Adapter, directory: str | os.PathLike) -> Path:
    """Writes ``<directory>/adapter.npz`` (weight, bias when it has one, fit)."""
    path = Path(directory) / ADAPTER_FILE
    arrays = {"weight": adapter.weight, "fit": np.asarray(adapter.fit)}
    if adapter.bias is not None:
        arrays["bias"] = adapter.bias
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # a file object keeps np.savez from adding ".npz"
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path


def load_adapter(path: str | os.PathLike) -> Adapter:
    """The adapter of an ``adapter.npz`` written by ``save_adapter``."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if "weight" not in data or "fit" not in data:
                raise ValueError(f"{path}: expected keys weight and fit (written by "
                                 f"save_adapter), got {sorted(data)}")
            weight = np.asarray(data["weight"], np.float32)
            bias = np.asarray(data["bias"], np.float32) if "bias" in data else None
            fit = str(data["fit"])
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read the adapter ({e})") from e
    if weight.ndim != 2 or (bias is not None and bias.shape != (weight.shape[1],)):
        raise ValueError(f"{path}: weight {weight.shape} and bias "
                         f"{None if bias is None else bias.shape}; expected [D_in, D_out] and "
                         "[D_out]")
    return Adapter(weight, bias, fit)


def adapter_for_model(config, model_dir: str | os.PathLike, embed_dim: int) -> Adapter | None:
    """The adapter of a model: fitted from ``config.adapter.pairs`` and written to
    ``<model_dir>/adapter.npz`` (process 0) when that is set; else read from there when it
    exists; else None. ``embed_dim``: the model's projection dim, which the sources must have.
    """
    model_dir = Path(model_dir)
    path = model_dir / ADAPTER_FILE
    if config.adapter.pairs:
        source, target = load_pairs(config.adapter.pairs)
        if source.shape[1] != embed_dim:
            raise ValueError(f"config.adapter.pairs: {config.adapter.pairs}: source has dim "
                             f"{source.shape[1]}; expected the model's projection dim "
                             f"{embed_dim} (our image-tower embeddings)")
        adapter = fit_adapter(source, target, config.adapter, seed=int(config.seed))
        if jax.process_index() == 0:
            save_adapter(adapter, model_dir)
            logging.info("adapter (%s, %d pairs, %d -> %d) written to %s", adapter.fit,
                         source.shape[0], adapter.in_dim, adapter.out_dim, path)
        return adapter
    if not path.is_file():
        return None
    adapter = load_adapter(path)
    if adapter.in_dim != embed_dim:
        raise ValueError(f"{path}: maps dim {adapter.in_dim}; the model's projection dim is "
                         f"{embed_dim} (an adapter fitted for another model?)")
    return adapter
