"""SPA's estimator loss, fused rewards and reward placement on hand-made episodes against hand-computed numbers;
the candidate policy's scoring against a numpy recomputation; the RL buffer and advantages against numpy; the
smoke config end to end through the launcher, interrupted and resumed (after the first checkpoint and inside an RL
arm), and stopped by a NaN in SFT and in an RL update."""
import importlib
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests import config_check
from tests import resume_check as rc

from lmx.methods.spa import policy, progress

spa_run = importlib.import_module("lmx.methods.spa.driver")  # the package exports run(), the function

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


SMOKE = "configs/spa.py:smoke"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """One uninterrupted run of the smoke config through the launcher (the reference of the resume tests), with
  the games shared by every smoke run of this module."""
  base = tmp_path_factory.mktemp("spa")
  overrides = (f"--config.games.cache_dir={base / 'games'}",)
  ref = base / "reference"
  r = rc.run(SMOKE, ref, *overrides)
  assert r.returncode == 0, rc.fail(r, "smoke run")
  yield ref, overrides, r


def test_smoke_end_to_end(smoke):
  ref, _, r = smoke
  rc.check_layout(ref)
  res = rc.results(ref)
  assert res["method"] == "spa" and set(res["arms"]) == {"sft", "outcome", "grounding", "spa", "rloo"}
  for arm in res["arms"].values():
    assert 0.0 <= arm["success"]["mean"] <= 1.0 and 0.0 <= arm["grounding"]["mean"] <= 1.0
    assert arm["success"]["n"] == 1
  s0 = res["per_seed"]["0"]
  # the SPA arm spends its exploration steps and still makes >= 1 update with the estimator's rewards
  assert s0["spa"]["iterations"] >= 1
  assert s0["spa"]["env_steps"] > res["estimator"]["0"]["explore_env_steps"]
  for arm in ("outcome", "grounding", "spa", "rloo"):
    assert s0[arm]["env_steps"] >= 24 and s0[arm]["curve"][0][0] == 0
    assert [p[0] for p in s0[arm]["curve"]] == sorted(p[0] for p in s0[arm]["curve"])
  assert os.path.isfile(os.path.join(ref, "plots", "learning_curves.png"))
  with open(os.path.join(ref, "samples.json")) as f:
    assert set(json.load(f)) == set(res["arms"])
  assert "Traceback" not in r.stderr and "{'" not in r.stdout  # console lines, not raw dicts


def test_sigterm_after_the_first_checkpoint_resumes_to_the_same_results(smoke, tmp_path):
  ref, overrides, _ = smoke
  rc.check_sigterm_resume(tmp_path, SMOKE, *overrides, reference=ref)


@pytest.mark.slow
def test_sigterm_inside_an_rl_arm_resumes_to_the_same_results(smoke, tmp_path):
  """SIGTERM right after the first checkpoint of the ``outcome`` arm (saves 1-4: SFT, 5-7: estimator, 8: outcome
  after its first iteration): the rerun restores its env-step count, its learning-curve points and the data."""
  ref, overrides, _ = smoke
  work = tmp_path / "interrupted"
  r = rc.run(SMOKE, work, *overrides, LMX_FAULT="sigterm_after_save:8")
  assert r.returncode == 143, rc.fail(r, "run with SIGTERM inside the outcome arm")
  assert "at step 1/" in r.stderr and "outcome/s0" in r.stderr, rc.fail(r, "the stop message")
  assert not os.path.exists(work / "stages" / "outcome" / "s0" / "stage.json")
  r = rc.run(SMOKE, work, *overrides)
  assert r.returncode == 0, rc.fail(r, "resumed run")
  assert rc.without_timing(rc.results(work)) == rc.without_timing(rc.results(ref))


def test_nan_in_sft_stops_with_one_line(smoke, tmp_path):
  rc.check_nan_stops(tmp_path, SMOKE, "sft/s0", 2, *smoke[1])


def test_nan_in_an_rl_update_stops_with_one_line(smoke, tmp_path):
  rc.check_nan_stops(tmp_path, SMOKE, "outcome/s0", 1, *smoke[1])


def test_validate_wants_a_budget_beyond_exploration():
  from lmx.core.config import ConfigError, load_config_file

  cfg = load_config_file(os.path.join(os.path.dirname(__file__), "..", SMOKE))
  spa_run.validate(cfg)
  cfg.rl.env_steps = 16  # 2 games × 2 rollouts × 4 steps: exploration may spend all of it
  with pytest.raises(ConfigError, match="rl.env_steps"):
    spa_run.validate(cfg)
  cfg.explore.count_steps = False
  spa_run.validate(cfg)



