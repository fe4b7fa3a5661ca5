"""Attention dispatcher: ``attention(q, k, v, *, causal=True, impl=...)`` over [B, T, H, E] inputs.

Grouped-query attention throughout: k/v are [B, S, K, E] with ``H % K == 0``.

impl:
  ``xla``     plain jnp (:func:`lmx.kernels.flash_attention.reference_attention`, re-exported here); any
              backend, any dtype; XLA fuses it.
  ``pallas``  a Pallas flash kernel, by platform: GPU the lmx kernel (:mod:`lmx.kernels.flash_attention`) compiled
              with Triton; TPU the maintained Mosaic kernel through :mod:`lmx.kernels.tpu_attention` (GQA by
              repeating kv heads; needs T == S when causal); CPU the lmx kernel in the Pallas interpreter (correct
              but slow: for tests). ``interpret`` (default: only on a CPU backend) forces or disables the
              interpreter; ``interpret=False`` on a CPU host builds the compiled kernels for lowering elsewhere
              (``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`` or ``("tpu",)``): the GPU or TPU
              kernel is chosen at lowering time by ``jax.lax.platform_dependent``. Under a mesh
              (``jax.set_mesh``) it is wrapped in ``jax.shard_map`` over the batch axes (``batch_axes``: the
              mesh axes of the logical ``batch`` axis, by default those of ``lmx.core.mesh.DEFAULT_AXIS_RULES``)
              and the head axis (``model``), because custom kernels are not partitioned automatically.
  ``cudnn``   ``jax.nn.dot_product_attention(implementation="cudnn")``: GPU only, float16/bfloat16.
  ``auto``    per backend, dtype and shapes (:func:`auto_impl` returns the choice and why, for drivers to print):
              GPU: ``cudnn`` for 16-bit inputs with a head dim that is a multiple of 8 and at most 128 (and T == S
              when causal), else ``pallas`` (Triton) where it supports the shapes; TPU: ``pallas`` where the Mosaic
              kernel supports the shapes; otherwise (and always on CPU) ``xla``.

Segment ids (``q_segment_ids_BT`` [B, T], ``kv_segment_ids_BS`` [B, S], int; 0 = padding; the kv ids default to
the query ids): a query attends only keys of its own nonzero id, on top of the causal mask (left-padded rows,
packed sequences); query rows that see no key give 0. ``xla`` and ``pallas`` (all three kernels) take them;
``cudnn`` does not, so with segment ids an explicit ``cudnn`` runs the ``xla`` path and ``auto`` chooses between
``pallas`` and ``xla`` only. Without segment ids every path is exactly what it was without the option.

Building for another platform: callers that do not pass ``platform`` (the transformer's attention layer, every
model built from a config) take it from :func:`target_platform`, so a whole model step can be lowered on a CPU
host for the accelerator it will run on, with the compiled kernels (not the interpreter)::

  with attention.target_platform("cuda"):
    text = jax.jit(train_step).trace(state, batch).lower(lowering_platforms=("cuda",)).as_text()

Trace inside the ``with`` (a fresh ``jax.jit``): the choice is made while tracing.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lmx.core import mesh as mesh_lib
from lmx.kernels import flash_attention as flash_lib
from lmx.kernels import tpu_attention as tpu_lib
from lmx.kernels.flash_attention import masked_attention, reference_attention  # noqa: F401  (the jnp paths)

IMPLS = ("xla", "pallas", "cudnn", "auto")
HEAD_AXIS = "model"
GPU_MAX_HEAD_DIM = 256  # the Triton kernel keeps [block, head_dim] float32 accumulators in registers
_PLATFORM_ALIASES = {"cuda": "gpu", "rocm": "gpu"}
PLATFORMS = ("cpu", "gpu", "tpu", "cuda", "rocm")
_TARGET = contextvars.ContextVar("lmx_attention_target_platform", default=None)


@contextlib.contextmanager
def target_platform(platform: str | None):
  """Within the block, :func:`attention` calls without ``platform=`` choose and build their impl for ``platform``
  (``cpu``, ``gpu``/``cuda``/``rocm`` or ``tpu``; None: the default backend) instead of the host's backend, with
  the compiled Pallas kernels on an accelerator target. For lowering a model on a CPU host for GPU or TPU."""
  if platform is not None and platform not in PLATFORMS:
    raise ValueError(f"target platform {platform!r} unknown; choose one of {list(PLATFORMS)}")
  token = _TARGET.set(platform)
  try:
    yield
  finally:
    _TARGET.reset(token)


def _is_16bit(dtype) -> bool:
  return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _backend(backend: str | None) -> str:
  backend = backend or jax.default_backend()
  return _PLATFORM_ALIASES.get(backend, backend)


def _default_shapes(head_dim: int, q_shape, kv_shape):
  """Shapes for choices made without them: self-attention, T == S."""
  q_shape = tuple(q_shape) if q_shape is not None else (1, 128, 1, head_dim)
  return q_shape, tuple(kv_shape) if kv_shape is not None else q_shape


def pallas_unsupported_reason(q_shape, kv_shape, dtype, *, causal: bool = True, backend: str | None = None):
  """Why the compiled Pallas kernel of ``backend`` cannot run these shapes/dtype (None when it can).

  CPU has no compiled kernel (the interpreter is correct but slow), so it always has a reason."""
  backend = _backend(backend)
  if backend == "tpu":
    return tpu_lib.unsupported_reason(q_shape, kv_shape, dtype, causal=causal)
  if backend == "gpu":
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
      return f"dtype {jnp.dtype(dtype).name} (the Triton kernel takes float32, bfloat16 or float16)"
    if flash_lib._next_pow2(q_shape[-1]) > GPU_MAX_HEAD_DIM:
      return f"head dim {q_shape[-1]} (the Triton kernel takes at most {GPU_MAX_HEAD_DIM})"
    return None
  return f"backend {backend!r} has no compiled Pallas kernel (only the slow interpreter)"


def auto_impl(q_shape, kv_shape=None, dtype=jnp.float32, *, causal: bool = True, backend: str | None = None):
  """The concrete impl that ``impl="auto"`` runs for these shapes on ``backend``, and why: ``(impl, reason)``.

  ``q_shape`` [B, T, H, E], ``kv_shape`` [B, S, K, E] (default: as q). See the module docstring for the policy.
  """
  backend = _backend(backend)
  q_shape, kv_shape = tuple(q_shape), tuple(q_shape if kv_shape is None else kv_shape)
  e = q_shape[-1]
  if backend == "gpu" and _is_16bit(dtype) and e % 8 == 0 and e <= 128 and not (causal and q_shape[1] != kv_shape[1]):
    return "cudnn", "GPU, 16-bit inputs, head dim a multiple of 8 and <= 128: the cuDNN fused kernel"
  reason = pallas_unsupported_reason(q_shape, kv_shape, dtype, causal=causal, backend=backend)
  if reason is None:
    kernel = "Mosaic TPU" if backend == "tpu" else "Triton"
    return "pallas", f"{backend.upper()}: the Pallas flash kernel ({kernel}) supports these shapes"
  return "xla", f"Pallas not used: {reason}"


def resolve_impl(impl: str, dtype=jnp.float32, head_dim: int = 64, backend: str | None = None, *,
                 q_shape=None, kv_shape=None, causal: bool = True) -> str:
  """Maps ``auto`` to a concrete impl for the backend (:func:`auto_impl`); checks that the requested impl can run
  there. Without ``q_shape``/``kv_shape`` the choice is made for self-attention (T == S) with ``head_dim``."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl {impl!r} unknown; choose one of {list(IMPLS)} (model.attention_impl)")
  backend = _backend(backend)
  q_shape, kv_shape = _default_shapes(head_dim, q_shape, kv_shape)
  if impl == "auto":
    return auto_impl(q_shape, kv_shape, dtype, causal=causal, backend=backend)[0]
  if impl == "cudnn" and (backend != "gpu" or not _is_16bit(dtype)):
    raise ValueError(f"attention impl 'cudnn' needs a GPU and float16/bfloat16 inputs (backend={backend!r}, "
                     f"dtype={jnp.dtype(dtype).name}); set model.attention_impl to 'xla' or 'auto'")
  if impl == "pallas" and backend != "cpu":
    reason = pallas_unsupported_reason(q_shape, kv_shape, dtype, causal=causal, backend=backend)
    if reason:
      raise ValueError(f"attention impl 'pallas' on {backend} does not support {reason}; set "
                       "model.attention_impl to 'xla' or 'auto'")
  return impl


