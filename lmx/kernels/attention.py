"""Attention dispatcher: ``attention(q, k, v, *, causal=True, impl=...)`` over [B, T, H, E] inputs.

Grouped-query attention throughout: k/v are [B, S, K, E] with ``H % K == 0``.

impl:
  ``xla``     plain jnp (:func:`lmx.kernels.flash_attention.reference_attention`, re-exported here); any
              backend, any dtype; XLA fuses it.
  ``pallas``  the Pallas flash kernel (:mod:`lmx.kernels.flash_attention`); Triton on GPU, interpreter on CPU
              (correct but slow: for tests). Under a mesh (``jax.set_mesh``) it is wrapped in ``jax.shard_map``
              over the batch axes (``batch_axes``: the mesh axes of the logical ``batch`` axis, by default those
              of ``lmx.core.mesh.DEFAULT_AXIS_RULES``) and the head axis (``model``), because custom kernels are
              not partitioned automatically.
  ``cudnn``   ``jax.nn.dot_product_attention(implementation="cudnn")``: GPU only, float16/bfloat16.
  ``auto``    the fastest available for the backend and dtype: ``cudnn`` on GPU for 16-bit inputs with a
              supported head dim, else ``xla`` (CPU and TPU).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lmx.core import mesh as mesh_lib
from lmx.kernels import flash_attention as flash_lib
from lmx.kernels.flash_attention import masked_attention, reference_attention  # noqa: F401  (the jnp paths)

IMPLS = ("xla", "pallas", "cudnn", "auto")
HEAD_AXIS = "model"


def cudnn_attention(q_BTHE, k_BSKE, v_BSKE, *, causal: bool = True, scale: float | None = None):
  """``jax.nn.dot_product_attention`` with the cuDNN fused kernel (GPU, float16/bfloat16)."""
  if q_BTHE.shape[1] != k_BSKE.shape[1] and causal:
    raise ValueError("impl='cudnn' with causal=True needs T == S here; use impl='xla' for cached decoding")
  return jax.nn.dot_product_attention(q_BTHE, k_BSKE, v_BSKE, scale=scale, is_causal=causal,
                                      implementation="cudnn")


def resolve_impl(impl: str, dtype=jnp.float32, head_dim: int = 64, backend: str | None = None) -> str:
  """Maps ``auto`` to a concrete impl for the backend; checks that the requested impl can run there."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl {impl!r} unknown; choose one of {list(IMPLS)} (model.attention_impl)")
  backend = backend or jax.default_backend()
  sixteen_bit = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if impl == "auto":
    if backend == "gpu" and sixteen_bit and head_dim % 8 == 0 and head_dim <= 128:
      return "cudnn"
    return "xla"
  if impl == "cudnn" and (backend != "gpu" or not sixteen_bit):
    raise ValueError(f"attention impl 'cudnn' needs a GPU and float16/bfloat16 inputs (backend={backend!r}, "
                     f"dtype={jnp.dtype(dtype).name}); set model.attention_impl to 'xla' or 'auto'")
  return impl


def available_impls(dtype=jnp.float32, backend: str | None = None) -> list[str]:
  """Concrete impls that can run on this backend for ``dtype`` (for benchmarks and tests)."""
  backend = backend or jax.default_backend()
  out = ["xla", "pallas"]
  sixteen_bit = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if backend == "gpu" and sixteen_bit:
    out.append("cudnn")
  return out


def _mesh_specs(q, k, batch_axes: tuple[str, ...]):
  """The active mesh and the shard_map PartitionSpec of q/k/v/o: B over those of ``batch_axes`` that the mesh
  has and that divide B, heads over ``model`` when it divides H and K. Spec None: call the kernel unwrapped."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or not mesh.axis_names:
    return None, None
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  if any(t == jax.sharding.AxisType.Manual for t in types.values()):
    return None, None  # already inside shard_map: call the kernel on local shards
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  b, h, kh = q.shape[0], q.shape[2], k.shape[2]
  batch = tuple(a for a in batch_axes if a in sizes and sizes[a] > 1)
  while batch and b % math.prod(sizes[a] for a in batch):
    batch = batch[:-1]
  head = HEAD_AXIS if HEAD_AXIS in sizes and sizes[HEAD_AXIS] > 1 and not (h % sizes[HEAD_AXIS] or
                                                                              kh % sizes[HEAD_AXIS]) else None
  batch_spec = batch if len(batch) > 1 else (batch[0] if batch else None)
  if batch_spec is None and head is None:
    return mesh, None
  return mesh, P(batch_spec, None, head, None)


def attention(q_BTHE, k_BSKE, v_BSKE, *, causal: bool = True, impl: str = "xla", scale: float | None = None,
              batch_axes: tuple[str, ...] = ()):
  """Softmax attention [B, T, H, E] x [B, S, K, E] -> [B, T, H, E] by the chosen implementation.

  ``batch_axes``: the mesh axes the batch is split over (``TransformerConfig.batch_axes``); they shape the
  ``jax.shard_map`` around the Pallas kernel. ``()`` uses those of ``lmx.core.mesh.DEFAULT_AXIS_RULES``.
  """
  impl = resolve_impl(impl, q_BTHE.dtype, q_BTHE.shape[-1])
  if impl == "xla":
    return reference_attention(q_BTHE, k_BSKE, v_BSKE, causal=causal, scale=scale)
  if impl == "cudnn":
    return cudnn_attention(q_BTHE, k_BSKE, v_BSKE, causal=causal, scale=scale)
  fn = lambda q, k, v: flash_lib.flash_attention(q, k, v, causal=causal, scale=scale)  # noqa: E731
  mesh, spec = _mesh_specs(q_BTHE, k_BSKE, batch_axes or mesh_lib.batch_axes(mesh_lib.DEFAULT_AXIS_RULES))
  if spec is None:
    return fn(q_BTHE, k_BSKE, v_BSKE)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(
      q_BTHE, k_BSKE, v_BSKE)
