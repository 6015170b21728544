"""Shared evaluation plumbing: run jitted embed functions over sharded, padded batches.

Every evaluator embeds a whole evaluation set with `embed_batches` / `embed_dataset`, which
shards the leading (batch) dim of each batch over a 1-D mesh of all devices (or over the
batch axes of the trainer's mesh), pads a partial last batch up to the global batch size
and drops padded rows again through the boolean "mask", so no sample is dropped or counted
twice and the sample order is preserved.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from evclip_jax.sharding import BATCH_AXES as TRAINER_BATCH_AXES

BATCH_AXIS = "batch"

# embed_fn(x [B, ...]) -> [B, D], or embed_fn(params, x) when params are passed separately.
EmbedFn = Callable[..., jax.Array]


def data_mesh(devices: Iterable[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh (axis "batch") over `devices` (default: all devices of all processes)."""
    devs = np.asarray(list(jax.devices() if devices is None else devices), dtype=object)
    if devs.size == 0:
        raise ValueError("data_mesh: expected at least one device, got none")
    return Mesh(devs.reshape(-1), (BATCH_AXIS,))


def batch_axes_of(mesh: Mesh, batch_axes: Sequence[str] | None = None) -> tuple[str, ...]:
    """The mesh axes the batch dim is sharded over.

    Default: the only axis of a 1-D mesh (`data_mesh`), or the trainer's ("data", "fsdp")
    axes of its (data, fsdp, tensor) mesh, so evaluation can run on the training mesh with
    the params where the trainer placed them.
    """
    if batch_axes is not None:
        axes = tuple(a for a in batch_axes if a in mesh.axis_names)
        if not axes:
            raise ValueError(f"batch_axes {tuple(batch_axes)}: none is an axis of the mesh "
                             f"{mesh.axis_names}")
        return axes
    if len(mesh.axis_names) == 1:
        return tuple(mesh.axis_names)
    axes = tuple(a for a in TRAINER_BATCH_AXES if a in mesh.axis_names)
    if not axes:
        raise ValueError(
            f"embed_batches: expected a 1-D mesh or one with axes {TRAINER_BATCH_AXES}, got "
            f"axes {mesh.axis_names}; pass data_mesh(devices) or batch_axes")
    return axes


def batch_sharding_of(mesh: Mesh, batch_axes: Sequence[str] | None = None) -> NamedSharding:
    """Leading dim sharded over `batch_axes_of(mesh, batch_axes)`, other dims replicated."""
    axes = batch_axes_of(mesh, batch_axes)
    return NamedSharding(mesh, PartitionSpec(axes[0] if len(axes) == 1 else axes))