def test_schema_errors_name_the_field_and_safe_fields():
  """A typo'd field, an out-of-range value and an unknown choice each give a one-line ConfigError naming the
  field; a resume may change the games' cache directory only."""
  from lmx.core import schema

  for field, value, match in [
      ("games.n_trian", 4, r"games: unknown field\(s\) \['n_trian'\]"),
      ("rl.env_steps", 0, r"rl.env_steps: must be a whole number and >= 1, got 0"),
      ("shapes.k", 1, r"shapes.k: must be a whole number and >= 2, got 1"),
      ("rl.gamma", 1.5, r"rl.gamma: must be >= 0 and <= 1, got 1.5"),
      ("arms", ("sft", "ppo"), r"arms\[1\]: 'ppo' is not one of"),
      ("estimator.head", "mlp", "estimator.head: 'mlp' is not one of"),
      ("sft.optim.name", "lion", "sft.optim.name: 'lion' is not one of"),
  ]:
    config_check.refuses(spa_run.validate, config_check.config("spa", "smoke"), field, value, match)
  assert set(schema.safe_fields("spa")) == {"games.cache_dir"}


def test_config_choices_match_the_code():
  """The config file imports no method code, so it states the arms, estimator heads and weightings again."""
  spec = importlib.util.spec_from_file_location("spa_cfg", os.path.join(os.path.dirname(__file__), "..",
                                                                         "configs", "spa.py"))
  cfg = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cfg)
  assert cfg.ARMS == spa_run.ARMS
  assert cfg.HEADS == progress.HEADS and cfg.WEIGHTINGS == progress.WEIGHTINGS

def test_rollout_buffer_and_advantages_against_numpy():
  """The padded buffer holds every step slot (E·T rows, mask = real steps); GAE and whitening match a direct
  numpy computation over each episode's real steps (the last one terminal)."""
  from lmx.core.config import load_config_file

  cfg = load_config_file(os.path.join(os.path.dirname(__file__), "..", SMOKE))
  rng = np.random.default_rng(0)
  E, T, K, L = 3, 4, 2, 5
  m = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], np.float32)
  ro = {"tokens": rng.integers(0, 9, (E, T, K, L)).astype(np.int32), "cand_mask": np.ones((E, T, K, L), np.float32),
        "valid": np.ones((E, T, K), bool), "prompt_end": np.zeros((E, T), np.int32),
        "action": rng.integers(0, K, (E, T)).astype(np.int32), "logp": rng.normal(size=(E, T)).astype(np.float32),
        "value": (rng.normal(size=(E, T)) * m).astype(np.float32), "step_mask": m,
        "invalid": (rng.random((E, T)) < 0.5).astype(np.float32) * m, "reward": np.array([1, 0, 1], np.float32)}
  g, lam = cfg.rl.gamma, cfg.rl.lam
  rew = spa_run.step_rewards("grounding", ro, None, cfg)
  adv, ret = spa_run.advantages("grounding", ro, rew, cfg)
  want = np.zeros((E, T))
  for e in range(E):
    n = int(m[e].sum())
    a = 0.0
    for t in reversed(range(n)):
      v_next = ro["value"][e, t + 1] if t + 1 < n else 0.0
      a = rew[e, t] + g * v_next - ro["value"][e, t] + g * lam * a
      want[e, t] = a
  np.testing.assert_allclose(ret, (want + ro["value"]) * m, rtol=1e-5, atol=1e-6)
  real = want[m > 0]
  np.testing.assert_allclose(adv[m > 0], (real - real.mean()) / np.sqrt(real.var() + 1e-8), rtol=1e-4, atol=1e-5)
  buf = spa_run.rollout_buffer(ro, adv, ret)
  assert {k: v.shape[0] for k, v in buf.items()} == {k: E * T for k in buf}
  np.testing.assert_array_equal(buf["mask"], m.reshape(-1))
  np.testing.assert_array_equal(buf["tokens"][5], ro["tokens"][1, 1])
  np.testing.assert_array_equal(buf["old_logp"], ro["logp"].reshape(-1))


def test_estimator_optimizer_freezes_the_backbone_and_matches_clip_adam():
  import optax

  from lmx.core.config import load_config_file

  cfg = load_config_file(os.path.join(os.path.dirname(__file__), "..", SMOKE))
  params = {"lm": {"w": jnp.ones((3,))}, "head": {"w": jnp.arange(2.0)}}
  grads = {"lm": {"w": jnp.full((3,), 5.0)}, "head": {"w": jnp.array([3.0, -4.0])}}
  ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(cfg.estimator.optim.lr))
  for frozen in (False, True):
    cfg.estimator.train_backbone = not frozen
    tx = spa_run.estimator_optimizer(cfg)
    upd, _ = tx.update(grads, tx.init(params), params)
    want = ref.update(grads if not frozen else {"head": grads["head"]}, ref.init(params if not frozen else
                                                                                 {"head": params["head"]}))[0]
    np.testing.assert_allclose(np.asarray(upd["head"]["w"]), np.asarray(want["head"]["w"]), rtol=1e-6)
    if frozen:
      assert float(jnp.abs(upd["lm"]["w"]).max()) == 0.0
    else:
      np.testing.assert_allclose(np.asarray(upd["lm"]["w"]), np.asarray(want["lm"]["w"]), rtol=1e-6)


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
