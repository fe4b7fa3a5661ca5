"""SPA's estimator loss, fused rewards and reward placement on hand-made episodes against hand-computed numbers;
the candidate policy's scoring against a numpy recomputation; the smoke config end to end through ``run``."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.methods.spa import policy, progress

# two hand-made episodes: 3 real steps and 2 real steps, padded to 4
C = np.array([[0.2, 0.3, 0.4, 9.0], [0.5, -0.1, 7.0, 7.0]], np.float32)
M = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
R = np.array([1.0, 0.0], np.float32)
VALID = np.array([[1, 0, 1, 1], [0, 1, 1, 1]], np.float32)


def test_estimator_loss_hand_computed():
  loss, m = progress.progress_estimator_loss(C, M, R, tol=0.2)
  # sums 0.9 and 0.4 (padding ignored); errors -0.1, 0.4 -> mse (0.01 + 0.16)/2 = 0.085
  np.testing.assert_allclose(float(loss), 0.085, rtol=1e-5)
  np.testing.assert_allclose(float(m["mae"]), 0.25, rtol=1e-5)
  np.testing.assert_allclose(float(m["acc"]), 0.5)  # |err| <= 0.2 for the first only
  loss2, _ = progress.progress_estimator_loss(C, M, R, l2=0.5)
  # l2 term: 0.5 * (0.04 + 0.09 + 0.16 + 0.25 + 0.01) / 5 = 0.055
  np.testing.assert_allclose(float(loss2), 0.085 + 0.055, rtol=1e-5)


def test_estimator_loss_gradient_matches_finite_differences():
  g = jax.grad(lambda c: progress.progress_estimator_loss(c, M, R)[0])(jnp.asarray(C))
  # d/dc_bk = 2/B * (sum_b - R_b) on real steps: episode 0: -0.1, episode 1: 0.4
  expect = np.array([[-0.1, -0.1, -0.1, 0.0], [0.4, 0.4, 0.0, 0.0]])
  np.testing.assert_allclose(np.asarray(g), expect, atol=1e-6)


def test_fused_reward_grounding_and_weighting():
  r = progress.fused_step_reward(C, VALID, M, alpha=1.0, beta=0.5)
  np.testing.assert_allclose(np.asarray(r), [[0.7, 0.3, 0.9, 0.0], [0.5, 0.4, 0.0, 0.0]], atol=1e-6)
  r = progress.fused_step_reward(C, VALID, M, alpha=2.0, beta=0.5, final_always=True)
  # ep1 last real step (k=1) is valid anyway; ep0 k=2 too: final_always changes nothing here; ep1 k=0 invalid
  np.testing.assert_allclose(np.asarray(r), [[0.9, 0.6, 1.3, 0.0], [1.0, 0.3, 0.0, 0.0]], atol=1e-6)
  v2 = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], np.float32)
  g = progress.grounding_bonus(v2, M, beta=0.5, final_always=True)
  np.testing.assert_allclose(np.asarray(g), [[0.5, 0.5, 0.5, 0], [0.5, 0.5, 0, 0]])
  w = progress.step_weights(M, "remaining")  # T - k - 1: [2, 1, 0] and [1, 0]
  np.testing.assert_allclose(np.asarray(w), [[2, 1, 0, 0], [1, 0, 0, 0]])
  r = progress.fused_step_reward(C, VALID, M, weighting="remaining")
  np.testing.assert_allclose(np.asarray(r), [[1.4, 0.3, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]], atol=1e-6)


def test_outcome_loo_and_placement():
  np.testing.assert_allclose(np.asarray(progress.outcome_step_reward(R, M)), [[0, 0, 1, 0], [0, 0, 0, 0]])
  # group of 2: R - other = [1, -1]; a group of 4 [1, 0, 0, 1]: 1 - 1/3, 0 - 2/3, ...
  np.testing.assert_allclose(np.asarray(progress.loo_overwrite(R, M, 2)), [[1, 1, 1, 0], [-1, -1, 0, 0]])
  r4 = np.array([1.0, 0.0, 0.0, 1.0])
  m4 = np.ones((4, 1))
  np.testing.assert_allclose(np.asarray(progress.loo_overwrite(r4, m4, 4))[:, 0], [2 / 3, -2 / 3, -2 / 3, 2 / 3],
                             rtol=1e-6)
  rew = np.array([[0.7, 0.3, 0.9, 5.0], [0.5, 0.4, 3.0, 3.0]], np.float32)
  end = np.array([[2, 5, 9, 0], [1, 1, 0, 0]])  # ep1's two steps end on the same token: they add
  tok = progress.place_step_rewards(rew, end, M, 10)
  expect = np.zeros((2, 10))
  expect[0, 2], expect[0, 5], expect[0, 9] = 0.7, 0.3, 0.9
  expect[1, 1] = 0.9
  np.testing.assert_allclose(np.asarray(tok), expect, atol=1e-6)


def test_heads_start_at_zero_and_logits_head_is_linear():
  h = progress.init_head(jax.random.key(0), "hidden", d_model=8, vocab_size=16, hidden=4)
  assert float(jnp.abs(progress.apply_head(h, "hidden", h_BKD=jnp.ones((2, 3, 8)))).max()) == 0.0
  lh = {"w": jnp.arange(16.0), "b": jnp.asarray(1.0)}
  x = np.random.default_rng(0).normal(size=(2, 3, 16))
  np.testing.assert_allclose(np.asarray(progress.apply_head(lh, "logits", logits_BKV=x)), x @ np.arange(16.0) + 1,
                             rtol=1e-5)
  with pytest.raises(ValueError, match="estimator head"):
    progress.init_head(jax.random.key(0), "mlp", d_model=8, vocab_size=16)


def test_candidates_and_step_arrays():
  rng = np.random.default_rng(0)
  adm = ["go east", "look", "open box", "take key"]
  cands = policy.candidates(adm, ["open box", "take tv from box"], k=6, rng=rng, must="open box")
  assert "open box" in cands and len(cands) == 6 and len(set(cands)) == 6
  assert "take tv from box" in cands or any(c in policy.MOVES and c not in adm for c in cands)
  prompt = policy.prompt_ids("Welcome to TextWorld! First, open the box.", "study", ["look"], vocab_size=64,
                             objective_len=10, history_len=4)
  assert prompt[-1] == policy.SEP and policy.BAR in prompt
  tok, cm, end, pe, val = policy.step_arrays(prompt, ["open box", "go"], k=3, length=20, cand_len=4,
                                             vocab_size=64)
  n = len(prompt)
  assert pe == n - 1 and list(val) == [True, True, False]
  assert end[0] == n + 2 and end[1] == n + 1 and cm[0].sum() == 3 and tok[0, end[0]] == policy.EOS


def test_candidate_scores_match_numpy():
  # a bigram "LM": logits at position t depend on token t only, so log-probs are checkable by hand in numpy
  V = 8
  table = np.random.default_rng(1).normal(size=(V, V)).astype(np.float32)

  def apply_fn(params, tokens, hidden_layers=None):
    logits = params[tokens]
    return logits, {"final": logits}

  tok = np.array([[[1, 2, 3, 4, 0], [1, 2, 5, 0, 0]]])
  cm = np.array([[[0, 0, 1, 1, 0], [0, 0, 1, 0, 0]]], np.float32)
  logits, _, _ = policy.candidate_scores(apply_fn, jnp.asarray(table), tok, cm, np.array([[True, True]]))
  lsm = table - np.log(np.exp(table).sum(-1, keepdims=True))
  expect = [lsm[2, 3] + lsm[3, 4], lsm[2, 5]]
  np.testing.assert_allclose(np.asarray(logits)[0], expect, rtol=1e-5)


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
  from lmx.core.config import load_config_file
  from lmx.methods.spa import run as spa_run_fn
  root = os.path.join(os.path.dirname(__file__), "..")
  cfg = load_config_file(os.path.join(root, "configs/spa.py:smoke"))
  wd = str(tmp_path_factory.mktemp("spa_smoke"))
  cfg.games.cache_dir = str(tmp_path_factory.getbasetemp() / "spa_games")
  return spa_run_fn(cfg, wd), wd


# The CI's run of the smoke config: about 23 s on one idle core (game generation, five compiles of the policy).
def test_smoke_end_to_end(smoke_results):
  res, wd = smoke_results
  assert set(res["arms"]) >= {"outcome", "spa"}
  for arm in res["arms"].values():
    assert 0.0 <= arm["success"]["mean"] <= 1.0 and 0.0 <= arm["grounding"]["mean"] <= 1.0
  assert os.path.exists(os.path.join(wd, "plots", "learning_curves.png"))
  with open(os.path.join(wd, "results.json")) as f:
    assert json.load(f)["method"] == "spa"


def _paper_config(small: bool):
  from lmx.core.config import load_config_file
  root = os.path.join(os.path.dirname(__file__), "..")
  cfg = load_config_file(os.path.join(root, "configs/spa.py:paper"))
  if small:
    cfg.model.update(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=64,
                     remat="none", attention_impl="xla", dtype="float32", param_dtype="float32")
    cfg.paper.update(seq_len=64, batch=2)
  return cfg


def _lower(cfg):
  from lmx.methods.spa import paper
  from lmx.models.registry import build_model
  low_e, low_p = paper.lower_for(cfg, build_model(cfg.model), ("cuda",))
  for low in (low_e, low_p):
    assert "stablehlo" in low.as_text()[:20000] or "func.func" in low.as_text()[:20000]


@pytest.mark.slow
def test_paper_steps_lower_for_cuda():
  _lower(_paper_config(small=False))


@pytest.mark.slow
def test_paper_steps_lower_for_cuda_small():
  _lower(_paper_config(small=True))