def available_impls(dtype=jnp.float32, backend: str | None = None) -> list[str]:
  """Concrete impls that can run on this backend for ``dtype`` (for benchmarks and tests)."""
  backend = _backend(backend)
  out = ["xla"]
  if backend == "cpu" or pallas_unsupported_reason((1, 128, 1, 64), (1, 128, 1, 64), dtype, backend=backend) is None:
    out.append("pallas")
  if backend == "gpu" and _is_16bit(dtype):
    out.append("cudnn")
  return out


def cudnn_attention(q_BTHE, k_BSKE, v_BSKE, *, causal: bool = True, scale: float | None = None):
  """``jax.nn.dot_product_attention`` with the cuDNN fused kernel (GPU, float16/bfloat16; GQA as in lmx)."""
  try:
    return jax.nn.dot_product_attention(q_BTHE, k_BSKE, v_BSKE, scale=scale, is_causal=causal,
                                        implementation="cudnn")
  except RuntimeError as err:
    if jax.default_backend() == "gpu" or "cuDNN" not in str(err):
      raise
    # jax checks the cuDNN version while tracing, so the cuDNN path cannot be built on a host without CUDA.
    raise ValueError(f"attention impl 'cudnn' cannot be traced on a {jax.default_backend()} host ({err}); to "
                     "lower a model for GPU here use attention_impl='pallas' (the Triton kernel)") from err