def batches_from_arrays(
    arrays: Mapping[str, np.ndarray], batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Yield batches of `batch_size` rows from equally long arrays, in order.

    The last partial batch is zero-padded to `batch_size` and every batch carries a boolean
    "mask" (False on padding), as the eval pipeline does. An existing "mask" array is honoured.
    """
    if batch_size <= 0:
        raise ValueError(f"batches_from_arrays: batch_size must be positive, got {batch_size}")
    if not arrays:
        raise ValueError("batches_from_arrays: expected at least one array, got none")
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    lengths = {k: (v.shape[0] if v.ndim else None) for k, v in arrays.items()}
    n = next(iter(lengths.values()))
    for key, length in lengths.items():
        if length is None or length != n:
            raise ValueError(
                f"batches_from_arrays: array {key!r} has leading dim {length}, expected {n} "
                "(all arrays must have the same number of rows)"
            )
    if "mask" not in arrays:
        arrays["mask"] = np.ones((n,), dtype=bool)
    for start in range(0, n, batch_size):
        batch = {k: v[start:start + batch_size] for k, v in arrays.items()}
        yield pad_batch(batch, batch_size)


def pad_batch(batch: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Zero-pad every array of `batch` along axis 0 to `size` rows; padding is masked out."""
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        pad = size - value.shape[0]
        if pad < 0:
            raise ValueError(f"batch field {key!r} has {value.shape[0]} rows, more than {size}")
        if pad:
            value = np.concatenate([value, np.zeros((pad,) + value.shape[1:], value.dtype)])
        out[key] = value
    if "mask" in out:
        out["mask"] = out["mask"].astype(bool)
    return out


def to_host(x) -> np.ndarray:
    """Host NumPy of a (possibly multi-process) global array, in global order, or of host
    data."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _to_global(x, sharding: NamedSharding) -> jax.Array:
    """Place one batch field on the mesh, sharded on its leading dim."""
    if isinstance(x, jax.Array):
        return x if x.sharding == sharding else jax.device_put(x, sharding)
    # Host data: in one process this is the whole global batch; with several processes each
    # contributes its local rows (the usual multi-host input contract).
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))


def _local_rows(x) -> int:
    return int(x.shape[0])


def embed_batches(
    embed_fns: Mapping[str, EmbedFn],
    batches: Iterable[Mapping[str, object]],
    mesh: Mesh | None = None,
    label_key: str = "labels",
    params: Mapping[str, Any] | None = None,
    batch_axes: Sequence[str] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Run several embed functions over one pass of `batches`.

    `embed_fns` maps a batch field (e.g. "events", "images") to a function
    `embed_fn(x [B, ...]) -> [B, D]`, or `embed_fn(params[field], x)` for the fields in
    `params` (pass weights this way rather than closing over them: closed-over arrays are
    compile-time constants, and a stable function object lets the compile be reused). Each
    runs jitted with the batch dim sharded over `mesh` (default: all devices; a multi-axis
    mesh shards it over `batch_axes`, default the trainer's "data" and "fsdp"). Batches
    smaller than the first one (or not a multiple of the device count) are padded and
    masked. Returns ({field: float32 [n, D]}, labels int64 [n]) with masked rows dropped,
    in input order.
    """
    if not embed_fns:
        raise ValueError("embed_batches: expected at least one embed function, got none")
    params = dict(params or {})
    unknown = sorted(set(params) - set(embed_fns))
    if unknown:
        raise ValueError(f"embed_batches: params given for {unknown}, which have no embed_fn")
    mesh = data_mesh() if mesh is None else mesh
    sharding = batch_sharding_of(mesh, batch_axes)
    batch_shards = int(np.prod([mesh.shape[a] for a in batch_axes_of(mesh, batch_axes)]))
    # Inputs arrive committed with `sharding` (params keep their own), so only the output
    # sharding is given. JAX caches traces per function object, so calling again with the
    # same embed_fn reuses the compile.
    jitted = {key: jax.jit(fn, out_shardings=sharding) for key, fn in embed_fns.items()}
    # Rows per process must be a multiple of its share of the batch shards to shard evenly.
    local_devices = max(1, batch_shards // jax.process_count())
    global_rows = None
    outputs: dict[str, list[np.ndarray]] = {key: [] for key in embed_fns}
    labels_out: list[np.ndarray] = []
    count, pending = 0, None
    for index, batch in enumerate(batches):
        for key in list(embed_fns) + [label_key]:
            if key not in batch:
                raise ValueError(
                    f"batch {index} has no field {key!r}; fields: {sorted(batch)}"
                )
        fields = {key: batch[key] for key in list(embed_fns) + [label_key]}
        if not isinstance(fields[label_key], jax.Array):
            # int32 on device: JAX's default (x64 off) would warn on int64 labels.
            fields[label_key] = np.asarray(fields[label_key]).astype(np.int32)
        rows = _local_rows(fields[label_key])
        fields["mask"] = batch["mask"] if "mask" in batch else np.ones((rows,), dtype=bool)
        if global_rows is None:
            global_rows = -(-rows // local_devices) * local_devices
        if rows > global_rows:
            raise ValueError(
                f"batch {index} has {rows} rows, more than the first batch's {global_rows}; "
                "only the last batch may be partial"
            )
        if rows < global_rows:
            if any(isinstance(v, jax.Array) and not v.is_fully_addressable
                   for v in fields.values()):
                raise ValueError(
                    f"batch {index} is a partial multi-process global array ({rows} rows); "
                    "pad it to the global batch size with a 'mask' in the input pipeline"
                )
            fields = pad_batch({k: np.asarray(v) for k, v in fields.items()}, global_rows)
        placed = {k: _to_global(v, sharding) for k, v in fields.items()}
        results = {key: fn(*((params[key], placed[key]) if key in params else (placed[key],)))
                   for key, fn in jitted.items()}
        # Dispatch is asynchronous: fetch the previous batch while this one computes.
        if pending is not None:
            count += _collect(pending, outputs, labels_out)
        pending = (placed["mask"], placed[label_key], results)
    if pending is not None:
        count += _collect(pending, outputs, labels_out)
    if global_rows is None:
        raise ValueError("embed_batches: the batch iterable was empty")
    embeddings = {
        key: np.concatenate(chunks).astype(np.float32, copy=False)
        for key, chunks in outputs.items()
    }
    labels = np.concatenate(labels_out).astype(np.int64, copy=False)
    assert labels.shape[0] == count
    return embeddings, labels


def _collect(pending: tuple, outputs: dict, labels_out: list) -> int:
    """Fetch one batch's mask, labels and embeddings to host; keep unmasked rows."""
    mask_array, label_array, results = pending
    mask = to_host(mask_array).astype(bool)
    labels_out.append(to_host(label_array)[mask])
    for key, result in results.items():
        emb = to_host(result)
        if emb.shape[0] != mask.shape[0]:
            raise ValueError(
                f"embed function for {key!r} returned {emb.shape[0]} rows for a batch of "
                f"{mask.shape[0]}; expected one row per input"
            )
        outputs[key].append(emb[mask])
    return int(mask.sum())


def embed_dataset(
    embed_fn: EmbedFn,
    batches: Iterable[Mapping[str, object]],
    mesh: Mesh | None = None,
    input_key: str = "events",
    label_key: str = "labels",
    params: Any = None,
    batch_axes: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Embed field `input_key` of every batch: (float32 [n, D], labels int64 [n]).

    `embed_fn(x)`, or `embed_fn(params, x)` when `params` is given. See `embed_batches` for
    sharding, padding and masking.
    """
    embeddings, labels = embed_batches({input_key: embed_fn}, batches, mesh, label_key,
                                       None if params is None else {input_key: params},
                                       batch_axes)
    return embeddings[input_key], labels


def collect_labels(
    batches: Iterable[Mapping[str, object]], label_key: str = "labels"
) -> np.ndarray:
    """Labels of all unmasked rows of `batches`, in order (no embedding pass)."""
    out = []
    for index, batch in enumerate(batches):
        if label_key not in batch:
            raise ValueError(f"batch {index} has no field {label_key!r}; fields: {sorted(batch)}")
        labels = to_host(batch[label_key])
        mask = (to_host(batch["mask"]).astype(bool) if "mask" in batch
                else np.ones(labels.shape[0], dtype=bool))
        out.append(labels[mask])
    if not out:
        raise ValueError("collect_labels: the batch iterable was empty")
    return np.concatenate(out).astype(np.int64, copy=False)


def check_embeddings(name: str, emb, dim: int | None = None) -> np.ndarray:
    """Validate a 2-D finite embedding matrix; returns it as a NumPy array."""
    emb = np.asarray(emb)
    if emb.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array [n, D], got shape {emb.shape}")
    if dim is not None and emb.shape[1] != dim:
        raise ValueError(f"{name}: expected embedding dim {dim}, got shape {emb.shape}")
    if not np.all(np.isfinite(emb)):
        raise ValueError(f"{name}: contains NaN or inf")
    return emb


def check_labels(name: str, labels, n: int) -> np.ndarray:
    """Validate a 1-D integer label vector of length `n`."""
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},), got {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        if not np.all(labels == np.round(labels)):
            raise ValueError(f"{name}: expected integer class labels, got dtype {labels.dtype}")
    return labels.astype(np.int64)
