"""Device mesh, per-parameter sharding rules and host-local -> global batches.

The mesh comes from the config: one `data` axis over all devices by default, and
an `fsdp` axis when `config.fsdp` asks for it. Parameters are placed by an
ordered list of `(regex, tactic)` rules matched (fullmatch, first wins) against
'/'-joined parameter names:

* `replicate`: a full copy on every device;
* `fsdp`: split the largest dimension divisible by the `fsdp` axis size over
  that axis (replicated when nothing divides or the leaf is small);
* a tuple of axis names / None: an explicit `PartitionSpec`.

Optimizer-state leaves inherit the placement of the parameter they mirror (an
Adam moment has the same name suffix and shape as its parameter); everything
else in the optimizer state (counts, scalars) is replicated.

Batches are always split along their first dimension over every mesh axis, so
FSDP is data parallel for activations too.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
DATA = "data"
FSDP = "fsdp"


def mesh_axes(fsdp: int = 0, data: int = -1) -> list[tuple[str, int]]:
  """The mesh shape for a config: `[('data', -1)]`, plus `('fsdp', n)` when fsdp != 0.

  `fsdp=-1` puts every device on the fsdp axis (pure FSDP); `fsdp=n` makes groups
  of n devices that each hold one copy of the parameters.
  """
  if not fsdp:
    return [(DATA, data)]
  if fsdp == -1:
    return [(DATA, 1), (FSDP, -1)]
  return [(DATA, data), (FSDP, fsdp)]


def make_mesh(axes: Sequence[tuple[str, int]] | None = None,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A `Mesh` with named axes; one size may be -1 (all remaining devices)."""
  axes = list(axes or mesh_axes())
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(n for n, _ in axes)
  sizes = [int(s) for _, s in axes]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {axes}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices cannot fill mesh {axes}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(names, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"have {len(devices)}")
  try:
    # Orders devices so the last axis gets the fastest links (matters on TPU/GPU).
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(sizes, devices=devices)
  except Exception:  # some backends/topologies (e.g. multi-process CPU) lack a topology model
    grid = np.asarray(devices, dtype=object).reshape(sizes)
  return Mesh(grid, names)


def mesh_from_config(config: Mapping) -> Mesh:
  """`config.mesh` (list of (name, size)) wins; otherwise `config.fsdp` picks the shape."""
  axes = config.get("mesh") or mesh_axes(int(config.get("fsdp", 0) or 0))
  return make_mesh([tuple(a) for a in axes])


def default_rules(fsdp: bool) -> list[tuple[str, Any]]:
  return [(".*", "fsdp" if fsdp else "replicate")]


# ----------------------------------------------------------------- naming leaves

def _key_str(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def leaf_names(tree: PyTree) -> list[str]:
  """'/'-joined names of the leaves of any pytree (dicts, optax states, lists)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return ["/".join(_key_str(k) for k in path) for path, _ in flat]


def named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [("/".join(_key_str(k) for k in path), x) for path, x in flat]


# ------------------------------------------------------------------- the tactics

def fsdp_spec(shape: Sequence[int], mesh: Mesh, axis: str = FSDP, min_size: int = 0) -> P:
  """Split the largest dimension divisible by the axis size; replicate otherwise."""
  n = mesh.shape.get(axis, 1)
  if n == 1 or int(np.prod(shape, dtype=np.int64)) < max(min_size, 1):
    return P()
  # Largest first; ties go to the later dimension (usually the output features).
  for d in sorted(range(len(shape)), key=lambda i: (shape[i], i), reverse=True):
    if shape[d] % n == 0:
      spec = [None] * len(shape)
      spec[d] = axis
      return P(*spec)
  return P()


def _spec_for(name: str, shape, mesh: Mesh, rules, min_size: int) -> P:
  for pattern, tactic in rules:
    if re.fullmatch(pattern, name):
      if tactic == "replicate":
        return P()
      if tactic == "fsdp":
        return fsdp_spec(shape, mesh, min_size=min_size)
      if isinstance(tactic, (tuple, list, P)):
        return P(*tactic)
      raise ValueError(f"unknown sharding tactic {tactic!r} for {name!r}")
  raise ValueError(f"no sharding rule covers parameter {name!r}; add a ('.*', ...) rule")


def param_specs(params: PyTree, mesh: Mesh, rules: Sequence[tuple[str, Any]],
                min_size: int = 0) -> PyTree:
  """A PartitionSpec per parameter leaf, from the regex rules."""
  names = iter(leaf_names(params))
  return jax.tree.map(lambda x: _spec_for(next(names), np.shape(x), mesh, rules, min_size), params)


def infer_shardings(params: PyTree, mesh: Mesh, rules: Sequence[tuple[str, Any]],
                    min_size: int = 0) -> PyTree:
  """NamedSharding per parameter leaf."""
  specs = param_specs(params, mesh, rules, min_size)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


def mirror_shardings(tree: PyTree, params: PyTree, param_shardings: PyTree, mesh: Mesh) -> PyTree:
  """Shardings for an optimizer state: each leaf whose name ends with a parameter's
  name and has its shape takes that parameter's sharding; the rest is replicated."""
  by_name = {}
  for (name, p), s in zip(named_leaves(params), jax.tree.leaves(param_shardings)):
    by_name[name] = (np.shape(p), s)
  repl = NamedSharding(mesh, P())

  def pick(name: str, x):
    parts = name.split("/")
    for i in range(len(parts)):  # longest suffix first
      hit = by_name.get("/".join(parts[i:]))
      if hit is not None and hit[0] == np.shape(x):
        return hit[1]
    return repl

  return _map_named(pick, tree)


def _map_named(fn, tree: PyTree) -> PyTree:
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  out = [fn("/".join(_key_str(k) for k in path), x) for path, x in flat]
  return jax.tree_util.tree_unflatten(treedef, out)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """Every mesh axis splits the batch (data parallel, and FSDP is data parallel too)."""
  return tuple(mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(batch_axes(mesh)))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Turn this process's slice of the batch into global arrays split over the mesh.

  Every process passes its own rows (the loader already took the process's slice);
  the global batch is their concatenation in process order.
  """
  s = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(s, np.asarray(x)), local)


def _put_one(x, s: jax.sharding.Sharding):
  if jax.process_count() == 1:
    return jax.device_put(x, s)
  # Multi-process: a sharding spans devices of other processes, which device_put of a
  # local value cannot reach; every process builds its own shards from the same value.
  if isinstance(x, jax.Array):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(_put_one(jax.random.key_data(x), s))
    if not x.is_fully_addressable:  # already global: reshard on device
      return jax.jit(lambda y: y, out_shardings=s)(x)
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])


def put(tree: PyTree, shardings: PyTree) -> PyTree:
  """Place host or device arrays into target shardings; every process must pass the
  same values (works multi-process, unlike a plain `jax.device_put`)."""
  return jax.tree.map(_put_one, tree, shardings)


def abstract(tree: PyTree, shardings: PyTree) -> PyTree:
  """ShapeDtypeStructs carrying shardings: a restore target that allocates nothing."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      tree, shardings)


def describe(shardings: PyTree) -> Iterable[str]:
  """One line per leaf: name and PartitionSpec (for logs)."""
  for name, s in named_leaves(shardings):
    yield f"{name}: {getattr(s, 'spec', s)}"