def _pallas_fn(q_shape, kv_shape, dtype, *, causal, scale, interpret, backend, segmented=False):
  """The Pallas kernel as ``fn(q, k, v)`` for ``backend`` (see the module docstring); ``fn(q, k, v, q_seg,
  kv_seg)`` when ``segmented``."""
  if segmented:
    def with_segments(kernel):
      return lambda q, k, v, qs, ks: kernel(q, k, v, q_segment_ids_BT=qs, kv_segment_ids_BS=ks)
    if interpret or backend in ("gpu", "tpu"):  # a partial of flash_attention or tpu_flash_attention
      return with_segments(_pallas_fn(q_shape, kv_shape, dtype, causal=causal, scale=scale, interpret=interpret,
                                      backend=backend))
    # Lowering for another platform, as below, with the segment ids passed on to the chosen branch.
    gpu = with_segments(functools.partial(flash_lib.flash_attention, causal=causal, scale=scale, interpret=False))
    tpu_reason = tpu_lib.unsupported_reason(q_shape, kv_shape, dtype, causal=causal)
    if tpu_reason:
      warnings.warn(f"attention impl 'pallas' lowered for TPU would not support {tpu_reason}; the TPU branch "
                    "uses the XLA reference instead", stacklevel=3)
      tpu = with_segments(functools.partial(reference_attention, causal=causal, scale=scale))
    else:
      tpu = with_segments(functools.partial(tpu_lib.tpu_flash_attention, causal=causal, scale=scale))
    return lambda *a: jax.lax.platform_dependent(*a, cuda=gpu, rocm=gpu, tpu=tpu, default=gpu)
  gpu = functools.partial(flash_lib.flash_attention, causal=causal, scale=scale, interpret=False)
  if interpret:
    return functools.partial(flash_lib.flash_attention, causal=causal, scale=scale, interpret=True)
  if backend == "gpu":
    return gpu
  tpu_reason = tpu_lib.unsupported_reason(q_shape, kv_shape, dtype, causal=causal)
  tpu = functools.partial(tpu_lib.tpu_flash_attention, causal=causal, scale=scale)
  if backend == "tpu":
    return tpu
  # A CPU host building compiled kernels for another platform: choose when lowering. CPU itself gets the Triton
  # branch, whose lowering fails there with "Only interpret mode is supported on CPU backend".
  if tpu_reason:
    warnings.warn(f"attention impl 'pallas' lowered for TPU would not support {tpu_reason}; the TPU branch uses "
                  "the XLA reference instead", stacklevel=3)
    tpu = functools.partial(reference_attention, causal=causal, scale=scale)
  return lambda q, k, v: jax.lax.platform_dependent(q, k, v, cuda=gpu, rocm=gpu, tpu=tpu, default=gpu)


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
              batch_axes: tuple[str, ...] = (), interpret: bool | None = None, platform: str | None = None,
              q_segment_ids_BT=None, kv_segment_ids_BS=None):
  """Softmax attention [B, T, H, E] x [B, S, K, E] -> [B, T, H, E] by the chosen implementation.

  ``batch_axes``: the mesh axes the batch is split over (``TransformerConfig.batch_axes``); they shape the
  ``jax.shard_map`` around the Pallas kernel. ``()`` uses those of ``lmx.core.mesh.DEFAULT_AXIS_RULES``.
  ``interpret`` (``impl="pallas"``): run the lmx kernel in the Pallas interpreter; default True only on a CPU
  backend. ``platform`` (``cpu``/``gpu``/``tpu``): the platform to choose and check the impl for, default
  the :func:`target_platform` in effect, else ``jax.default_backend()``. ``q_segment_ids_BT`` / ``kv_segment_ids_BS``: optional int segment ids (0 =
  padding; kv default: the query ids), see the module docstring; None keeps today's computation exactly.
  """
  backend = _backend(platform or _TARGET.get())
  segmented = q_segment_ids_BT is not None
  if not segmented and kv_segment_ids_BS is not None:
    raise ValueError("kv_segment_ids_BS needs q_segment_ids_BT as well")
  requested = impl
  impl = resolve_impl(impl, q_BTHE.dtype, q_BTHE.shape[-1], backend, q_shape=q_BTHE.shape, kv_shape=k_BSKE.shape,
                      causal=causal)
  if segmented and impl == "cudnn":  # cuDNN here takes no segment ids: auto picks Pallas where it can
    ok = requested == "auto" and pallas_unsupported_reason(q_BTHE.shape, k_BSKE.shape, q_BTHE.dtype, causal=causal,
                                                           backend=backend) is None
    impl = "pallas" if ok else "xla"
  if impl == "xla":
    if segmented:
      return reference_attention(q_BTHE, k_BSKE, v_BSKE, causal=causal, scale=scale,
                                 q_segment_ids_BT=q_segment_ids_BT, kv_segment_ids_BS=kv_segment_ids_BS)
    return reference_attention(q_BTHE, k_BSKE, v_BSKE, causal=causal, scale=scale)
  if impl == "cudnn":
    return cudnn_attention(q_BTHE, k_BSKE, v_BSKE, causal=causal, scale=scale)
  interpret = backend == "cpu" if interpret is None else interpret
  fn = _pallas_fn(q_BTHE.shape, k_BSKE.shape, q_BTHE.dtype, causal=causal, scale=scale, interpret=interpret,
                  backend=backend, segmented=segmented)
  args = (q_BTHE, k_BSKE, v_BSKE)
  if segmented:
    kv_segment_ids_BS = q_segment_ids_BT if kv_segment_ids_BS is None else kv_segment_ids_BS
    args += (q_segment_ids_BT.astype(jnp.int32), kv_segment_ids_BS.astype(jnp.int32))
  mesh, spec = _mesh_specs(q_BTHE, k_BSKE, batch_axes or mesh_lib.batch_axes(mesh_lib.DEFAULT_AXIS_RULES))
  if spec is None:
    return fn(*args)
  in_specs = (spec, spec, spec) + ((P(spec[0], None),) * 2 if segmented else ())
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)(*args)
