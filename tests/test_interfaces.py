"""Interfaces later methods call, against independent computations: hidden states of chosen layers (the final norm
and the unembedding redone in NumPy from the params), ``logits_from_hidden``, MoE routing records (top-k, gates,
capacity kept mask vs a sequential NumPy reference and the drop metric), and generation with per-row temperature,
stop tokens and continuation from the cache (each vs greedy argmax of the full forward re-run token by token)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmx.models import generate as gen
from lmx.models.registry import build_model
from lmx.models.transformer import Transformer, TransformerConfig

VOCAB = 32
BASE = dict(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=48,
            init_std=0.2)
MOE = dict(moe_every=1, n_experts=4, top_k=2, moe_d_ff=32)
PROMPTS = [[5, 9, 3], [7, 1, 2, 8, 4], [11, 12, 13, 14, 15, 16, 17, 18]]
N_NEW = 6


def _np_rmsnorm(x, scale, eps):
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(scale, np.float64)


def _tokens(b=2, t=10, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, VOCAB)


# ---------------------------------------------------------------------------------------------------------------
# Hidden states and logits_from_hidden.


@pytest.mark.parametrize("tied", [False, True])
def test_hidden_layers_final_state_times_unembedding_equals_logits(tied):
  m = build_model(dict(BASE, tie_embeddings=tied))
  params = m.init(jax.random.key(1))
  tokens = _tokens()
  logits, hiddens = jax.jit(lambda p, t: m.apply(p, t, hidden_layers=(0, -1)))(params, tokens)
  assert set(hiddens) == {"block0", "block2", "final"}
  # The residual streams are those of return_hidden (embeddings first, then after each block).
  _, hidden_LBTD = jax.jit(lambda p, t: m.apply(p, t, return_hidden=True))(params, tokens)
  np.testing.assert_array_equal(hiddens["block0"], hidden_LBTD[1])
  np.testing.assert_array_equal(hiddens["block2"], hidden_LBTD[3])
  # The final norm and the unembedding by hand from the params.
  final = _np_rmsnorm(hiddens["block2"], params["final_norm"]["scale"], m.cfg.norm_eps)
  np.testing.assert_allclose(hiddens["final"], final, rtol=1e-5, atol=1e-5)
  w_DV = np.asarray(params["embed"]).T if tied else np.asarray(params["unembed"])
  np.testing.assert_allclose(logits, np.asarray(hiddens["final"], np.float64) @ w_DV, rtol=1e-4, atol=1e-4)
  # Asking for hidden states leaves the logits unchanged.
  np.testing.assert_array_equal(logits, jax.jit(m.apply)(params, tokens))


def test_hidden_layers_out_of_range_is_an_error():
  m = build_model(BASE)
  with pytest.raises(ValueError, match="hidden_layers"):
    m.apply(m.init(jax.random.key(0)), _tokens(), hidden_layers=(3,))


@pytest.mark.parametrize("tied", [False, True])
def test_logits_from_hidden_matches_forward_and_numpy(tied):
  m = build_model(dict(BASE, tie_embeddings=tied))
  params = m.init(jax.random.key(2))
  tokens = _tokens()
  logits, hiddens = m.apply(params, tokens, hidden_layers=())
  assert set(hiddens) == {"final"}
  np.testing.assert_array_equal(m.logits_from_hidden(params, hiddens["final"]), logits)
  h = np.asarray(jax.random.normal(jax.random.key(3), (2, 5, BASE["d_model"])))
  w_DV = np.asarray(params["embed"]).T if tied else np.asarray(params["unembed"])
  np.testing.assert_allclose(m.logits_from_hidden(params, jnp.asarray(h)), h @ w_DV, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Routing records.


def _np_capacity_kept(experts_BTK, n_experts, cap):
  """Sequential reference: per row, choices in (position, rank) order; kept while the expert has < cap before."""
  b, t, k = experts_BTK.shape
  kept = np.zeros((b, t, k), bool)
  for r in range(b):
    count = np.zeros(n_experts, int)
    for i in range(t):
      for j in range(k):
        e = experts_BTK[r, i, j]
        kept[r, i, j] = count[e] < cap
        count[e] += 1
  return kept


@pytest.mark.parametrize("router_softmax,norm_topk,capacity_factor", [
    ("before", False, 0.0), ("before", True, 0.0), ("after", False, 0.0), ("before", True, 1.0),
    ("before", False, 0.5)])
def test_routing_records_against_numpy(router_softmax, norm_topk, capacity_factor):
  cfg = dict(BASE, **MOE, router_softmax=router_softmax, norm_topk_prob=norm_topk, capacity_factor=capacity_factor)
  m = build_model(cfg)
  params = m.init(jax.random.key(4))
  tokens = _tokens(b=3, t=12)
  _, aux = jax.jit(lambda p, t: m.apply(p, t, return_aux=True, return_routing=True))(params, tokens)
  assert "routing" not in m.apply(params, tokens, return_aux=True)[1]  # off by default
  k, e = MOE["top_k"], MOE["n_experts"]
  assert set(aux["routing"]) == {f"layer{i}" for i in range(BASE["n_layers"])}
  for name, rec in aux["routing"].items():
    z = np.asarray(rec["router_logits"], np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(rec["probs"], p, rtol=1e-5, atol=1e-6)
    experts = np.asarray(rec["experts"])
    np.testing.assert_array_equal(experts, np.argsort(-z, axis=-1, kind="stable")[..., :k], err_msg=name)
    gates = np.asarray(rec["gates"], np.float64)
    if router_softmax == "after":  # softmax over the chosen logits
      zk = np.take_along_axis(z, experts, -1)
      ref = np.exp(zk - zk.max(-1, keepdims=True))
      ref /= ref.sum(-1, keepdims=True)
    else:
      ref = np.take_along_axis(p, experts, -1)
      if norm_topk:
        ref /= ref.sum(-1, keepdims=True)
    np.testing.assert_allclose(gates, ref, rtol=1e-5, atol=1e-6)
    if router_softmax == "after" or norm_topk:
      np.testing.assert_allclose(gates.sum(-1), 1.0, atol=1e-5)
    else:
      assert np.all(gates.sum(-1) < 1.0)  # the top-k share of a softmax over more than k experts
    kept = np.asarray(rec["kept"])
    if capacity_factor == 0:
      assert kept.all()
    else:
      cap = int(np.ceil(capacity_factor * tokens.shape[1] * k / e))
      np.testing.assert_array_equal(kept, _np_capacity_kept(experts, e, cap), err_msg=name)
      np.testing.assert_allclose(1.0 - kept.mean(), aux["metrics"][f"moe/{name}/dropped_frac"], atol=1e-6)
  if capacity_factor == 0.5:
    assert float(aux["metrics"]["moe/dropped_frac"]) > 0  # the comparison covers drops


# ---------------------------------------------------------------------------------------------------------------
# Generation.


@functools.lru_cache(maxsize=None)
def _model(kind: str):
  kw = dict(BASE, n_layers=2)
  if kind == "capacity":
    kw.update(MOE, capacity_factor=1.0)
  return Transformer(TransformerConfig.from_config(kw), rngs=nnx.Rngs(3))


def _greedy_by_full_forward(model, seq, n, length):
  """Greedy continuation of ``seq`` by argmax of the full forward re-run on the growing sequence (right-padded to
  ``length``, which causal attention and causal capacity hide)."""
  fwd = _jit_forward(model)
  seq = list(seq)
  for _ in range(n):
    logits = fwd(jnp.asarray([seq + [0] * (length - len(seq))], jnp.int32))
    seq.append(int(np.argmax(logits[0, len(seq) - 1])))
  return seq[-n:]


@functools.lru_cache(maxsize=None)
def _jit_forward(model):
  return jax.jit(model)


def test_per_row_temperature_zero_rows_are_greedy():
  model = _model("dense")
  prompt_BP, lens_B = gen.left_pad(PROMPTS)
  temp_B = np.array([0.0, 1.5, 0.0], np.float32)
  out = gen.generate(model, prompt_BP, lens_B, jax.random.key(0), temperature_B=temp_B, max_new_tokens=N_NEW)
  length = prompt_BP.shape[1] + N_NEW
  for r in (0, 2):
    ref = _greedy_by_full_forward(model, PROMPTS[r], N_NEW, length)
    assert list(np.asarray(out["new_tokens"][r])) == ref, f"row {r}"
    np.testing.assert_array_equal(out["sample_logprobs"][r], 0.0)
  # The sampled row's sample log-probs are those of the model's distribution at its temperature.
  seq = list(PROMPTS[1]) + list(np.asarray(out["new_tokens"][1]))
  logits = np.asarray(_jit_forward(model)(jnp.asarray([seq + [0] * (length - len(seq))], jnp.int32))[0], np.float64)
  z = logits[len(PROMPTS[1]) - 1:len(seq) - 1] / 1.5
  ref_lp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
  np.testing.assert_allclose(out["sample_logprobs"][1], ref_lp[np.arange(N_NEW), seq[len(PROMPTS[1]):]], atol=1e-4)
  with pytest.raises(ValueError, match="temperature_B"):
    gen.generate(model, prompt_BP, lens_B, jax.random.key(0), temperature_B=temp_B[:2], max_new_tokens=N_NEW)


def test_stop_tokens_truncate_where_the_stop_appears_in_greedy_output():
  model = _model("dense")
  prompt_BP, lens_B = gen.left_pad(PROMPTS)
  length = prompt_BP.shape[1] + N_NEW
  greedy = [_greedy_by_full_forward(model, p, N_NEW, length) for p in PROMPTS]
  # Stop tokens whose first occurrence is mid-sequence in rows 0 and 1 (greedy output may repeat tokens).
  firsts = [next(i for i in range(1, N_NEW) if g[i] not in g[:i]) for g in greedy[:2]]
  stops = (greedy[0][firsts[0]], greedy[1][firsts[1]])
  out = gen.generate(model, prompt_BP, lens_B, jax.random.key(0), temperature=0.0, max_new_tokens=N_NEW,
                     stop_ids=stops, pad_id=31)
  for r, g in enumerate(greedy):
    hits = [i for i, tok in enumerate(g) if tok in stops]
    n_r = hits[0] + 1 if hits else N_NEW
    assert int(out["lengths"][r]) == n_r, f"row {r}"
    assert bool(out["done"][r]) == bool(hits), f"row {r}"
    assert list(np.asarray(out["new_tokens"][r])) == g[:n_r] + [31] * (N_NEW - n_r), f"row {r}"
    np.testing.assert_array_equal(out["mask"][r], np.arange(N_NEW) < n_r)
  assert 1 < int(out["lengths"][0]) < N_NEW or 1 < int(out["lengths"][1]) < N_NEW  # a stop mid-sequence


@pytest.mark.parametrize("kind", ["dense", "capacity"])
def test_continuation_from_cache_equals_generating_from_scratch(kind):
  model = _model(kind)
  cache_len = 40
  p1, l1 = gen.left_pad(PROMPTS)
  first = gen.generate(model, p1, l1, jax.random.key(0), temperature=0.0, max_new_tokens=N_NEW, cache_len=cache_len,
                       return_state=True)
  # Make one row stop early so that the continuation must skip that row's padding after its stop.
  stop = int(first["new_tokens"][1][1])
  first = gen.generate(model, p1, l1, jax.random.key(0), temperature=0.0, max_new_tokens=N_NEW, cache_len=cache_len,
                       return_state=True, stop_ids=(stop,))
  assert int(first["lengths"][1]) <= 2
  turn2 = [[3, 4], [20, 21, 22, 23], [9]]
  p2, l2 = gen.left_pad(turn2)
  second = gen.continue_generate(model, first["state"], p2, l2, jax.random.key(1), temperature=0.0,
                                 max_new_tokens=N_NEW, return_state=True)
  turn3 = [[6], [2, 2], [30, 1, 5]]
  p3, l3 = gen.left_pad(turn3)
  third = gen.continue_generate(model, second["state"], p3, l3, jax.random.key(2), temperature=0.0,
                                max_new_tokens=N_NEW)
  for r in range(len(PROMPTS)):
    gen1 = list(np.asarray(first["new_tokens"][r][:int(first["lengths"][r])]))
    seq = PROMPTS[r] + gen1 + turn2[r]
    ref2 = _greedy_by_full_forward(model, seq, N_NEW, cache_len)
    assert list(np.asarray(second["new_tokens"][r])) == ref2, f"row {r}"
    ref3 = _greedy_by_full_forward(model, seq + ref2 + turn3[r], N_NEW, cache_len)
    assert list(np.asarray(third["new_tokens"][r])) == ref3, f"row {r}"
    # Log-probs of the continuation equal those of the full forward pass.
    full = seq + ref2
    logits = np.asarray(_jit_forward(model)(jnp.asarray([full + [0] * (cache_len - len(full))], jnp.int32))[0])
    lp = jax.nn.log_softmax(logits[len(seq) - 1:len(full) - 1], axis=-1)
    np.testing.assert_allclose(second["logprobs"][r], lp[np.arange(N_NEW), ref2], atol=1e-4, err_msg=f"row {r}")
  with pytest.raises(ValueError, match="cache slots"):
    gen.continue_generate(model, first["state"], p2, l2, jax.random.key(1), max_new_tokens=cache_len)
