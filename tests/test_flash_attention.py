"""Attention against a float64 NumPy implementation written here: the jnp reference and the Pallas kernel
(interpret mode on CPU) forward, gradients vs central finite differences, GQA, bottom-right causal masks, bf16,
shard_map; the dispatcher's shard_map specs and ``resolve_impl``'s choices against hand-written tables; block
sizes and ragged lengths against the jnp reference; the TPU wrapper in the Mosaic interpreter; and lowering of the
compiled kernels (interpret=False) from this CPU host for cuda (Triton) and tpu (Mosaic), forward and backward."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from flax import nnx
from jax.sharding import PartitionSpec as P

from lmx.core import losses, mesh as mesh_lib
from lmx.kernels import attention as attention_lib
from lmx.kernels import tpu_attention
from lmx.kernels.flash_attention import flash_attention, masked_attention, reference_attention
from lmx.models.transformer import Transformer, TransformerConfig


def _np_heads(q, k, v, causal, scale, mask):
  """Per query head h: (softmax weights [B, T, S], its q [B, T, E], kv head index), in float64."""
  b, t, h, e = q.shape
  s, kh = k.shape[1], k.shape[2]
  scale = e ** -0.5 if scale is None else scale
  if causal:
    mask = np.broadcast_to(np.arange(t)[:, None] + (s - t) >= np.arange(s)[None, :], (b, t, s))
  for head in range(h):
    kv = head // (h // kh)  # grouped-query: consecutive query heads share a kv head
    scores = q[:, :, head] @ k[:, :, kv].transpose(0, 2, 1) * scale  # [B, T, S]
    if mask is not None:
      scores = np.where(mask, scores, -np.inf)
    top = np.max(scores, axis=-1, keepdims=True)
    w = np.exp(scores - np.where(np.isfinite(top), top, 0.0))
    yield head, kv, scale, w / np.maximum(np.sum(w, axis=-1, keepdims=True), 1e-300)


def np_attention(q, k, v, *, causal, scale=None, mask=None):
  """Softmax attention in float64, one query head at a time: head h reads kv head h // (H // K); with
  ``causal`` query i sees keys j <= i + S - T (bottom-right); ``mask`` [B, T, S] (True = attend) instead gives
  0 for rows that see no key."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  out = np.zeros(q.shape)
  for head, kv, _, w in _np_heads(q, k, v, causal, scale, mask):
    out[:, :, head] = w @ v[:, :, kv]
  return out


def np_grads(q, k, v, do, *, causal, scale=None):
  """d/d(q, k, v) of sum(np_attention(q, k, v) * do), by hand (float64): dV = Pᵀ dO, dP = dO Vᵀ,
  dS = P (dP - rowsum(P dP)), dQ = scale dS K, dK = scale dSᵀ Q; dK, dV summed over each kv head's group."""
  q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
  dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
  for head, kv, sc, w in _np_heads(q, k, v, causal, scale, None):
    do_h = do[:, :, head]
    dv[:, :, kv] += w.transpose(0, 2, 1) @ do_h
    dp = do_h @ v[:, :, kv].transpose(0, 2, 1)
    ds = w * (dp - np.sum(w * dp, axis=-1, keepdims=True))
    dq[:, :, head] = sc * ds @ k[:, :, kv]
    dk[:, :, kv] += sc * ds.transpose(0, 2, 1) @ q[:, :, head]
  return [dq, dk, dv]


def fd_grads(q, k, v, do, *, causal, eps=1e-6):
  """The same gradients by central finite differences of :func:`np_attention`, element by element."""
  args = [np.asarray(x, np.float64) for x in (q, k, v)]
  loss = lambda a: float(np.sum(np_attention(*a, causal=causal) * np.asarray(do, np.float64)))  # noqa: E731
  grads = []
  for i, x in enumerate(args):
    g = np.zeros(x.shape)
    for idx in np.ndindex(x.shape):
      plus, minus = [a.copy() for a in args], [a.copy() for a in args]
      plus[i][idx] += eps
      minus[i][idx] -= eps
      g[idx] = (loss(plus) - loss(minus)) / (2 * eps)
    grads.append(g)
  return grads


