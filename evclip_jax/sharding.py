"""Device mesh and parameter placement from the config.

The mesh has three axes: ``data`` (batch), ``fsdp`` (batch and parameter shards) and ``tensor``
(attention heads and MLP width). One set of logical-axis rules serves every layout: an axis of
size 1 shards nothing, so ``data=N`` is plain replication, ``fsdp=N`` is FSDP, and ``tensor=N``
splits attention and MLP. A dimension that the mesh axes do not divide is left replicated.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis (named in evclip_jax/models/clip.py) -> mesh axes.
DEFAULT_RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", None),  # the token table is gathered by id; sharding it forces a remat
    ("length", None),
    ("norm", None),
    ("proj", None),
    ("channels", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; one size may be -1 (the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    named = dict(zip(MESH_AXES, sizes, strict=True))
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes {named}: at most one may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes, strict=False))} does not divide "
                             f"{len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {named} needs {int(np.prod(sizes))} devices; "
                         f"{len(devices)} are available")
    grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


def logical_to_sharding(logical: PartitionSpec, shape: tuple[int, ...], mesh: Mesh,
                        rules=DEFAULT_RULES) -> NamedSharding:
    """Mesh sharding of one array from its logical axis names; undivisible dims replicate."""
    spec = nn.logical_to_mesh_axes(logical, rules) if logical else PartitionSpec()
    spec = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
    fitted = tuple(ax if dim % _axis_size(mesh, ax) == 0 else None
                   for ax, dim in zip(spec, shape, strict=False))
    return NamedSharding(mesh, PartitionSpec(*fitted))


def tree_shardings(abstract_tree, logical_tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a pytree of arrays given a matching tree of logical specs."""
    return jax.tree.map(
        lambda leaf, spec: logical_to_sharding(spec, tuple(leaf.shape), mesh, rules),
        abstract_tree, logical_tree,
        is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dim over data and fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
