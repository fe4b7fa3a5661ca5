"""Causal capacity routing (hand-worked example, a sequential NumPy reference, later tokens cannot change earlier
outputs, cached decoding equals the full forward pass), the tied-embedding initial logit scale, and how the
load-balancing and z-losses combine across MoE layers (sum / mean / global) against NumPy."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmx.models import generate as gen
from lmx.models import moe as moe_lib
from lmx.models.transformer import Transformer, TransformerConfig


def _weights(e, d, f=6, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (e, d, f)) * 0.5, jax.random.normal(ks[1], (e, d, f)) * 0.5,
          jax.random.normal(ks[2], (e, f, d)) * 0.5)


def test_capacity_hand_example_4_tokens_2_experts_top2_capacity2():
  # First choices: t0->e0, t1->e0, t2->e0, t3->e1; second choices: the other expert.
  experts = jnp.array([[[0, 1], [0, 1], [0, 1], [1, 0]]])
  assert moe_lib.capacity(4, 2, 2, 0.5) == 2  # ceil(0.5 * 4 * 2 / 2)
  # (position, rank) order: (t0,e0) (t0,e1) (t1,e0) (t1,e1) (t2,e0) (t2,e1) (t3,e1) (t3,e0).
  # Counts before each choice: e0: 0, -, 1, -, 2, -, -, 3;  e1: -, 0, -, 1, -, 2, 3, -.
  # Kept (count < 2): t0 and t1 on both experts; t2 and t3 on neither. (The former "all first choices
  # first" rule kept (t0,e0) (t1,e0) (t3,e1) (t0,e1): t3 displaced t1's second choice.)
  slot, counts = moe_lib.capacity_slots(experts, 2, 2)
  np.testing.assert_array_equal(slot, [[[0, 0], [1, 1], [-1, -1], [-1, -1]]])
  np.testing.assert_array_equal(counts, [[4, 4]])
  # Padding: with t0 masked out, t1 and t2 are served and t3 still finds both experts full.
  slot_v, counts_v = moe_lib.capacity_slots(experts, 2, 2, valid_BT=jnp.array([[False, True, True, True]]))
  np.testing.assert_array_equal(slot_v, [[[-1, -1], [0, 0], [1, 1], [-1, -1]]])
  np.testing.assert_array_equal(counts_v, [[3, 3]])
  # Carried counts (decoding): tokens 2, 3 after a prefix that used e0 once and e1 twice.
  slot_c, counts_c = moe_lib.capacity_slots(experts[:, 2:], 2, 2, counts_BE=jnp.array([[1, 2]]))
  np.testing.assert_array_equal(slot_c, [[[1, -1], [-1, -1]]])  # (t2,e0) slot 1; everything else full
  np.testing.assert_array_equal(counts_c, [[3, 4]])
  # The dispatch serves exactly the kept pairs, with their gates.
  d = 8
  x = jax.random.normal(jax.random.key(1), (1, 4, d))
  gates = jnp.array([[[0.6, 0.4], [0.7, 0.3], [0.9, 0.1], [0.8, 0.2]]])
  w1, w3, w2 = _weights(2, d)
  out, dropped = moe_lib.capacity_dispatch(x, experts, gates, w1, w3, w2, capacity_factor=0.5)
  kept_gates = gates * jnp.array([[[1, 1], [1, 1], [0, 0], [0, 0]]])
  ref = moe_lib.dense_reference(x[0], experts[0], kept_gates[0], w1, w3, w2)
  np.testing.assert_allclose(out[0], ref, atol=1e-5)
  assert float(dropped) == pytest.approx(0.5)


def _np_slots(experts, e, cap, valid=None):
  """Sequential reference: walk each row in (position, rank) order, counting every choice per expert."""
  b, t, k = experts.shape
  slot = np.full((b, t, k), -1)
  counts = np.zeros((b, e), int)
  for r in range(b):
    for i in range(t):
      if valid is not None and not valid[r, i]:
        continue
      for j in range(k):
        ex = experts[r, i, j]
        if counts[r, ex] < cap:
          slot[r, i, j] = counts[r, ex]
        counts[r, ex] += 1
  return slot, counts


def test_capacity_slots_match_sequential_reference():
  rng = np.random.default_rng(0)
  b, t, e, k = 3, 20, 5, 3
  experts = np.stack([[rng.permutation(e)[:k] for _ in range(t)] for _ in range(b)])
  valid = rng.random((b, t)) > 0.2
  for cap in (1, 3, 7, 60):
    for v in (None, valid):
      slot, counts = moe_lib.capacity_slots(jnp.asarray(experts), e, cap,
                                            valid_BT=None if v is None else jnp.asarray(v))
      ref_slot, ref_counts = _np_slots(experts, e, cap, v)
      np.testing.assert_array_equal(slot, ref_slot)
      np.testing.assert_array_equal(counts, ref_counts)


def _cfg(**kw):
  base = dict(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
              init_std=0.2, moe_every=1, n_experts=4, top_k=2, moe_d_ff=32, capacity_factor=0.5)
  base.update(kw)
  return TransformerConfig.from_config(base)


@functools.lru_cache(maxsize=None)
def _capacity_model():
  return Transformer(_cfg(), rngs=nnx.Rngs(3))


def test_capacity_layer_output_does_not_depend_on_later_tokens():
  d, e, k = 16, 4, 2
  layer = moe_lib.MoE(d, 8, e, k, capacity_factor=0.5, init_std=0.5, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 16, d))
  fwd = jax.jit(lambda x: layer(x))
  y, info = fwd(x)
  assert float(info["dropped_frac"]) > 0.1  # capacity ceil(0.5*16*2/4) = 4 per expert: drops happen
  for t in (0, 5, 11):
    x2 = x.at[:, t + 1:].set(jax.random.normal(jax.random.key(t + 1), (2, 15 - t, d)) * 3)
    y2, _ = fwd(x2)
    np.testing.assert_allclose(y2[:, :t + 1], y[:, :t + 1], atol=1e-6, err_msg=f"t={t}")
    if t == 0:  # (late tokens may all be dropped, output 0 either way)
      assert not np.allclose(y2[:, t + 1:], y[:, t + 1:])  # the perturbation does reach the later outputs


def test_capacity_transformer_logits_do_not_depend_on_later_tokens():
  model = _capacity_model()
  fwd = jax.jit(lambda toks: model(toks, return_aux=True))
  tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, 32)
  logits, aux = fwd(tokens)
  assert float(aux["metrics"]["moe/dropped_frac"]) > 0.05
  for t in (3, 12):
    later = jax.random.randint(jax.random.key(t), (2, 23 - t), 0, 32)
    logits2, _ = fwd(tokens.at[:, t + 1:].set(later))
    np.testing.assert_allclose(logits2[:, :t + 1], logits[:, :t + 1], atol=1e-6, err_msg=f"t={t}")


PROMPTS = [[5, 9, 3], [7, 1, 2, 8, 4], [11, 12, 13, 14, 15, 16, 17, 18]]
N_NEW = 6


def test_capacity_cached_decode_equals_full_forward_on_left_padded_prompts():
  """Prefill a left-padded batch, then N_NEW single-token steps; every row's logits equal the full forward pass
  on that row alone, right-padded to the cache length S (the length the capacity is computed for)."""
  model = _capacity_model()
  prompt_BP, lens_B = gen.left_pad(PROMPTS)
  b, p = prompt_BP.shape
  s = p + N_NEW
  pad_B = p - lens_B
  cont_BN = np.asarray(jax.random.randint(jax.random.key(9), (b, N_NEW), 0, 32))
  valid_BS = np.concatenate([np.arange(p)[None] >= pad_B[:, None], np.ones((b, N_NEW), bool)], axis=1)
  positions_BP = np.maximum(np.arange(p)[None] - pad_B[:, None], 0)
  graphdef, state = nnx.split(model)

  @jax.jit
  def cached(state):
    m = nnx.merge(graphdef, state)
    kw = dict(kv_valid_BS=jnp.asarray(valid_BS))
    logits_BPV, cache = m.decode(jnp.asarray(prompt_BP), m.init_cache(b, s), start=0,
                                 positions_BT=jnp.asarray(positions_BP), **kw)
    steps = []
    for i in range(N_NEW):
      step_B1V, cache = m.decode(jnp.asarray(cont_BN[:, i:i + 1]), cache, start=p + i,
                                 positions_BT=jnp.asarray(lens_B + i)[:, None], **kw)
      steps.append(step_B1V)
    return logits_BPV, jnp.concatenate(steps, axis=1), cache

  logits_BPV, steps_BNV, cache = cached(state)
  assert all(c["moe_counts"].shape == (b, 4) for c in cache)
  # Every real token counts k=2 choices per layer; padding counts none.
  np.testing.assert_array_equal(np.asarray(cache[0]["moe_counts"]).sum(-1), 2 * (lens_B + N_NEW))
  full_fwd = jax.jit(lambda toks: model(toks, return_aux=True))
  dropped = []
  for r, prompt in enumerate(PROMPTS):
    seq = list(prompt) + list(cont_BN[r])
    full, aux = full_fwd(jnp.asarray([seq + [0] * (s - len(seq))], jnp.int32))
    dropped.append(float(aux["metrics"]["moe/dropped_frac"]))
    np.testing.assert_allclose(logits_BPV[r, pad_B[r]:], full[0, :len(prompt)], atol=2e-5, err_msg=f"row {r}")
    np.testing.assert_allclose(steps_BNV[r], full[0, len(prompt):len(seq)], atol=2e-5, err_msg=f"row {r}")
  assert max(dropped) > 0.0  # the comparison covers dropped assignments


def test_capacity_generate_equals_greedy_by_full_forward():
  model = _capacity_model()
  prompt_BP, lens_B = gen.left_pad(PROMPTS)
  s = prompt_BP.shape[1] + N_NEW
  out = gen.generate(model, prompt_BP, lens_B, jax.random.key(0), max_new_tokens=N_NEW, temperature=0.0)
  fwd = jax.jit(model)
  for r, prompt in enumerate(PROMPTS):
    seq = list(prompt)
    for _ in range(N_NEW):
      logits = fwd(jnp.asarray([seq + [0] * (s - len(seq))], jnp.int32))
      seq.append(int(np.argmax(logits[0, len(seq) - 1])))
    assert list(np.asarray(out["new_tokens"][r])) == seq[len(prompt):], f"row {r}"


def _np_rmsnorm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def test_tied_embedding_initial_logit_scale():
  """Tied table std = init_std: logits of the unit-RMS final hidden state have std ≈ init_std · sqrt(D) (0.32 at
  D = 256, as with the untied unembedding) instead of ≈ sqrt(D) = 16, and the initial loss is ≈ log V."""
  d, v = 256, 512
  cfg = TransformerConfig.from_config(dict(vocab_size=v, d_model=d, n_layers=2, n_heads=4, d_ff=512,
                                           max_seq_len=64, tie_embeddings=True))
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (4, 64), 0, v)
  logits, hidden = model(tokens, return_hidden=True)
  embed = np.asarray(model.embed[...], np.float64)
  np.testing.assert_allclose(embed.std(), cfg.init_std, rtol=0.02)
  h = _np_rmsnorm(np.asarray(hidden[-1], np.float64), np.asarray(model.final_norm.scale[...]), cfg.norm_eps)
  ref = h @ embed.T  # the logits from the parameters
  np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=1e-4)
  intended = cfg.init_std * np.sqrt(d)
  own = np.zeros(ref.shape, bool)
  np.put_along_axis(own, np.asarray(tokens)[..., None], True, axis=-1)
  assert 0.9 * intended < ref[~own].std() < 1.1 * intended, ref[~own].std()
  assert 0.9 * intended < ref.std() < 1.2 * intended, ref.std()  # the input token's own logit is a bit larger
  lse = np.log(np.exp(ref).sum(-1))
  assert abs(np.mean(lse - ref.mean(-1)) - np.log(v)) < 0.2  # mean loss over uniform targets ≈ log V
  # Untied: the unembedding has std init_std too, so the logit scale is the same.
  untied = Transformer(TransformerConfig.from_config(dict(cfg.__dict__, tie_embeddings=False)), rngs=nnx.Rngs(0))
  std = float(np.asarray(untied(tokens)).std())
  assert 0.9 * intended < std < 1.1 * intended, std


@pytest.mark.parametrize("norm", ["assign_frac", "first_choice_frac", "assign_per_token"])
@pytest.mark.parametrize("layers", ["sum", "mean", "global"])
def test_aux_loss_layer_combination_against_numpy(norm, layers):
  cfg = _cfg(capacity_factor=0.0, n_layers=3, lb_loss_norm=norm, moe_aux_layers=layers, lb_loss_coef=0.01,
             z_loss_coef=0.001)
  model = Transformer(cfg, rngs=nnx.Rngs(1))
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 32)
  _, aux = jax.jit(lambda t: model(t, return_aux=True, return_routing=True))(tokens)
  e, k = cfg.n_experts, cfg.top_k
  f_L, p_L, lb_L, z_L = [], [], [], []
  for i in range(cfg.n_layers):
    rec = aux["routing"][f"layer{i}"]
    z = np.asarray(rec["router_logits"], np.float64).reshape(-1, e)
    ex = np.asarray(rec["experts"]).reshape(-1, k)
    n = z.shape[0]
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    chosen = ex[:, :1] if norm == "first_choice_frac" else ex
    f = np.bincount(chosen.reshape(-1), minlength=e) / (n * k if norm == "assign_frac" else n)
    f_L.append(f)
    p_L.append(probs.mean(0))
    lb_L.append(e * np.sum(f * probs.mean(0)))
    lse = np.log(np.exp(z).sum(-1))
    z_L.append(np.mean(lse ** 2))
    np.testing.assert_allclose(aux["metrics"][f"moe/layer{i}/lb_loss"], lb_L[-1], rtol=1e-5)
  if layers == "sum":
    lb, zl = np.sum(lb_L), np.sum(z_L)
  elif layers == "mean":
    lb, zl = np.mean(lb_L), np.mean(z_L)
  else:
    lb, zl = e * np.sum(np.mean(f_L, 0) * np.mean(p_L, 0)), np.mean(z_L)
  np.testing.assert_allclose(aux["aux_loss"], 0.01 * lb + 0.001 * zl, rtol=1e-5)
  np.testing.assert_allclose(aux["metrics"]["moe/lb_loss"], np.mean(lb_L), rtol=1e-5)  # the logged mean
