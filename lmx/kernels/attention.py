"""Attention dispatcher: ``attention(q, k, v, *, causal=True, impl=...)`` over [B, T, H, E] inputs.

Grouped-query attention throughout: k/v are [B, S, K, E] with ``H % K == 0``.

impl:
  ``xla``     plain jnp (:func:`reference_attention`); any backend, any dtype; XLA fuses it.
  ``pallas``  the Pallas flash kernel (:mod:`lmx.kernels.flash_attention`); Triton on GPU, interpreter on CPU
              (correct but slow: for tests). Under a mesh (``jax.set_mesh``) it is wrapped in ``jax.shard_map``
              over the batch (``data``/``fsdp``/``expert``) and head (``model``) axes, because custom kernels are not
              partitioned automatically.
  ``cudnn``   ``jax.nn.dot_product_attention(implementation="cudnn")``: GPU only, float16/bfloat16.
  ``auto``    the fastest available for the backend and dtype: ``cudnn`` on GPU for 16-bit inputs with a
              supported head dim, else ``xla`` (CPU and TPU).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lmx.kernels import flash_attention as flash_lib

IMPLS = ("xla", "pallas", "cudnn", "auto")
BATCH_AXES = ("data", "fsdp", "expert")  # as lmx.models.transformer.BATCH_MESH_AXES
HEAD_AXIS = "model"


def reference_attention(q_BTHE, k_BSKE, v_BSKE, *, causal: bool = True, scale: float | None = None):
  """Plain-jnp softmax attention (float32 softmax). Returns [B, T, H, E] in q's dtype.

  With ``causal`` and S > T (e.g. decoding against a cache) the mask is aligned bottom-right.
  """
  b, t, h, e = q_BTHE.shape
  kh = k_BSKE.shape[2]
  g = h // kh
  scale = e ** -0.5 if scale is None else scale
  q = q_BTHE.reshape(b, t, kh, g, e)
  s_BKGTS = jnp.einsum("btkge,bske->bkgts", q, k_BSKE, preferred_element_type=jnp.float32) * scale
  if causal:
    s = k_BSKE.shape[1]
    mask_TS = jnp.arange(t)[:, None] + (s - t) >= jnp.arange(s)[None, :]
    s_BKGTS = jnp.where(mask_TS, s_BKGTS, -1e30)
  p = jax.nn.softmax(s_BKGTS, axis=-1).astype(v_BSKE.dtype)
  o = jnp.einsum("bkgts,bske->btkge", p, v_BSKE)
  return o.reshape(b, t, h, e).astype(q_BTHE.dtype)


def masked_attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS, *, scale: float | None = None):
  """Reference attention with an explicit boolean mask [B, T, S] (True = attend). Used by the KV-cache
  decode path, where the visible keys depend on each row's prompt length. Rows with no visible key give 0."""
  b, t, h, e = q_BTHE.shape
  kh = k_BSKE.shape[2]
  scale = e ** -0.5 if scale is None else scale
  q = q_BTHE.reshape(b, t, kh, h // kh, e)
  s_BKGTS = jnp.einsum("btkge,bske->bkgts", q, k_BSKE, preferred_element_type=jnp.float32) * scale
  m = mask_BTS[:, None, None, :, :]
  s_BKGTS = jnp.where(m, s_BKGTS, -1e30)
  p = jnp.where(m, jax.nn.softmax(s_BKGTS, axis=-1), 0.0).astype(v_BSKE.dtype)
  o = jnp.einsum("bkgts,bske->btkge", p, v_BSKE)
  return o.reshape(b, t, h, e).astype(q_BTHE.dtype)


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


def _mesh_specs(q, k):
  """PartitionSpecs for shard_map over the active mesh, or None when there is no (auto/explicit) mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or not mesh.axis_names:
    return None, None
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  if any(t == jax.sharding.AxisType.Manual for t in types.values()):
    return None, None  # already inside shard_map: call the kernel on local shards
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  b, h, kh = q.shape[0], q.shape[2], k.shape[2]
  batch = tuple(a for a in BATCH_AXES if a in sizes and sizes[a] > 1)
  while batch and b % math.prod(sizes[a] for a in batch):
    batch = batch[:-1]
  head = HEAD_AXIS if HEAD_AXIS in sizes and sizes[HEAD_AXIS] > 1 and not (h % sizes[HEAD_AXIS] or
                                                                              kh % sizes[HEAD_AXIS]) else None
  batch_spec = batch if len(batch) > 1 else (batch[0] if batch else None)
  if batch_spec is None and head is None:
    return mesh, None
  return mesh, P(batch_spec, None, head, None)


def attention(q_BTHE, k_BSKE, v_BSKE, *, causal: bool = True, impl: str = "xla", scale: float | None = None):
  """Softmax attention [B, T, H, E] x [B, S, K, E] -> [B, T, H, E] by the chosen implementation."""
  impl = resolve_impl(impl, q_BTHE.dtype, q_BTHE.shape[-1])
  if impl == "xla":
    return reference_attention(q_BTHE, k_BSKE, v_BSKE, causal=causal, scale=scale)
  if impl == "cudnn":
    return cudnn_attention(q_BTHE, k_BSKE, v_BSKE, causal=causal, scale=scale)
  fn = lambda q, k, v: flash_lib.flash_attention(q, k, v, causal=causal, scale=scale)  # noqa: E731
  mesh, spec = _mesh_specs(q_BTHE, k_BSKE)
  if spec is None:
    return fn(q_BTHE, k_BSKE, v_BSKE)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(
      q_BTHE, k_BSKE, v_BSKE)