def _inputs(b, t, s, h, kh, e, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, t, h, e), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, s, kh, e), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, s, kh, e), jnp.float32).astype(dtype)
  do = jax.random.normal(ks[3], (b, t, h, e), jnp.float32).astype(dtype)
  return q, k, v, do


def _np_reference(b, t, s, h, kh, e, causal):
  """NumPy forward and hand-derived gradients for one case."""
  q, k, v, do = _inputs(b, t, s, h, kh, e)
  return np_attention(q, k, v, causal=causal), np_grads(q, k, v, do, causal=causal)


def _grads(fn, q, k, v, do, causal, **kw):
  def loss(q, k, v):
    return jnp.sum(fn(q, k, v, causal=causal, **kw).astype(jnp.float32) * do.astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


# (B, T, S, H, K, E, causal): MHA, GQA 2, MQA, ragged lengths (padding) with an odd head dim and S > T
# (bottom-right causal), non-causal with S > T.
CASES = [
    (1, 32, 32, 2, 2, 16, True),
    (2, 32, 32, 4, 2, 8, True),
    (1, 48, 48, 4, 1, 8, True),
    (1, 20, 37, 2, 1, 12, True),
    (1, 24, 40, 4, 4, 8, False),
]


def test_numpy_oracle_against_hand_values_and_finite_differences():
  """The NumPy oracle itself: a case small enough to write out, and its gradients vs finite differences."""
  q = np.array([[[[1.0, 0.0]]]])  # [1, 1, 1, 2]
  k = np.array([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # [1, 2, 1, 2]
  v = np.array([[[[1.0, 2.0]], [[3.0, 4.0]]]])
  w = np.exp([2 ** -0.5, 0.0]) / np.sum(np.exp([2 ** -0.5, 0.0]))
  np.testing.assert_allclose(np_attention(q, k, v, causal=True)[0, 0, 0], w @ v[0, :, 0], rtol=1e-12)
  # T=2, S=3: query 0 sees keys 0..1, query 1 sees all three.
  q2 = np.zeros((1, 2, 1, 2))
  v2 = np.arange(6.0).reshape(1, 3, 1, 2)
  o = np_attention(q2, np.zeros((1, 3, 1, 2)), v2, causal=True)
  np.testing.assert_allclose(o[0, :, 0], [v2[0, :2, 0].mean(0), v2[0, :, 0].mean(0)], rtol=1e-12)
  for causal in (True, False):  # GQA (4 query heads on 2 kv heads), S > T
    q, k, v, do = _inputs(2, 5, 7, 4, 2, 6, seed=1)
    for name, a, r in zip("qkv", np_grads(q, k, v, do, causal=causal), fd_grads(q, k, v, do, causal=causal)):
      np.testing.assert_allclose(a, r, atol=1e-7, rtol=1e-6, err_msg=f"d{name} causal={causal}")


@pytest.mark.parametrize("b,t,s,h,kh,e,causal", CASES)
def test_reference_matches_numpy(b, t, s, h, kh, e, causal):
  q, k, v, do = _inputs(b, t, s, h, kh, e)
  np.testing.assert_allclose(reference_attention(q, k, v, causal=causal), np_attention(q, k, v, causal=causal),
                             atol=2e-6, rtol=2e-5)
  np.testing.assert_allclose(reference_attention(q, k, v, causal=causal, scale=0.3),
                             np_attention(q, k, v, causal=causal, scale=0.3), atol=2e-6, rtol=2e-5)
  _, g_np = _np_reference(b, t, s, h, kh, e, causal)
  for name, a, r in zip("qkv", _grads(reference_attention, q, k, v, do, causal), g_np):
    np.testing.assert_allclose(a, r, atol=2e-5, rtol=2e-4, err_msg=f"d{name}")


def test_masked_attention_matches_numpy_and_zeroes_empty_rows():
  q, k, v, _ = _inputs(2, 6, 9, 4, 2, 8)
  mask = np.array(jax.random.bernoulli(jax.random.key(5), 0.5, (2, 6, 9)))
  mask[1, 3] = False  # a query that sees nothing
  out = masked_attention(q, k, v, jnp.asarray(mask))
  np.testing.assert_allclose(out, np_attention(q, k, v, causal=False, mask=mask), atol=2e-6, rtol=2e-5)
  assert not np.asarray(out[1, 3]).any()


@pytest.mark.parametrize("b,t,s,h,kh,e,causal", CASES)
def test_pallas_forward_and_grads_match_numpy(b, t, s, h, kh, e, causal):
  q, k, v, do = _inputs(b, t, s, h, kh, e)
  o = flash_attention(q, k, v, causal=causal, block_q=16, block_k=16)
  assert o.shape == (b, t, h, e) and o.dtype == q.dtype
  o_np, g_np = _np_reference(b, t, s, h, kh, e, causal)
  np.testing.assert_allclose(o, o_np, atol=2e-5, rtol=2e-5)
  g = _grads(flash_attention, q, k, v, do, causal, block_q=16, block_k=16)
  for name, a, r in zip("qkv", g, g_np):
    assert a.shape == r.shape, name
    np.testing.assert_allclose(a, r, atol=5e-5, rtol=2e-4, err_msg=f"d{name}")


def test_bf16_kernel_close_to_numpy():
  q, k, v, do = _inputs(1, 32, 32, 4, 2, 16, jnp.bfloat16)
  o = flash_attention(q, k, v, causal=True, block_q=16, block_k=16)
  assert o.dtype == jnp.bfloat16
  f32 = [np.asarray(x, np.float32) for x in (q, k, v, do)]  # the bf16 values, exactly
  np.testing.assert_allclose(np.asarray(o, np.float32), np_attention(*f32[:3], causal=True), atol=3e-2, rtol=3e-2)
  g = _grads(flash_attention, q, k, v, do, True, block_q=16, block_k=16)
  g_ref = _grads(reference_attention, *(jnp.asarray(x) for x in f32), True)  # float32: checked against FD above
  for a, r in zip(g, g_ref):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), r, atol=6e-2, rtol=6e-2)


def test_default_blocks_and_interpret_flag():
  q, k, v, _ = _inputs(1, 16, 16, 2, 1, 8)
  o = flash_attention(q, k, v, interpret=True)  # blocks capped at the sequence length
  np.testing.assert_allclose(o, np_attention(q, k, v, causal=True), atol=2e-5)
  if jax.default_backend() == "cpu":
    with pytest.raises(Exception, match="interpret"):
      flash_attention(q, k, v, interpret=False)


def test_shape_errors():
  q, k, v, _ = _inputs(1, 16, 16, 3, 2, 8)
  with pytest.raises(ValueError, match="multiple of kv heads"):
    flash_attention(q, k, v)
  with pytest.raises(ValueError, match="multiple of kv heads"):
    reference_attention(q, k, v)
  q, k, v, _ = _inputs(1, 16, 8, 2, 2, 8)
  with pytest.raises(ValueError, match="S=8 >= query length T=16"):
    flash_attention(q, k, v, causal=True)
  with pytest.raises(ValueError, match="S=8 >= query length T=16"):
    reference_attention(q, k, v, causal=True)
  with pytest.raises(ValueError, match="rank-4"):
    flash_attention(q[0], k[0], v[0])


def test_kernel_under_shard_map_matches_numpy():
  mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  case = (2, 32, 32, 4, 2, 8, True)
  q, k, v, do = _inputs(*case[:-1])
  spec = P("data", None, "model", None)

  def local(q, k, v):
    return flash_attention(q, k, v, causal=True, block_q=16, block_k=16)

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)
  val, g = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(sharded(q, k, v) * do), argnums=(0, 1, 2)))(q, k, v)
  o_np, g_np = _np_reference(*case)
  np.testing.assert_allclose(val, np.sum(o_np * np.asarray(do, np.float64)), rtol=1e-5)
  for a, r in zip(g, g_np):
    np.testing.assert_allclose(a, r, atol=5e-5, rtol=2e-4)


