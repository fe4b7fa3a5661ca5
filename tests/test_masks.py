"""Masks and segments through the training forward: a left-padded batch scores each row as it would alone
(per-token log-probs, XLA and Pallas), packed sequences give each sequence's own logits, gradients through the
Pallas kernel with segment ids match the XLA reference, and the default (no segment ids) output is unchanged."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmx.core import mesh as mesh_lib
from lmx.kernels import attention as attention_lib
from lmx.kernels.flash_attention import flash_attention, masked_attention, reference_attention
from lmx.models import generate as gen
from lmx.models import registry
from lmx.models.transformer import segment_positions

VOCAB = 32
ROWS = [[5, 9, 3], [7, 1, 2, 8, 4, 6, 30], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
T = 12  # every row left-padded to 12 (the longest row has 2 pads too)


@functools.lru_cache(maxsize=None)
def _model(impl: str, moe: bool = False):
  """A small GQA model through the registry (``Model.apply``) and its params (the same for every impl)."""
  cfg = dict(name="transformer", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
             max_seq_len=32, init_std=0.2, attention_impl=impl)
  if moe:
    cfg.update(moe_every=2, n_experts=4, top_k=2, moe_d_ff=32)  # dropless: routing is per token
  model = registry.build_model(cfg)
  return model, model.init(jax.random.key(1))


@functools.lru_cache(maxsize=None)
def _logprobs_fn(impl: str, moe: bool = False):
  model, _ = _model(impl, moe)
  return jax.jit(functools.partial(gen.token_logprobs, model.apply))


@functools.lru_cache(maxsize=None)
def _logits_fn(impl: str):
  model, _ = _model(impl)
  return jax.jit(lambda p, toks, seg: model.apply(p, toks, segment_ids_BT=seg))


def _left_padded():
  tokens_BT, lens_B = gen.left_pad(ROWS, pad_id=0, length=T)
  seg_BT = (np.arange(T)[None, :] >= (T - lens_B)[:, None]).astype(np.int32)
  return jnp.asarray(tokens_BT), jnp.asarray(seg_BT), lens_B


def test_segment_positions_count_from_each_segment_start():
  seg = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 2, 2, 0], [3, 3, 3, 3, 3]])
  np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 0, 1, 2], [0, 1, 0, 1, 0], [0, 1, 2, 3, 4]])


@pytest.mark.parametrize("impl,moe", [("xla", False), ("pallas", False), ("xla", True)])
def test_left_padded_logprobs_match_unpadded_rows(impl, moe):
  _, params = _model(impl, moe)
  tokens_BT, seg_BT, lens_B = _left_padded()
  logp_BT = np.asarray(_logprobs_fn(impl, moe)(params, tokens_BT, seg_BT))
  assert np.isfinite(logp_BT).all()
  for b, row in enumerate(ROWS):
    pad = T - lens_B[b]
    np.testing.assert_array_equal(logp_BT[b, :pad + 1], 0.0)  # padding and the first real token: not scored
    alone_T = np.asarray(_logprobs_fn(impl, moe)(params, jnp.asarray([row], jnp.int32), None))[0]
    np.testing.assert_allclose(logp_BT[b, pad:], alone_T, atol=1e-5, rtol=1e-5, err_msg=f"row {b}")
    assert alone_T[0] == 0.0 and np.all(alone_T[1:] < 0)


def test_logprobs_with_explicit_positions_and_module():
  """The module form (params=None) and explicit RoPE positions give the log-probs of the derived positions."""
  model, params = _model("xla")
  tokens_BT, seg_BT, _ = _left_padded()
  module = nnx.merge(model.graphdef, params)
  pos_BT = segment_positions(seg_BT)
  a = gen.token_logprobs(module, None, tokens_BT, seg_BT, positions_BT=pos_BT)
  b = _logprobs_fn("xla")(params, tokens_BT, seg_BT)
  np.testing.assert_allclose(a, b, atol=1e-6)
  with pytest.raises(ValueError, match="params=None"):
    gen.token_logprobs(module, params, tokens_BT, seg_BT)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_packed_sequences_match_separate_runs(impl):
  _, params = _model(impl)
  seq_a, seq_b = ROWS[1], ROWS[2][:6]
  packed = np.zeros((1, 16), np.int32)  # [a a a a a a a b b b b b b 0 0 0]: two sequences and right padding
  packed[0, :7], packed[0, 7:13] = seq_a, seq_b
  seg = np.zeros((1, 16), np.int32)
  seg[0, :7], seg[0, 7:13] = 1, 2
  logits = np.asarray(_logits_fn(impl)(params, jnp.asarray(packed), jnp.asarray(seg)))[0]
  assert np.isfinite(logits).all()
  for sl, seq in ((slice(0, 7), seq_a), (slice(7, 13), seq_b)):
    alone = np.asarray(_logits_fn(impl)(params, jnp.asarray([seq], jnp.int32), None))[0]
    np.testing.assert_allclose(logits[sl], alone, atol=1e-5, rtol=1e-5)


def _attention_inputs(b=3, t=37, h=4, k=2, e=16, seed=0):
  r = np.random.default_rng(seed)
  q = jnp.asarray(r.normal(size=(b, t, h, e)), jnp.float32)
  kv = [jnp.asarray(r.normal(size=(b, t, k, e)), jnp.float32) for _ in range(2)]
  do = jnp.asarray(r.normal(size=(b, t, h, e)), jnp.float32)
  seg = np.ones((b, t), np.int32)
  seg[0, :10] = 0  # left padding
  seg[1, :5], seg[1, 5:20], seg[1, 20:30], seg[1, 30:] = 1, 2, 3, 0  # packed, right padding
  seg[2:, :] = 0  # all padding: every query sees nothing
  return q, kv[0], kv[1], do, jnp.asarray(seg)


@pytest.mark.parametrize("causal", [True, False])
def test_pallas_segment_gradients_match_reference(causal):
  q, k, v, do, seg = _attention_inputs()

  def value_and_grads(impl):
    def loss(q, k, v):
      o = attention_lib.attention(q, k, v, causal=causal, impl=impl, q_segment_ids_BT=seg)
      return jnp.sum(o * do), o
    (_, o), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return o, g

  o_ref, g_ref = value_and_grads("xla")
  o, g = value_and_grads("pallas")
  np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=2e-5)
  np.testing.assert_array_equal(o[0, :10], 0.0)  # padding queries: zero output
  np.testing.assert_array_equal(o[2], 0.0)
  for name, a, r in zip("qkv", g, g_ref):
    assert np.isfinite(a).all(), f"d{name}"
    np.testing.assert_allclose(a, r, atol=5e-5, rtol=2e-4, err_msg=f"d{name}")
  np.testing.assert_array_equal(g[0][2], 0.0)  # nothing attends to or from an all-padding row


def test_pallas_small_blocks_with_segments_match_masked_reference():
  """Blocks smaller than the segments (rows that see no key in some blocks), against an explicit mask."""
  q, k, v, _, seg = _attention_inputs(seed=1)
  o = flash_attention(q, k, v, causal=True, block_q=8, block_k=16, q_segment_ids_BT=seg, interpret=True)
  t = q.shape[1]
  mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0) & jnp.tril(jnp.ones((t, t), bool))
  np.testing.assert_allclose(o, masked_attention(q, k, v, mask), atol=2e-5, rtol=2e-5)


def test_model_gradients_pallas_match_xla_with_segments():
  tokens_BT, seg_BT, _ = _left_padded()

  def grads(impl):
    model, params = _model(impl)
    loss = lambda p: jnp.sum(gen.token_logprobs(model.apply, p, tokens_BT, seg_BT))  # noqa: E731
    return jax.jit(jax.grad(loss))(params)

  g_ref, g = grads("xla"), grads("pallas")
  for (path, a), r in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, r, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_default_output_unchanged():
  """No segment ids: the dispatcher's XLA path is the causal reference exactly, the kernel matches it, and the
  model forward equals the one with all-real segment ids (one segment per row)."""
  q, k, v, _, _ = _attention_inputs(b=2, seed=2)
  t = q.shape[1]
  ref = reference_attention(q, k, v, causal=True)
  np.testing.assert_array_equal(attention_lib.attention(q, k, v, causal=True, impl="xla"), ref)
  causal_mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (2, t, t))
  np.testing.assert_allclose(ref, masked_attention(q, k, v, causal_mask), atol=1e-6)
  np.testing.assert_allclose(attention_lib.attention(q, k, v, causal=True, impl="pallas"), ref, atol=2e-5)
  model, params = _model("xla")
  tokens_BT, _, _ = _left_padded()
  plain = model.apply(params, tokens_BT)
  np.testing.assert_allclose(model.apply(params, tokens_BT, segment_ids_BT=jnp.ones_like(tokens_BT)), plain,
                             atol=1e-5, rtol=1e-5)
  pos_BT = jnp.broadcast_to(jnp.arange(T), tokens_BT.shape)
  np.testing.assert_array_equal(model.apply(params, tokens_BT, positions_BT=pos_BT), plain)


def test_segment_id_shape_errors():
  q, k, v, _, seg = _attention_inputs(b=3)
  with pytest.raises(ValueError, match="segment ids"):
    reference_attention(q, k, v, q_segment_ids_BT=seg[:, :5])
  with pytest.raises(ValueError, match="needs q_segment_ids"):
    attention_lib.attention(q, k, v, kv_segment_ids_BS=seg)
  model, params = _model("xla")
  tokens_BT, seg_BT, _ = _left_padded()
  with pytest.raises(ValueError, match="segment_ids_BT"):
    model.apply(params, tokens_BT, segment_ids_BT=seg_BT[:, :4])


def test_pallas_segments_under_a_mesh_match_reference():
  """Under a mesh the kernel runs in shard_map over batch and heads; the segment ids are split over the batch."""
  q, k, v, do, seg = _attention_inputs(b=4, t=24, seed=3)
  fn = functools.partial(attention_lib.attention, impl="pallas", q_segment_ids_BT=seg)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v) * do)  # noqa: E731
  with jax.set_mesh(mesh_lib.make_mesh(dict(data=2, fsdp=2, model=2))):
    o = jax.jit(fn)(q, k, v)
    g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  ref = functools.partial(reference_attention, q_segment_ids_BT=seg)
  np.testing.assert_allclose(o, ref(q, k, v), atol=2e-5, rtol=2e-5)
  g_ref = jax.grad(lambda q, k, v: jnp.sum(ref(q, k, v) * do), argnums=(0, 1, 2))(q, k, v)
  for a, r in zip(g, g_ref):
    np.testing.assert_allclose(a, r, atol=5e-5, rtol=2e-4)
