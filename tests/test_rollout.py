"""Language-policy rollouts (lmx.rl.rollout) against independent references: the batch of one cached generation
re-scored by the full forward on each row alone in NumPy; multi-turn packing against hand-written arrays; the
PPO + KL + entropy loss against a NumPy computation from the model's logits; a reference refresh that does not
recompile; and GRPO on a tiny LM that learns a rewarded token."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from lmx.core import loop
from lmx.models.generate import left_pad
from lmx.models.registry import build_model
from lmx.rl import rollout
from lmx.rl.advantages import grpo_advantages

VOCAB = 16


@functools.lru_cache(maxsize=None)
def _model():
  cfg = ml_collections.ConfigDict(dict(name="transformer", vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2,
                                       n_kv_heads=1, d_ff=64, max_seq_len=32, init_std=0.3))
  m = build_model(cfg)
  return m, jax.jit(m.init)(jax.random.key(0))


def _np_logsoftmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@functools.lru_cache(maxsize=None)
def _fwd():
  m, _ = _model()
  return jax.jit(lambda p, t: m.apply(p, t))


def _row_logits(params, ids):
  """Logits of ``ids`` alone, no segment ids, no positions: the reference path (right-padded to one length so
  one compilation serves every row; causal attention keeps the padding out of the real positions)."""
  padded = jnp.asarray([list(ids) + [0] * (16 - len(ids))], jnp.int32)
  return np.asarray(_fwd()(params, padded)[0, :len(ids)], np.float64)


def _generation():
  m, params = _model()
  prompts = [[3, 4, 5], [7, 8], [9, 10, 11, 12]]
  prompt_BP, lens_B = left_pad(prompts)
  sample = rollout.sampler(m, max_new_tokens=5, temperature=1.0, eos_id=1)
  return m, params, prompts, prompt_BP, sample(params, prompt_BP, lens_B, jax.random.key(1))


def test_completion_batch_matches_each_row_scored_alone():
  m, params, prompts, prompt_BP, out = _generation()
  batch = rollout.completion_batch(out, advantages_B=jnp.asarray([1.0, -2.0, 0.5]))
  P = prompt_BP.shape[1]
  new = np.asarray(out["new_tokens"])
  mask = np.asarray(out["mask"])
  rescored = np.asarray(jax.jit(functools.partial(rollout.score, m.apply))(params, batch))
  for b, pr in enumerate(prompts):
    n = int(mask[b].sum())
    ids = list(pr) + list(new[b, :n])
    lp = _np_logsoftmax(_row_logits(params, ids))
    want = np.array([lp[len(pr) - 1 + i, new[b, i]] for i in range(n)])  # position of new token i predicts it
    np.testing.assert_allclose(np.asarray(batch["old_logp_BT"])[b, P:P + n], want, atol=2e-5)
    np.testing.assert_allclose(rescored[b, P:P + n], want, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(batch["loss_mask_BT"])[b], [0] * P + [1] * n + [0] * (5 - n))
    np.testing.assert_allclose(np.asarray(batch["advantages_BT"])[b, P:P + n], [[1.0, -2.0, 0.5][b]] * n)
    assert np.asarray(batch["advantages_BT"])[b, :P].sum() == 0
  # Left padding: real tokens have positions 0, 1, ...
  np.testing.assert_array_equal(np.asarray(batch["positions_BT"])[1, :4], [0, 0, 0, 1])


def test_turns_batch_by_hand():
  eps = [[([2, 3], [4]), ([5], [6, 7], [-0.5, -0.25])],
         [([8], [9, 10])]]
  b = rollout.turns_batch(eps, length=8, prefix_ids=[[1], [1, 1]])
  np.testing.assert_array_equal(b["tokens_BT"], [[1, 2, 3, 4, 5, 6, 7, 0], [1, 1, 8, 9, 10, 0, 0, 0]])
  np.testing.assert_array_equal(b["segment_ids_BT"], [[1] * 7 + [0], [1] * 5 + [0] * 3])
  np.testing.assert_array_equal(b["loss_mask_BT"], [[0, 0, 0, 1, 0, 1, 1, 0], [0, 0, 0, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(b["step_ids_BT"], [[-1, -1, -1, 0, -1, 1, 1, -1], [-1, -1, -1, 0, 0, -1, -1, -1]])
  np.testing.assert_array_equal(b["step_end_BK"], [[3, 6], [4, 0]])
  np.testing.assert_array_equal(b["step_mask_BK"], [[1, 1], [1, 0]])
  np.testing.assert_allclose(b["old_logp_BT"][0], [0, 0, 0, 0, 0, -0.5, -0.25, 0])
  np.testing.assert_array_equal(b["positions_BT"][1], [0, 1, 2, 3, 4, 4, 4, 4])
  adv = rollout.per_step_to_tokens(jnp.asarray([[2.0, -1.0], [3.0, 0.0]]), b["step_ids_BT"])
  np.testing.assert_allclose(adv, [[0, 0, 0, 2, 0, -1, -1, 0], [0, 0, 0, 3, 3, 0, 0, 0]])
  with pytest.raises(ValueError, match="more than length"):
    rollout.turns_batch(eps, length=6, prefix_ids=[[1], [1, 1]])
  with pytest.raises(ValueError, match="an action starts a row"):
    rollout.turns_batch([[([], [4])]], length=4)
  with pytest.raises(ValueError, match="2 log-probs for 1"):
    rollout.turns_batch([[([2], [4], [0.1, 0.2])]], length=4)


def test_policy_loss_matches_numpy():
  m, params = _model()
  leaves, tree = jax.tree.flatten(params)  # a reference near the policy, as after a few updates
  keys = jax.random.split(jax.random.key(7), len(leaves))
  ref = jax.tree.unflatten(tree, [w + 0.01 * jax.random.normal(k, w.shape, w.dtype) for w, k in zip(leaves, keys)])
  eps = [[([2, 3], [4, 5]), ([6], [7])], [([8, 9, 10], [11, 12, 13])]]
  batch = {k: jnp.asarray(v) for k, v in rollout.turns_batch(eps, length=9).items()}
  rng = np.random.default_rng(0)
  batch["old_logp_BT"] = jnp.asarray(rng.normal(-2.5, 0.3, (2, 9)).astype(np.float32)) * batch["loss_mask_BT"]
  batch["advantages_BT"] = rollout.per_step_to_tokens(jnp.asarray([[1.5, -0.7], [-2.0, 0.0]]),
                                                       batch["step_ids_BT"])
  fn = rollout.policy_loss_fn(m.apply, clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.1,
                              kl_kind="k3", entropy_coef=0.01, agg="seq-mean-token-mean")
  loss, metrics = jax.jit(fn)(params, {"ref_params": ref}, batch, None)

  def np_logp_ent(p):
    lp, en = np.zeros((2, 9)), np.zeros((2, 9))
    for b in range(2):
      n = int(batch["segment_ids_BT"][b].sum())
      ids = [int(t) for t in batch["tokens_BT"][b, :n]]
      ls = _np_logsoftmax(_row_logits(p, ids))
      for t in range(1, n):
        lp[b, t] = ls[t - 1, ids[t]]
        en[b, t] = -(np.exp(ls[t - 1]) * ls[t - 1]).sum()
    return lp, en

  lp, en = np_logp_ent(params)
  rlp, _ = np_logp_ent(ref)
  mask = np.asarray(batch["loss_mask_BT"], bool)
  adv, old = np.asarray(batch["advantages_BT"]), np.asarray(batch["old_logp_BT"])
  r = np.exp(lp - old)
  lc = np.maximum(-adv * r, -adv * np.clip(r, 0.8, 1.28))
  pg_tok = np.where(adv < 0, np.minimum(lc, -3.0 * adv), lc)
  x = lp - rlp
  kl_tok = np.clip(np.exp(-x) + x - 1, -10, 10)  # k3, clamped as documented
  assert 0 < np.abs(x[mask]).max() < 2  # the clamp is not what the comparison rests on

  def seq_mean(v):
    return np.mean([v[b][mask[b]].mean() for b in range(2)])

  want = seq_mean(pg_tok) + 0.1 * seq_mean(kl_tok) - 0.01 * seq_mean(en)
  np.testing.assert_allclose(float(loss), want, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["kl_ref"]), seq_mean(kl_tok), rtol=1e-4)
  np.testing.assert_allclose(float(metrics["entropy"]), seq_mean(en), rtol=1e-4)
  with pytest.raises(ValueError, match="needs frozen"):
    fn(params, None, batch, None)


def test_grpo_learns_a_rewarded_token_and_ref_refresh_does_not_recompile():
  """GRPO (group advantages, seq-mean-token-mean, k3 KL to a frozen reference) on a tiny LM: the reward is the
  fraction of token 5 in a 4-token completion. The mean reward must rise from its start (about 1/16: the
  initial policy is near uniform) to above 0.8; refreshing the reference reuses the compiled step."""
  m, params = _model()
  G, prompts = 8, [[2, 3]] * 2
  prompt_BP, lens_B = left_pad([p for p in prompts for _ in range(G)])
  sample = rollout.sampler(m, max_new_tokens=4, temperature=1.0)
  tx = optax.adam(3e-2)
  step = jax.jit(loop.optax_step(rollout.policy_loss_fn(m.apply, kl_coef=0.01, agg="seq-mean-token-mean"), tx))
  state = {**loop.optax_state(params, tx), "step": jnp.int32(0)}
  frozen = {"ref_params": params}
  rewards = []
  for it in range(8):
    out = sample(state["params"], prompt_BP, lens_B, jax.random.key(100 + it))
    r_B = (np.asarray(out["new_tokens"]) == 5).mean(axis=1)
    rewards.append(r_B.mean())
    batch = rollout.completion_batch(out, advantages_B=grpo_advantages(jnp.asarray(r_B), G))
    for _ in range(2):
      state, _ = step(state, frozen, batch, jax.random.key(0))
    if it == 4:
      frozen = {"ref_params": jax.tree.map(jnp.copy, state["params"])}
  assert step._cache_size() == 1
  assert rewards[0] < 0.3 and np.mean(rewards[-2:]) > 0.8, rewards