def _shard_map_specs(fn, *args):
  """in_specs of the shard_map equations in ``fn``'s jaxpr."""
  eqns = jax.make_jaxpr(fn)(*args).eqns
  return [e.params["in_specs"] for e in eqns if e.primitive.name == "shard_map"]


@pytest.mark.parametrize("b,kh,batch_axes,expected", [
    (4, 2, (), P(("data", "fsdp"), None, "model", None)),  # default: the batch axes of DEFAULT_AXIS_RULES
    (4, 2, ("fsdp",), P("fsdp", None, "model", None)),
    (2, 2, (), P("data", None, "model", None)),  # data x fsdp = 4 does not divide B=2: fsdp dropped
    (4, 1, ("data",), P("data", None, None, None)),  # K=1 does not split over model=2: heads replicated
])
def test_dispatcher_shard_map_follows_batch_axes(b, kh, batch_axes, expected):
  q, k, v, _ = _inputs(b, 16, 16, 4, kh, 8)
  mesh = mesh_lib.make_mesh(dict(data=2, fsdp=2, model=2))
  fn = functools.partial(attention_lib.attention, impl="pallas", batch_axes=batch_axes)
  with jax.set_mesh(mesh):
    assert _shard_map_specs(fn, q, k, v) == [(expected,) * 3]
    out = jax.jit(fn)(q, k, v)
    xla = jax.jit(functools.partial(attention_lib.attention, impl="xla"))(q, k, v)
  np_out = np_attention(q, k, v, causal=True)
  np.testing.assert_allclose(out, np_out, atol=2e-5)
  np.testing.assert_allclose(xla, np_out, atol=2e-6, rtol=2e-5)
  assert not _shard_map_specs(fn, q, k, v)  # no mesh: the kernel is called unwrapped


