"""Device mesh, logical-axis rules, activation layouts, and multi-host start-up.

The model annotates every weight with logical axes (`spin_jax.model.transformer.param_axes`) and
constrains its activations at the points that decide their layout (`constrain`); this file maps
both onto a ("data", "fsdp", "tensor") mesh with one rule table. A dimension that the mesh axes do
not divide is replicated instead (e.g. SmolLM2's 9 heads over tensor=2).

Weights and activations differ in one axis: a weight's `embed` is split over fsdp (gathered per
layer when used), an activation's (`act_embed`) is whole, its rows split over (data, fsdp)
instead. So a train step is FSDP by construction: each chip computes its own rows with weights
all-gathered in the compute dtype, and gradients are reduce-scattered. The sampler decodes on a
mesh of its own (`spin_jax.sampling.decode_mesh`): the same rules with fsdp = 1, so weights are
split over tensor only and never gathered inside the decode loop.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (None = replicated)
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),  # rows of inputs, activations and the KV cache
    "vocab": ("tensor",),
    "embed": ("fsdp",),  # a weight's hidden axis
    "act_embed": None,  # an activation's hidden axis
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "head_dim": None,
    "layers": None,
    "norm": None,
    "length": None,
    "cache_seq": None,
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A mesh over all devices; one axis size may be -1 (fill with what is left)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: {len(devices)} devices are not "
                             f"divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices; "
                         f"there are {len(devices)}. Set mesh sizes whose product is the device count "
                         "(or one of them to -1).")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def make_local_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None,
                    num_processes: int | None = None) -> Mesh:
    """A mesh over this process's devices only, for work each host does on its own (sampling its
    chunks, scoring its rows): no collectives across hosts, so hosts need not run in lockstep.
    On one process it is `make_mesh(data, fsdp, tensor)`. On several, the tensor axis is kept, and
    the local devices left go to fsdp when the global mesh shards over fsdp, else to data.
    `devices` and `num_processes` describe another machine (default: this one's)."""
    num_processes = jax.process_count() if num_processes is None else num_processes
    if num_processes == 1:
        return make_mesh(data, fsdp, tensor, devices=devices)
    devices = jax.local_devices() if devices is None else list(devices)
    n = len(devices)
    tensor = n if tensor == -1 else tensor
    if n % tensor:
        raise ValueError(f"mesh.tensor={tensor} does not divide the {n} devices of one host")
    rest = n // tensor
    local_fsdp = rest if fsdp == -1 else math.gcd(fsdp, rest)
    return make_mesh(rest // local_fsdp, local_fsdp, tensor, devices=devices)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=None) -> P:
    """PartitionSpec for one array; mesh axes that do not divide the dimension are dropped."""
    rules = RULES if rules is None else rules
    used: set[str] = set()
    out = []
    for name, dim in zip(axes, shape):
        mesh_axes = tuple(a for a in (rules.get(name) or ()) if a not in used and mesh.shape[a] > 1)
        while mesh_axes and dim % math.prod(mesh.shape[a] for a in mesh_axes):
            mesh_axes = mesh_axes[:-1]
        used.update(mesh_axes)
        out.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return P(*out)


def tree_shardings(axes_tree, shape_tree, mesh: Mesh, rules=None):
    """NamedShardings for a pytree given its logical-axes tree and its shapes."""
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)  # noqa
    flat_axes, treedef = jax.tree.flatten(axes_tree, is_leaf=is_axes)
    flat_shapes = treedef.flatten_up_to(shape_tree)
    return treedef.unflatten([NamedSharding(mesh, logical_to_spec(a, s.shape, mesh, rules))
                              for a, s in zip(flat_axes, flat_shapes)])


def batch_sharding(mesh: Mesh, ndim: int = 2, batch_size: int | None = None) -> NamedSharding:
    """Leading axis over (data, fsdp), the rest replicated."""
    spec = logical_to_spec(("batch",) + (None,) * (ndim - 1),
                           (batch_size or math.prod(mesh.shape[a] for a in ("data", "fsdp")),)
                           + (1,) * (ndim - 1), mesh)
    return NamedSharding(mesh, spec)


def abstract(shapes, shardings):
    """ShapeDtypeStructs of a tree of shapes, each with its sharding (for restoring or lowering)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


_MESH: contextvars.ContextVar = contextvars.ContextVar("spin_jax_mesh", default=None)


@contextlib.contextmanager
def on_mesh(mesh):
    """Name the mesh a program's arrays live on while it traces: `constrain` lays activations out
    on it, and the attention kernel runs under shard_map on it (Mosaic calls cannot be partitioned
    automatically). Without one (a single device), both do nothing special."""
    token = _MESH.set(mesh)
    try:
        yield
    finally:
        _MESH.reset(token)


def current_mesh():
    """The mesh named by the enclosing `on_mesh`, or None."""
    return _MESH.get()


def traced_on(mesh, fn):
    """`fn` tracing inside `on_mesh(mesh)` (wrap a function before jax.jit; it keeps fn's name,
    which names the compiled program and its cache entry)."""
    def traced(*args, **kw):
        with on_mesh(mesh):
            return fn(*args, **kw)
    traced.__name__ = getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", "traced")
    return traced


def constrain(x, axes: Sequence[str | None]):
    """x laid out by its logical `axes` on the mesh of the enclosing `on_mesh` (a sharding
    constraint: XLA keeps that layout there and plans its collectives around it); x itself outside
    one or on one device."""
    mesh = _MESH.get()
    if mesh is None or mesh.size == 1:
        return x
    if len(axes) != x.ndim:
        raise ValueError(f"constrain: {len(axes)} axes {tuple(axes)} for an array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh)))


_DISTRIBUTED = {"initialized": False}


def maybe_initialize_distributed(dcfg=None) -> None:
    """jax.distributed.initialize() on a multi-host TPU slice, or with an explicit coordinator
    (config `distributed.*`; coordinator_address "auto" = let JAX detect the cluster, as on a
    gcloud TPU VM slice); nothing on a single host. Idempotent; call before using devices."""
    import os

    if _DISTRIBUTED["initialized"]:
        return
    addr = getattr(dcfg, "coordinator_address", None)
    if addr == "auto":  # e.g. a Cloud TPU VM slice: JAX reads workers and ids from the metadata server
        jax.distributed.initialize()
        _DISTRIBUTED["initialized"] = True
    elif addr:
        if jax.config.jax_cpu_collectives_implementation in (None, "none"):
            # several CPU processes (tests, CPU clusters) need cross-process collectives
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=addr, num_processes=dcfg.num_processes,
                                   process_id=dcfg.process_id)
        _DISTRIBUTED["initialized"] = True
    elif len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        jax.distributed.initialize()  # Cloud TPU pods: everything comes from the environment
        _DISTRIBUTED["initialized"] = True


def mesh_from_config(mesh_cfg) -> Mesh:
    """The config's `mesh` section over all devices (training)."""
    return make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)


def local_mesh_from_config(mesh_cfg) -> Mesh:
    """The config's `mesh` section over this host's devices (sampling and scoring)."""
    return make_local_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (nothing on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
