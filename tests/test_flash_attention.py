"""Pallas flash attention vs the jnp reference (interpret mode on CPU): forward, gradients, GQA, dtypes,
shard_map, and the dispatcher."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lmx.kernels import attention as attention_lib
from lmx.kernels.flash_attention import flash_attention, flash_attention_reference


def _inputs(b, t, s, h, kh, e, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, t, h, e), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, s, kh, e), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, s, kh, e), jnp.float32).astype(dtype)
  do = jax.random.normal(ks[3], (b, t, h, e), jnp.float32).astype(dtype)
  return q, k, v, do


def _grads(fn, q, k, v, do, causal):
  def loss(q, k, v):
    o = fn(q, k, v, causal=causal, block_q=16, block_k=16)
    return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


# (B, T, S, H, K, E, causal): MHA, GQA 2 and 4, MQA, non-causal, ragged lengths (padding), odd head dim,
# cross-length causal (S > T, bottom-right aligned).
CASES = [
    (1, 32, 32, 2, 2, 16, True),
    (2, 32, 32, 4, 2, 16, True),
    (1, 48, 48, 4, 1, 8, True),
    (1, 20, 37, 2, 1, 12, True),
    (1, 24, 40, 4, 4, 8, False),
]


@pytest.mark.parametrize("b,t,s,h,kh,e,causal", CASES)
def test_forward_and_grads_fp32(b, t, s, h, kh, e, causal):
  q, k, v, do = _inputs(b, t, s, h, kh, e)
  o = flash_attention(q, k, v, causal=causal, block_q=16, block_k=16)
  o_ref = flash_attention_reference(q, k, v, causal=causal)
  assert o.shape == (b, t, h, e) and o.dtype == q.dtype
  np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=2e-5)
  g = _grads(flash_attention, q, k, v, do, causal)
  g_ref = _grads(flash_attention_reference, q, k, v, do, causal)
  for name, a, r in zip("qkv", g, g_ref):
    assert a.shape == r.shape, name
    np.testing.assert_allclose(a, r, atol=5e-5, rtol=5e-5, err_msg=f"d{name}")


def test_bf16_tolerance():
  q, k, v, do = _inputs(1, 32, 32, 4, 2, 16, jnp.bfloat16)
  o = flash_attention(q, k, v, causal=True, block_q=16, block_k=16)
  assert o.dtype == jnp.bfloat16
  o_ref = flash_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), causal=True)
  np.testing.assert_allclose(o.astype(jnp.float32), o_ref, atol=3e-2, rtol=3e-2)
  g = _grads(flash_attention, q, k, v, do, True)
  g_ref = _grads(flash_attention_reference, *(x.astype(jnp.float32) for x in (q, k, v, do)), True)
  for a, r in zip(g, g_ref):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(a.astype(jnp.float32), r, atol=6e-2, rtol=6e-2)


def test_default_blocks_and_interpret_flag():
  q, k, v, _ = _inputs(1, 16, 16, 2, 1, 8)
  o = flash_attention(q, k, v, interpret=True)  # blocks capped at the sequence length
  np.testing.assert_allclose(o, flash_attention_reference(q, k, v), atol=2e-5)
  if jax.default_backend() == "cpu":
    with pytest.raises(Exception, match="interpret"):
      flash_attention(q, k, v, interpret=False)


def test_shape_errors():
  q, k, v, _ = _inputs(1, 16, 16, 3, 2, 8)
  with pytest.raises(ValueError, match="multiple of kv heads"):
    flash_attention(q, k, v)
  q, k, v, _ = _inputs(1, 16, 8, 2, 2, 8)
  with pytest.raises(ValueError, match="S=8 >= query length T=16"):
    flash_attention(q, k, v, causal=True)
  with pytest.raises(ValueError, match="rank-4"):
    flash_attention(q[0], k[0], v[0])


def test_under_shard_map():
  mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  q, k, v, do = _inputs(2, 32, 32, 4, 2, 8)
  spec = P("data", None, "model", None)

  def local(q, k, v):
    return flash_attention(q, k, v, causal=True, block_q=16, block_k=16)

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)
  f = jax.jit(lambda q, k, v: jnp.sum(sharded(q, k, v) * do))
  val, g = jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v)
  f_ref = lambda q, k, v: jnp.sum(flash_attention_reference(q, k, v) * do)  # noqa: E731
  val_ref, g_ref = jax.value_and_grad(f_ref, argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(val, val_ref, rtol=1e-5)
  for a, r in zip(g, g_ref):
    np.testing.assert_allclose(a, r, atol=5e-5, rtol=5e-5)


def test_dispatcher_impls_agree_and_wrap_under_mesh():
  q, k, v, _ = _inputs(2, 16, 16, 4, 2, 8)
  ref = attention_lib.attention(q, k, v, causal=True, impl="xla")
  np.testing.assert_allclose(attention_lib.attention(q, k, v, impl="pallas"), ref, atol=2e-5)
  np.testing.assert_allclose(attention_lib.attention(q, k, v, impl="auto"), ref, atol=1e-6)
  np.testing.assert_allclose(ref, attention_lib.reference_attention(q, k, v, causal=True), atol=0)
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh):
    f = jax.jit(lambda q, k, v: attention_lib.attention(q, k, v, impl="pallas"))
    assert "shard_map" in str(jax.make_jaxpr(f)(q, k, v))
    out = f(q, k, v)
  np.testing.assert_allclose(out, ref, atol=2e-5)


def test_resolve_impl():
  assert attention_lib.resolve_impl("auto", jnp.bfloat16, 64, backend="cpu") == "xla"
  assert attention_lib.resolve_impl("auto", jnp.bfloat16, 64, backend="gpu") == "cudnn"
  assert attention_lib.resolve_impl("auto", jnp.float32, 64, backend="gpu") == "xla"
  with pytest.raises(ValueError, match="model.attention_impl"):
    attention_lib.resolve_impl("cudnn", jnp.bfloat16, 64, backend="cpu")
  with pytest.raises(ValueError, match="unknown"):
    attention_lib.resolve_impl("flash", jnp.float32, 64)