# (impl, dtype, head_dim, backend) -> the impl that runs (self-attention, T == S). auto on GPU picks cuDNN for 16-bit
# inputs with a head dim that is a multiple of 8 and at most 128, else the Triton kernel up to head dim 256 (padded
# to a power of two); on TPU the Mosaic kernel for float32/bfloat16; XLA otherwise and on CPU. Explicit impls pass
# through where they can run.
RESOLVE = [
    ("auto", jnp.float32, 64, "cpu", "xla"),
    ("auto", jnp.bfloat16, 64, "cpu", "xla"),
    ("auto", jnp.bfloat16, 64, "tpu", "pallas"),
    ("auto", jnp.float32, 100, "tpu", "pallas"),
    ("auto", jnp.float16, 64, "tpu", "xla"),
    ("auto", jnp.bfloat16, 64, "gpu", "cudnn"),
    ("auto", jnp.float16, 128, "gpu", "cudnn"),
    ("auto", jnp.bfloat16, 8, "gpu", "cudnn"),
    ("auto", jnp.bfloat16, 256, "gpu", "pallas"),
    ("auto", jnp.bfloat16, 100, "gpu", "pallas"),
    ("auto", jnp.bfloat16, 512, "gpu", "xla"),
    ("auto", jnp.float32, 64, "gpu", "pallas"),
    ("auto", jnp.float32, 64, "cuda", "pallas"),
    ("xla", jnp.bfloat16, 64, "gpu", "xla"),
    ("pallas", jnp.float32, 64, "cpu", "pallas"),
    ("pallas", jnp.bfloat16, 64, "gpu", "pallas"),
    ("pallas", jnp.bfloat16, 64, "tpu", "pallas"),
    ("cudnn", jnp.float16, 64, "gpu", "cudnn"),
]


