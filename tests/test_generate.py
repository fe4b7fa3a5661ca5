"""KV-cache generation against independent paths: cached decode logits vs the full forward pass on left-padded
prompts, greedy decoding vs argmax of the full forward re-run token by token (dense and MoE), top_k=1 vs
greedy, top-p / top-k sets and sampling log-probs vs NumPy, sampled frequencies vs softmax (chi-square), EOS."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from lmx.core.config import ConfigError
from lmx.models import generate as gen
from lmx.models.transformer import Transformer, TransformerConfig

PROMPTS = [[5, 9, 3], [7, 1, 2, 8, 4], [11, 12, 13, 14, 15, 16, 17, 18]]
N_NEW = 6
VOCAB = 32


@functools.lru_cache(maxsize=None)
def _model(moe: bool):
  kw = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
            init_std=0.2)
  if moe:
    kw.update(moe_every=1, n_experts=4, top_k=2, moe_d_ff=32)
  return Transformer(TransformerConfig.from_config(kw), rngs=nnx.Rngs(3))


@functools.lru_cache(maxsize=None)
def _forward(moe: bool):
  """The full (uncached) forward pass, jitted: log-probs [B, T, V] of a right-padded batch."""
  model = _model(moe)
  return jax.jit(lambda toks: jax.nn.log_softmax(model(toks), axis=-1))


def _full_logprobs(moe, seq, length=8 + N_NEW):
  """log p(next | seq[:i+1]) for every i, from the full forward pass on ``seq`` alone (right-padded to a fixed
  length so that one compilation serves every call: causal attention hides the padding)."""
  padded = jnp.asarray([list(seq) + [0] * (length - len(seq))], jnp.int32)
  return np.asarray(_forward(moe)(padded)[0, :len(seq)], np.float64)


def np_filter(logits, *, temperature, top_k=0, top_p=1.0):
  """Logits of the sampling distribution in NumPy: divide by temperature, keep the top_k largest, then the
  smallest set (in decreasing probability) whose mass reaches top_p; the rest -inf."""
  z = np.asarray(logits, np.float64) / temperature
  if top_k:
    z = np.where(z >= np.sort(z)[::-1][top_k - 1], z, -np.inf)
  if top_p < 1.0:
    order = np.argsort(-z, kind="stable")
    p = np.exp(z[order] - z[order[0]])
    p = p / p.sum()
    n_keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)  # first prefix whose mass >= top_p
    keep = np.zeros(z.shape, bool)
    keep[order[:n_keep]] = True
    z = np.where(keep, z, -np.inf)
  return z


def np_log_softmax(z):
  z = z - np.max(z)
  return z - np.log(np.sum(np.exp(z)))


@pytest.mark.parametrize("moe", [False, True])
def test_cache_decode_logits_equal_full_forward_on_left_padded_prompts(moe):
  model = _model(moe)
  prompt_BP, lens_B = gen.left_pad(PROMPTS)
  b, p = prompt_BP.shape
  pad_B = p - lens_B
  valid_BS = np.concatenate([np.arange(p)[None] >= pad_B[:, None], np.ones((b, 1), bool)], axis=1)
  positions_BP = np.maximum(np.arange(p)[None] - pad_B[:, None], 0)
  nxt_B = jnp.asarray([3, 30, 17], jnp.int32)
  graphdef, state = nnx.split(model)

  @jax.jit
  def prefill_then_step(state):
    m = nnx.merge(graphdef, state)
    kw = dict(kv_valid_BS=jnp.asarray(valid_BS))
    logits_BPV, cache = m.decode(jnp.asarray(prompt_BP), m.init_cache(b, p + 1), start=0,
                                 positions_BT=jnp.asarray(positions_BP), **kw)
    step_B1V, _ = m.decode(nxt_B[:, None], cache, start=p, positions_BT=jnp.asarray(lens_B)[:, None], **kw)
    return logits_BPV, step_B1V

  logits_BPV, step_B1V = prefill_then_step(state)
  for r, prompt in enumerate(PROMPTS):
    full = _full_logprobs(moe, prompt + [int(nxt_B[r])])
    cached = jax.nn.log_softmax(logits_BPV[r, pad_B[r]:], axis=-1)  # the row's real positions only
    np.testing.assert_allclose(cached, full[:-1], atol=2e-5, err_msg=f"prefill row {r}")
    np.testing.assert_allclose(jax.nn.log_softmax(step_B1V[r, 0]), full[-1], atol=2e-5, err_msg=f"step row {r}")


def _greedy_by_full_forward(moe, prompt, n):
  """Greedy continuation by re-running the full forward pass on the whole sequence for every new token."""
  seq, lps = list(prompt), []
  for _ in range(n):
    logp = _full_logprobs(moe, seq)[-1]
    seq.append(int(np.argmax(logp)))
    lps.append(logp[seq[-1]])
  return seq[len(prompt):], lps


@pytest.mark.parametrize("moe", [False, True])
def test_cached_greedy_equals_argmax_of_full_forward(moe):
  prompt_BP, lens_B = gen.left_pad(PROMPTS)
  out = gen.generate(_model(moe), prompt_BP, lens_B, jax.random.key(0), max_new_tokens=N_NEW, temperature=0.0)
  assert out["new_tokens"].shape == (3, N_NEW) and out["tokens"].shape == (3, 8 + N_NEW)
  assert bool(out["mask"].all()) and list(out["lengths"]) == [N_NEW] * 3
  for r, prompt in enumerate(PROMPTS):  # rows 0 and 1 are left-padded in the batch, not in the reference
    toks, lps = _greedy_by_full_forward(moe, prompt, N_NEW)
    assert list(np.asarray(out["new_tokens"][r])) == toks, f"row {r}"
    np.testing.assert_allclose(out["logprobs"][r], lps, atol=1e-4)
  np.testing.assert_array_equal(out["tokens"][:, 8:], out["new_tokens"])
  np.testing.assert_array_equal(out["sequence_mask"][:, :8], prompt_BP != 0)


def test_top_k_1_sampling_equals_greedy():
  prompt_BP, lens_B = gen.left_pad(PROMPTS)
  greedy = gen.generate(_model(False), prompt_BP, lens_B, jax.random.key(0), max_new_tokens=N_NEW,
                        temperature=0.0)
  for seed in (1, 2):
    top1 = gen.generate(_model(False), prompt_BP, lens_B, jax.random.key(seed), max_new_tokens=N_NEW,
                        temperature=1.0, top_k=1)
    np.testing.assert_array_equal(top1["new_tokens"], greedy["new_tokens"])
    np.testing.assert_allclose(top1["sample_logprobs"], 0.0, atol=1e-6)  # one token left: probability 1
    np.testing.assert_allclose(top1["logprobs"], greedy["logprobs"], atol=1e-6)


def test_sampled_logprobs_match_full_forward_and_numpy_filter():
  kw = dict(temperature=0.8, top_k=8, top_p=0.9)
  prompt_BP, lens_B = gen.left_pad(PROMPTS)
  out = gen.generate(_model(False), prompt_BP, lens_B, jax.random.key(7), max_new_tokens=N_NEW, **kw)
  for r, prompt in enumerate(PROMPTS):
    new = [int(t) for t in out["new_tokens"][r]]
    full = _full_logprobs(False, prompt + new)
    for i, tok in enumerate(new):
      logp_V = full[len(prompt) - 1 + i]  # log-probs of the model at the step that produced token i
      np.testing.assert_allclose(out["logprobs"][r, i], logp_V[tok], atol=1e-4)
      sample_logp_V = np_log_softmax(np_filter(logp_V, **kw))
      assert np.isfinite(sample_logp_V[tok]), f"row {r} step {i}: token {tok} is outside the top-k/top-p set"
      np.testing.assert_allclose(out["sample_logprobs"][r, i], sample_logp_V[tok], atol=1e-4)


# p = [0.05, 0.40, 0.25, 0.20, 0.10]: sorted 0.40, 0.25, 0.20, 0.10, 0.05, cumulative 0.40, 0.65, 0.85, 0.95, 1.
P5 = np.array([0.05, 0.40, 0.25, 0.20, 0.10])


@pytest.mark.parametrize("top_k,top_p,kept", [
    (0, 0.3, {1}),  # 0.40 >= 0.3 already
    (0, 0.6, {1, 2}),  # 0.40 < 0.6 <= 0.65
    (0, 0.7, {1, 2, 3}),  # 0.65 < 0.7 <= 0.85
    (0, 0.9, {1, 2, 3, 4}),  # 0.85 < 0.9 <= 0.95
    (0, 0.99, {0, 1, 2, 3, 4}),
    (2, 1.0, {1, 2}),
    (3, 1.0, {1, 2, 3}),
    (2, 0.6, {1}),  # after top-2 the mass is 0.40/0.65 = 0.615 >= 0.6
    (2, 0.7, {1, 2}),
])
def test_filter_keeps_exactly_the_smallest_set(top_k, top_p, kept):
  logits = jnp.log(jnp.asarray(P5, jnp.float32))[None] + 1.7  # a shift changes nothing
  for temperature in (1.0, 0.5) if top_p == 1.0 else (1.0,):  # the top-p sets above are at temperature 1
    z = np.asarray(gen.filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p))[0]
    assert set(np.flatnonzero(np.isfinite(z))) == kept
    np.testing.assert_allclose(z[sorted(kept)], np.asarray(logits)[0, sorted(kept)] / temperature, rtol=1e-6)
  keys = jax.random.split(jax.random.key(0), 64)
  toks, lps = jax.vmap(lambda k: gen.sample_logits(logits, k, top_k=top_k, top_p=top_p))(keys)
  toks, lps = np.asarray(toks)[:, 0], np.asarray(lps)[:, 0]
  assert set(toks) <= kept
  mass = P5[sorted(kept)].sum()
  np.testing.assert_allclose(lps, np.log(P5[toks] / mass), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 0, 1.0),
                                                     (1.0, 3, 1.0), (1.0, 0, 0.8)])
def test_sampled_frequencies_match_the_sampling_distribution(temperature, top_k, top_p):
  """20 000 draws; Pearson's chi-square against the NumPy sampling distribution stays below its 99.9% point
  (the draws are fixed by the keys, so this is deterministic; a wrong distribution lands far above)."""
  logits = np.array([1.0, -0.5, 0.3, 2.0, 0.0, -1.2, 0.8, 0.1])
  n = 20_000
  keys = jax.random.split(jax.random.key(1), n)
  draw = jax.jit(jax.vmap(lambda k: gen.sample_logits(jnp.asarray(logits, jnp.float32)[None], k,
                                                      temperature=temperature, top_k=top_k, top_p=top_p)[0][0]))
  counts = np.bincount(np.asarray(draw(keys)), minlength=len(logits))
  p = np.exp(np_log_softmax(np_filter(logits, temperature=temperature, top_k=top_k, top_p=top_p)))
  assert not counts[p == 0].any(), "sampled a filtered-out token"
  expected = n * p[p > 0]
  chi2 = np.sum((counts[p > 0] - expected) ** 2 / expected)
  assert chi2 < scipy.stats.chi2.ppf(0.999, df=(p > 0).sum() - 1), (counts, expected.round())


def test_greedy_sampling_is_argmax():
  logits = jnp.asarray([[0.1, 2.0, -1.0], [3.0, 2.9, 0.0]])
  tok, lp = gen.sample_logits(logits, jax.random.key(0), temperature=0.0)
  np.testing.assert_array_equal(tok, [1, 0])
  np.testing.assert_array_equal(lp, [0.0, 0.0])


def test_eos_masks_and_pads():
  model = _model(False)
  prompt_BP, lens_B = gen.left_pad(PROMPTS)
  free = gen.generate(model, prompt_BP, lens_B, jax.random.key(0), max_new_tokens=N_NEW, temperature=0.0)
  eos = int(free["new_tokens"][0, 2])
  out = gen.generate(model, prompt_BP, lens_B, jax.random.key(0), max_new_tokens=N_NEW, temperature=0.0,
                     eos_id=eos, pad_id=31)
  for b in range(3):
    row = list(np.asarray(free["new_tokens"][b]))
    n_b = row.index(eos) + 1 if eos in row else N_NEW
    assert int(out["lengths"][b]) == n_b
    np.testing.assert_array_equal(out["mask"][b], np.arange(N_NEW) < n_b)
    np.testing.assert_array_equal(out["new_tokens"][b, :n_b], row[:n_b])
    assert (np.asarray(out["new_tokens"][b, n_b:]) == 31).all()
    assert (np.asarray(out["logprobs"][b, n_b:]) == 0).all()


def test_bad_settings_raise():
  model = _model(False)
  prompt_BP, lens_B = gen.left_pad(PROMPTS[:2])
  with pytest.raises(ValueError, match="top_p"):
    gen.generate(model, prompt_BP, lens_B, jax.random.key(1), max_new_tokens=4, top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    gen.generate(model, prompt_BP, lens_B, jax.random.key(1), max_new_tokens=4, temperature=-1.0)
  with pytest.raises(ConfigError, match="model.max_seq_len=32"):
    gen.generate(model, prompt_BP, lens_B, jax.random.key(1), max_new_tokens=40)
  with pytest.raises(ValueError, match="at least one token"):
    gen.left_pad([[1], []])
