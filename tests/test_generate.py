"""KV-cache generation: cached greedy decoding equals uncached decoding token for token (dense and MoE),
different prompt lengths, EOS handling, and the sampling filters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmx.core.config import ConfigError
from lmx.models import generate as gen
from lmx.models.transformer import Transformer, TransformerConfig

PROMPTS = [[5, 9, 3], [7, 1, 2, 8, 4], [11, 12, 13, 14, 15, 16, 17, 18]]
N_NEW = 6


def _model(moe: bool):
  kw = dict(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
            init_std=0.2)
  if moe:
    kw.update(moe_every=1, n_experts=4, top_k=2, moe_d_ff=32)
  return Transformer(TransformerConfig.from_config(kw), rngs=nnx.Rngs(3))


def _uncached_greedy(fwd, length, prompt, n):
  """Re-runs the full model on the whole sequence for every new token (right-padded to a fixed length:
  causal attention makes the padding invisible to earlier positions)."""
  seq = list(prompt)
  lps = []
  for _ in range(n):
    padded = jnp.asarray([seq + [0] * (length - len(seq))], jnp.int32)
    logp = fwd(padded)[0, len(seq) - 1]
    tok = int(jnp.argmax(logp))
    lps.append(float(logp[tok]))
    seq.append(tok)
  return seq[len(prompt):], lps


@pytest.mark.parametrize("moe", [False, True])
def test_cached_greedy_equals_uncached(moe):
  model = _model(moe)
  prompt_BP, lens_B = gen.left_pad(PROMPTS)
  out = gen.generate(model, prompt_BP, lens_B, jax.random.key(0), max_new_tokens=N_NEW, temperature=0.0)
  assert out["new_tokens"].shape == (3, N_NEW) and out["tokens"].shape == (3, 8 + N_NEW)
  assert bool(out["mask"].all()) and list(out["lengths"]) == [N_NEW] * 3
  fwd = jax.jit(lambda toks: jax.nn.log_softmax(model(toks), axis=-1))
  for b, prompt in enumerate(PROMPTS):  # no padding here: also shows left padding does not change results
    toks, lps = _uncached_greedy(fwd, 8 + N_NEW, prompt, N_NEW)
    assert list(np.asarray(out["new_tokens"][b])) == toks, f"row {b}"
    np.testing.assert_allclose(out["logprobs"][b], lps, atol=1e-4)
  np.testing.assert_array_equal(out["sequence_mask"][:, :8], prompt_BP != 0)


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


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.6, 0.3, 0.1, 1e-9]]))
  keys = jax.random.split(jax.random.key(0), 200)
  assert set(np.asarray(jax.vmap(lambda k: gen.sample_logits(logits, k, top_k=2)[0][0])(keys))) <= {0, 1}
  assert set(np.asarray(jax.vmap(lambda k: gen.sample_logits(logits, k, top_p=0.5)[0][0])(keys))) == {0}
  assert set(np.asarray(jax.vmap(lambda k: gen.sample_logits(logits, k, top_p=0.8)[0][0])(keys))) == {0, 1}
  tok, lp = gen.sample_logits(logits, keys[0], top_k=2)
  expected = np.log([0.6 / 0.9, 0.3 / 0.9])[int(tok[0])]
  np.testing.assert_allclose(lp[0], expected, rtol=1e-5)
  tok, lp = gen.sample_logits(logits, keys[0], temperature=0.0)
  assert int(tok[0]) == 0 and float(lp[0]) == 0.0


def test_temperature_sampling_runs_and_validates():
  model = _model(False)
  prompt_BP, lens_B = gen.left_pad(PROMPTS[:2])
  out = gen.generate(model, prompt_BP, lens_B, jax.random.key(1), max_new_tokens=4, temperature=0.8, top_k=8,
                     top_p=0.9)
  assert out["new_tokens"].shape == (2, 4)
  assert bool((out["sample_logprobs"] <= 0).all()) and bool((out["logprobs"] <= 0).all())
  with pytest.raises(ValueError, match="top_p"):
    gen.generate(model, prompt_BP, lens_B, jax.random.key(1), max_new_tokens=4, top_p=0.0)
  with pytest.raises(ConfigError, match="model.max_seq_len=32"):
    gen.generate(model, prompt_BP, lens_B, jax.random.key(1), max_new_tokens=40)
  with pytest.raises(ValueError, match="at least one token"):
    gen.left_pad([[1], []])