@pytest.mark.parametrize("impl,dtype,head_dim,backend,expected", RESOLVE)
def test_resolve_impl_choices(impl, dtype, head_dim, backend, expected):
  assert attention_lib.resolve_impl(impl, dtype, head_dim, backend=backend) == expected


@pytest.mark.parametrize("impl,dtype,backend,match", [
    ("cudnn", jnp.bfloat16, "cpu", "needs a GPU"),
    ("cudnn", jnp.float32, "gpu", "float16/bfloat16"),
    ("flash", jnp.float32, "cpu", "unknown"),
    ("pallas", jnp.float16, "tpu", "float16"),
])
def test_resolve_impl_errors_name_the_field(impl, dtype, backend, match):
  with pytest.raises(ValueError, match=match) as e:
    attention_lib.resolve_impl(impl, dtype, 64, backend=backend)
  assert "model.attention_impl" in str(e.value)


# (backend, q_shape, kv_shape, dtype, causal) -> what auto runs, and a word of its stated reason.
AUTO = [
    ("tpu", (2, 200, 4, 32), (2, 200, 2, 32), jnp.bfloat16, True, "pallas", "Mosaic"),
    ("tpu", (2, 1, 4, 32), (2, 64, 2, 32), jnp.bfloat16, True, "xla", "top-left"),  # cached decoding: T != S
    ("tpu", (2, 1, 4, 32), (2, 64, 2, 32), jnp.bfloat16, False, "pallas", "Mosaic"),
    ("gpu", (2, 1, 4, 32), (2, 64, 2, 32), jnp.bfloat16, True, "pallas", "Triton"),  # cuDNN needs T == S here
    ("gpu", (2, 64, 4, 32), (2, 64, 2, 32), jnp.bfloat16, True, "cudnn", "cuDNN"),
    ("cpu", (2, 64, 4, 32), (2, 64, 2, 32), jnp.float32, True, "xla", "interpreter"),
]


@pytest.mark.parametrize("backend,q_shape,kv_shape,dtype,causal,expected,why", AUTO)
def test_auto_impl_says_what_and_why(backend, q_shape, kv_shape, dtype, causal, expected, why):
  impl, reason = attention_lib.auto_impl(q_shape, kv_shape, dtype, causal=causal, backend=backend)
  assert (impl, why in reason) == (expected, True), reason
  assert attention_lib.resolve_impl("auto", dtype, q_shape[-1], backend, q_shape=q_shape, kv_shape=kv_shape,
                                    causal=causal) == expected


def _np_inputs(b, t, s, h, kh, e, seed):
  """Like :func:`_inputs` from NumPy's generator (no per-shape compilation of jax.random)."""
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal(shape), jnp.float32)
          for shape in ((b, t, h, e), (b, s, kh, e), (b, s, kh, e), (b, t, h, e))]


def _value_and_grads(fn, q, k, v, do, causal, **kw):
  """Output and d/d(q, k, v) of sum(out * do) in one jit."""
  def f(q, k, v):
    o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, causal=causal, **kw), q, k, v)
    return o, vjp(do)
  return jax.jit(f)(q, k, v)


def test_pallas_on_tpu_rejects_unsupported_shapes():
  q, k = jnp.zeros((1, 1, 2, 8)), jnp.zeros((1, 16, 1, 8))
  with pytest.raises(ValueError, match="top-left") as e:
    attention_lib.attention(q, k, k, impl="pallas", platform="tpu")
  assert "model.attention_impl" in str(e.value)
  with pytest.raises(ValueError, match="multiple of 128"):
    tpu_attention.tpu_flash_attention(k, k, k, block_q=64)
  for bad in (24, 0):
    with pytest.raises(ValueError, match="power of two"):
      flash_attention(q, k, k, causal=False, block_k=bad)


