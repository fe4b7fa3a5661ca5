"""Device mesh from config, logical-axis rules, and NamedShardings for parameters and batches.

Mesh axes are ``data``, ``fsdp``, ``model``, ``expert`` (sizes in ``config.mesh``; ``-1`` fills the rest).
Parameters carry logical axis names in their NNX ``out_sharding`` metadata; ``config.axis_rules`` (by default
:data:`DEFAULT_AXIS_RULES`) maps each logical name to mesh axes. A dimension whose size does not divide its mesh
axes is replicated instead, so the same code runs on 1 device and on a pod. Activations are split along their
batch dimension over :func:`batch_axes`, the mesh axes that the logical ``batch`` axis maps to.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lmx.core.config import ConfigError

MESH_AXES = ("data", "fsdp", "model", "expert")
Rules = Sequence[tuple[str, Any]]

# Logical axis -> mesh axes; the one mapping that parameters, batches and activations use. ``batch`` also spans
# ``expert``, so that the non-expert compute of a MoE model is not replicated across the expert axis.
DEFAULT_AXIS_RULES = (
    ("batch", ("data", "fsdp", "expert")),
    ("embed", "fsdp"),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("head_dim", None),
    ("expert", "expert"),
    ("length", None),
)


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves ``-1`` and checks that the sizes multiply to ``num_devices``."""
  sizes = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
  unknown = sorted(set(mesh_cfg.keys()) - set(MESH_AXES))
  if unknown:
    raise ConfigError(f"mesh: unknown axis {unknown}; valid axes: {list(MESH_AXES)}")
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ConfigError(f"mesh: only one axis may be -1, got {fill}")
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if bad:
    raise ConfigError(f"mesh.{bad[0]}={sizes[bad[0]]}: sizes must be positive or -1")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if num_devices % fixed:
      raise ConfigError(f"mesh: fixed axes {sizes} use {fixed} devices, which does not divide {num_devices}")
    sizes[fill[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(f"mesh: sizes {sizes} multiply to {math.prod(sizes.values())}, but there are "
                      f"{num_devices} devices; set one axis to -1 to fill")
  return sizes


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 4-axis mesh (data, fsdp, model, expert) with Auto axis types (classic GSPMD propagation)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(dict(mesh_cfg), len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _as_tuple(x) -> tuple[str, ...]:
  if x is None:
    return ()
  return (x,) if isinstance(x, str) else tuple(x)


def logical_to_spec(logical_axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Rules) -> P:
  """Maps logical axis names to a PartitionSpec; mesh axes are used once, non-dividing dims replicate."""
  if not logical_axes:
    return P()
  table = {k: _as_tuple(v) for k, v in rules}
  used: set[str] = set()
  out = []
  for name, dim in zip(logical_axes, shape):
    axes = tuple(a for a in table.get(name, ()) if a not in used and mesh.shape.get(a, 1) > 1) if name else ()
    size = math.prod(mesh.shape[a] for a in axes) if axes else 1
    if not axes or dim % size:
      out.append(None)
      continue
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  return P(*out)


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Rules) -> dict:
  """NamedShardings (as a pure dict, like ``nnx.to_pure_dict``) from the params' logical-axis metadata."""

  def one(v):
    axes = v.get_metadata().get("out_sharding") if isinstance(v, nnx.Variable) else None
    shape = v.shape if isinstance(v, nnx.Variable) else np.shape(v)
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))

  tree = jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_axes(rules: Rules | None = None) -> tuple[str, ...]:
  """The mesh axes that the logical ``batch`` axis maps to in ``rules``.

  ``rules=None`` or rules without a ``batch`` entry use :data:`DEFAULT_AXIS_RULES`; ``("batch", None)``
  means batches are replicated (an empty tuple).
  """
  table = dict(rules or ())
  if "batch" not in table:
    table = dict(DEFAULT_AXIS_RULES)
  return _as_tuple(table["batch"])


def batch_sharding(mesh: Mesh, rules: Rules | None, ndim: int = 2) -> NamedSharding:
  """Sharding of a batch: leading dim over the mesh axes of :func:`batch_axes` (those of size > 1), rest
  replicated."""
  axes = tuple(a for a in batch_axes(rules) if mesh.shape.get(a, 1) > 1)
  lead = None if not axes else (axes[0] if len(axes) == 1 else axes)
  return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def batch_size_divisor(mesh: Mesh, rules: Rules | None) -> int:
  """Number of batch shards: a global batch size must be a multiple of it."""
  return math.prod(mesh.shape.get(a, 1) for a in batch_axes(rules))