# (T, S, causal, block_q, block_k): ragged lengths (not multiples of the blocks), unequal and tiny blocks.
BLOCKS = [
    (20, 37, True, 8, 32),
    (20, 37, False, 32, 8),
    (33, 33, True, 64, 16),
]


@pytest.mark.parametrize("t,s,causal,block_q,block_k", BLOCKS)
def test_pallas_blocks_and_ragged_lengths_match_reference(t, s, causal, block_q, block_k):
  q, k, v, do = _np_inputs(1, t, s, 2, 1, 16, seed=3)
  o, g = _value_and_grads(flash_attention, q, k, v, do, causal, block_q=block_q, block_k=block_k, interpret=True)
  o_ref, g_ref = _value_and_grads(reference_attention, q, k, v, do, causal)
  np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=2e-5)
  for name, a, r in zip("qkv", g, g_ref):
    np.testing.assert_allclose(a, r, atol=5e-5, rtol=2e-4, err_msg=f"d{name}")


@pytest.mark.parametrize("t,s,causal", [(130, 130, True), (72, 130, False)])
def test_tpu_kernel_in_mosaic_interpreter_matches_reference(t, s, causal):
  """The TPU path (GQA by repeated kv heads, padding to 128-blocks, segment ids for non-causal padding) run by the
  Mosaic TPU interpreter on CPU, forward and gradients."""
  q, k, v, do = _np_inputs(1, t, s, 2, 1, 16, seed=4)
  with pltpu.force_tpu_interpret_mode():
    o, g = _value_and_grads(tpu_attention.tpu_flash_attention, q, k, v, do, causal, block_q=128, block_k=128)
  o_ref, g_ref = _value_and_grads(reference_attention, q, k, v, do, causal)
  np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=2e-5)
  for name, a, r in zip("qkv", g, g_ref):
    np.testing.assert_allclose(a, r, atol=5e-5, rtol=2e-4, err_msg=f"d{name}")


# The custom call of each compiled kernel in StableHLO; the Pallas interpreter lowers to neither.
MARKERS = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


def _model_attention_inputs(dtype):
  """q/k/v of the model's attention (TransformerConfig defaults, GQA with 2 kv heads) at max_seq_len."""
  cfg = TransformerConfig(n_kv_heads=2)
  q = jnp.zeros((2, cfg.max_seq_len, cfg.n_heads, cfg.head_dim), dtype)
  kv = jnp.zeros((2, cfg.max_seq_len, cfg.kv_heads, cfg.head_dim), dtype)
  return q, kv, kv


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("target", ["cuda", "tpu"])
@pytest.mark.parametrize("platform", [None, "target"])  # chosen at lowering (platform_dependent) or up front
def test_compiled_kernels_lower_for_gpu_and_tpu(target, platform, dtype):
  platform = {"cuda": "gpu", "tpu": "tpu"}[target] if platform else None
  fwd = functools.partial(attention_lib.attention, causal=True, impl="pallas", interpret=False, platform=platform)
  loss = lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32))  # noqa: E731
  bwd = jax.grad(loss, argnums=(0, 1, 2))
  args = _model_attention_inputs(dtype)
  other = MARKERS["tpu" if target == "cuda" else "cuda"]
  for name, fn, kernels in (("fwd", fwd, 1), ("bwd", bwd, 3)):  # backward: the forward again plus two kernels
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(target,)).as_text()
    assert text.count(MARKERS[target]) >= kernels, f"{target} {name}: compiled kernel not lowered"
    assert other not in text, f"{target} {name}: the other platform's kernel lowered"


def test_auto_lowers_the_tpu_kernel():
  fn = functools.partial(attention_lib.attention, causal=True, impl="auto", platform="tpu")
  text = jax.jit(fn).trace(*_model_attention_inputs(jnp.bfloat16)).lower(lowering_platforms=("tpu",)).as_text()
  assert MARKERS["tpu"] in text


def _segments(b, t):
  """Left padding in row 0, two packed sequences in the other rows."""
  seg = np.ones((b, t), np.int32)
  seg[0, : t // 4] = 0
  seg[1:, t // 2:] = 2
  return jnp.asarray(seg)


@pytest.mark.parametrize("target", ["cuda", "tpu"])
def test_compiled_kernels_with_segment_ids_lower_for_gpu_and_tpu(target):
  platform = {"cuda": "gpu", "tpu": "tpu"}[target]
  q, k, v = _model_attention_inputs(jnp.bfloat16)
  seg = _segments(q.shape[0], q.shape[1])
  fwd = functools.partial(attention_lib.attention, causal=True, impl="pallas", interpret=False, platform=platform,
                          q_segment_ids_BT=seg)
  bwd = jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
  for name, fn in (("fwd", fwd), ("bwd", bwd)):
    text = jax.jit(fn).trace(q, k, v).lower(lowering_platforms=(target,)).as_text()
    assert MARKERS[target] in text, f"{target} {name}: compiled kernel not lowered"


def test_tpu_kernel_with_segment_ids_in_mosaic_interpreter_matches_reference():
  q, k, v, do = _np_inputs(2, 130, 130, 2, 1, 16, seed=5)
  seg = _segments(2, 130)
  with pltpu.force_tpu_interpret_mode():
    o, g = _value_and_grads(tpu_attention.tpu_flash_attention, q, k, v, do, True, block_q=128, block_k=128,
                            q_segment_ids_BT=seg)
  o_ref, g_ref = _value_and_grads(reference_attention, q, k, v, do, True, q_segment_ids_BT=seg)
  np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=2e-5)
  for name, a, r in zip("qkv", g, g_ref):
    np.testing.assert_allclose(a, r, atol=5e-5, rtol=2e-4, err_msg=f"d{name}")


def _model_grad_text(impl: str, dtype: str, target: str) -> str:
  """StableHLO of d(next-token loss)/d(params) of a 2-layer Transformer, built and lowered for ``target``."""
  cfg = TransformerConfig(n_layers=2, n_kv_heads=2, attention_impl=impl, dtype=dtype, max_seq_len=128)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)

  def loss(params, tokens_BT):
    return losses.next_token_loss(nnx.merge(graphdef, params)(tokens_BT[:, :-1]), tokens_BT)

  with attention_lib.target_platform(target):
    return jax.jit(jax.grad(loss)).trace(params, jnp.zeros((2, 129), jnp.int32)).lower(
        lowering_platforms=(target,)).as_text()


@pytest.mark.parametrize("target,dtype", [("cuda", "float32"), ("cuda", "bfloat16"), ("tpu", "bfloat16")])
def test_model_train_gradient_lowers_with_the_compiled_kernel_under_target_platform(target, dtype):
  # The model passes neither interpret nor platform; target_platform makes its attention the real kernel.
  text = _model_grad_text("pallas", dtype, target)
  assert MARKERS[target] in text
  assert MARKERS["tpu" if target == "cuda" else "cuda"] not in text
  if target == "cuda":  # per layer: the forward kernel, and the backward's forward plus dq and dkv kernels
    assert text.count(MARKERS["cuda"]) >= 3 * 2


def test_without_target_platform_the_model_on_cpu_runs_the_interpreter():
  cfg = TransformerConfig(n_layers=1, n_kv_heads=2, attention_impl="pallas", max_seq_len=32)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  fn = lambda p, t: nnx.merge(graphdef, p)(t)  # noqa: E731
  text = jax.jit(fn).trace(params, jnp.zeros((1, 32), jnp.int32)).lower().as_text()
  assert MARKERS["cuda"] not in text and MARKERS["tpu"] not in text


def test_target_platform_rejects_unknown_names_and_restores_the_default():
  with pytest.raises(ValueError, match="unknown"):
    with attention_lib.target_platform("cdua"):
      pass
  with attention_lib.target_platform("tpu"):
    assert attention_lib._TARGET.get() == "tpu"
  assert attention_lib._TARGET.get() is None
