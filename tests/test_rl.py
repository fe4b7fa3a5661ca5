"""lmx.rl and lmx.envs.cartpole against independent references: hand-computed numbers and plain-Python loops
(written from the formulas in shared/methods/rl_losses.md, not from the vectorised code), masking invariance,
the loss-aggregation modes on a ragged batch, CartPole against the classic equations, and a short PPO run."""
import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.envs import cartpole
from lmx.rl import advantages as adv_lib
from lmx.rl import losses
from lmx.rl import ppo

# ----------------------------------------------------------------------------------------------- GAE


def _gae_reference(r, v, last_v, term, trunc, boot, mask, gamma, lam):
  """GAE as the definition's sum A_t = Σ_l (γλ)^l δ_{t+l} over the valid steps of t's episode, in Python loops."""
  B, T = r.shape
  A = np.zeros((B, T))
  for b in range(B):
    steps = [t for t in range(T) if mask[b, t]]
    deltas = {}
    for i, t in enumerate(steps):
      if term[b, t]:
        nxt = 0.0
      elif trunc[b, t]:
        nxt = boot[b, t]
      else:
        nxt = v[b, steps[i + 1]] if i + 1 < len(steps) else last_v[b]
      deltas[t] = r[b, t] + gamma * nxt - v[b, t]
    for i, t in enumerate(steps):
      total, w = 0.0, 1.0
      for t2 in steps[i:]:
        total += w * deltas[t2]
        if term[b, t2] or trunc[b, t2]:
          break  # the episode ends at t2
        w *= gamma * lam
      A[b, t] = total
  return A


def test_gae_hand_computed_termination_vs_truncation():
  r = jnp.ones((1, 3))
  v = jnp.zeros((1, 3))
  last = jnp.array([2.0])
  no = jnp.zeros((1, 3), bool)
  a, ret = adv_lib.gae(r, v, last, no, gamma=0.5, lam=0.5)
  # δ = [1, 1, 1 + 0.5·2]; A2 = 2, A1 = 1 + 0.25·2, A0 = 1 + 0.25·1.5
  np.testing.assert_allclose(a, [[1.375, 1.5, 2.0]], rtol=1e-6)
  np.testing.assert_allclose(ret, a)  # V = 0
  done1 = jnp.array([[False, True, False]])
  a, _ = adv_lib.gae(r, v, last, done1, gamma=0.5, lam=0.5)  # terminated at t=1: nothing past it
  np.testing.assert_allclose(a, [[1.25, 1.0, 2.0]], rtol=1e-6)
  boot = jnp.array([[0.0, 4.0, 0.0]])
  a, _ = adv_lib.gae(r, v, last, no, done1, boot, gamma=0.5, lam=0.5)  # truncated at t=1: bootstrap V = 4
  np.testing.assert_allclose(a, [[1.0 + 0.25 * 3.0, 1.0 + 0.5 * 4.0, 2.0]], rtol=1e-6)
  a, _ = adv_lib.gae(r, v, last, done1, done1, boot, gamma=0.5, lam=0.5)  # both: termination wins
  np.testing.assert_allclose(a, [[1.25, 1.0, 2.0]], rtol=1e-6)


def _random_episodes(seed, B=3, T=9):
  g = np.random.default_rng(seed)
  r = g.normal(size=(B, T))
  v = g.normal(size=(B, T))
  last = g.normal(size=B)
  term = g.random((B, T)) < 0.2
  trunc = g.random((B, T)) < 0.2
  boot = g.normal(size=(B, T))
  return r, v, last, term, trunc, boot


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_matches_python_loop_reference(seed):
  r, v, last, term, trunc, boot = _random_episodes(seed)
  mask = np.ones_like(term)
  gamma, lam = 0.9, 0.8
  a, ret = adv_lib.gae(r, v, last, term, trunc, boot, gamma=gamma, lam=lam)
  ref = _gae_reference(r, v, last, term, trunc, boot, mask, gamma, lam)
  np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, ref + v, rtol=1e-5, atol=1e-5)
  # time-major layout gives the transpose
  a_tm, _ = adv_lib.gae(r.T, v.T, last, term.T, trunc.T, boot.T, gamma=gamma, lam=lam, time_axis=0)
  np.testing.assert_allclose(a_tm.T, a, rtol=1e-6, atol=1e-6)


def test_gae_padding_changes_nothing():
  r, v, last, term, trunc, boot = _random_episodes(7, B=2, T=6)
  gamma, lam = 0.95, 0.9
  a, ret = adv_lib.gae(r, v, last, term, trunc, boot, gamma=gamma, lam=lam)
  # Insert padding columns (left, interior and right) holding garbage, NaN included.
  cols = [None, 0, 1, None, 2, 3, 4, None, 5, None]
  pad = lambda x, fill: np.stack([x[:, c] if c is not None else np.full(x.shape[0], fill) for c in cols], 1)
  mask = np.array([c is not None for c in cols])[None].repeat(2, 0)
  a_p, ret_p = adv_lib.gae(pad(r, np.nan), pad(v, 1e6), last, pad(term, True), pad(trunc, True), pad(boot, np.nan),
                           mask, gamma=gamma, lam=lam)
  keep = [i for i, c in enumerate(cols) if c is not None]
  np.testing.assert_allclose(np.asarray(a_p)[:, keep], a, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ret_p)[:, keep], ret, rtol=1e-6, atol=1e-6)
  assert np.all(np.asarray(a_p)[:, ~mask[0]] == 0) and np.all(np.asarray(ret_p)[:, ~mask[0]] == 0)
  ref = _gae_reference(pad(r, 0.0), pad(v, 0.0), last, pad(term, False), pad(trunc, False), pad(boot, 0.0), mask,
                       gamma, lam)
  np.testing.assert_allclose(a_p, ref, rtol=1e-5, atol=1e-5)


def test_masked_whiten():
  x = np.array([[1.0, 2.0, 3.0, 100.0]])
  m = np.array([[1, 1, 1, 0]])
  w = np.asarray(adv_lib.masked_whiten(x, m))
  sd = statistics.pstdev([1.0, 2.0, 3.0])
  np.testing.assert_allclose(w[0, :3], [(1 - 2) / sd, 0.0, (3 - 2) / sd], rtol=1e-5)
  assert w[0, 3] == 0

# --------------------------------------------------------------------------------- group advantages


REWARDS = [1.0, 0.0, 0.0, 1.0, 0.5, 2.0, -1.0, 0.25]  # two groups of G = 4


def test_grpo_against_statistics_module_and_ddof():
  got = np.asarray(adv_lib.grpo_advantages(jnp.array(REWARDS), 4))
  for g in range(2):
    grp = REWARDS[4 * g:4 * g + 4]
    mu, sd = statistics.mean(grp), statistics.stdev(grp)  # unbiased, ddof = 1
    for i, x in enumerate(grp):
      assert got[4 * g + i] == pytest.approx((x - mu) / (sd + 1e-6), rel=1e-5)
  pop = np.asarray(adv_lib.grpo_advantages(jnp.array(REWARDS), 4, ddof=0))
  np.testing.assert_allclose(pop / got, math.sqrt(4 / 3), rtol=1e-5)  # the pinned 1.1547 factor at G = 4
  # a group with equal rewards gives zeros, not NaN
  np.testing.assert_array_equal(adv_lib.grpo_advantages(jnp.ones(4), 4), np.zeros(4))


def test_drgrpo_and_rloo_hand_computed():
  # group 1: [1, 0, 0, 1], mean 0.5
  np.testing.assert_allclose(adv_lib.drgrpo_advantages(jnp.array(REWARDS), 4)[:4], [0.5, -0.5, -0.5, 0.5])
  got = np.asarray(adv_lib.rloo_advantages(jnp.array(REWARDS), 4))
  for g in range(2):
    grp = REWARDS[4 * g:4 * g + 4]
    for i in range(4):
      others = [grp[j] for j in range(4) if j != i]
      assert got[4 * g + i] == pytest.approx(grp[i] - sum(others) / len(others), rel=1e-6, abs=1e-6)
  np.testing.assert_allclose(got[:4], [2 / 3, -2 / 3, -2 / 3, 2 / 3], rtol=1e-6)
  # RLOO is Dr.GRPO scaled by G/(G-1)
  np.testing.assert_allclose(got, adv_lib.drgrpo_advantages(jnp.array(REWARDS), 4) * 4 / 3, rtol=1e-5)
  for kind, fn in adv_lib.GROUP_ESTIMATORS.items():
    np.testing.assert_array_equal(adv_lib.group_advantages(jnp.array(REWARDS), 4, kind), fn(jnp.array(REWARDS), 4))
  with pytest.raises(ValueError, match="multiple of group_size"):
    adv_lib.grpo_advantages(jnp.ones(6), 4)

# ------------------------------------------------------------------------------------------- PPO


def _ppo_token_reference(lp, olp, a, eps_low, eps_high, c):
  """The textbook per-token form: A ≥ 0: −A·min(r, 1+ε_high); A < 0: |A|·max(r, 1−ε_low), capped at c·|A|."""
  r = math.exp(lp - olp)
  if a >= 0:
    return -a * min(r, 1 + eps_high)
  loss = -a * max(r, 1 - eps_low)
  return min(loss, -c * a) if c is not None else loss


def _ppo_case(seed=0, B=3, T=5):
  g = np.random.default_rng(seed)
  olp = np.log(g.uniform(0.05, 1.0, (B, T)))
  lp = olp + g.normal(0, 0.6, (B, T))  # ratios well outside [0.8, 1.2], and some beyond the dual-clip cap
  lp[0, 0] = olp[0, 0] + math.log(5.0)  # r = 5
  a = g.normal(0, 1.0, (B, T))
  a[0, 0] = -1.0  # r = 5, A < 0: the dual clip binds (3·1 < 5·1)
  return lp, olp, a


@pytest.mark.parametrize("eps_low,eps_high,c", [(0.2, 0.2, 3.0), (0.2, 0.28, 3.0), (0.1, 0.3, None)])
def test_ppo_policy_loss_matches_textbook_form(eps_low, eps_high, c):
  lp, olp, a = _ppo_case()
  per_tok, m = losses.ppo_policy_loss_per_token(lp, olp, a, clip_low=eps_low, clip_high=eps_high, dual_clip=c)
  ref = np.array([[_ppo_token_reference(lp[b, t], olp[b, t], a[b, t], eps_low, eps_high, c)
                   for t in range(lp.shape[1])] for b in range(lp.shape[0])])
  np.testing.assert_allclose(per_tok, ref, rtol=1e-5, atol=1e-6)
  if c is not None:
    assert float(per_tok[0, 0]) == pytest.approx(3.0)  # capped at c·|A|, not r·|A| = 5
  ratio = np.exp(lp - olp)
  assert float(m["ppo_kl"]) == pytest.approx(np.mean(olp - lp), rel=1e-5)
  l1, l2 = -a * ratio, -a * np.clip(ratio, 1 - eps_low, 1 + eps_high)
  assert float(m["clipfrac_high"]) == pytest.approx(np.mean(l1 < l2))
  loss, _ = losses.ppo_policy_loss(lp, olp, a, clip_low=eps_low, clip_high=eps_high, dual_clip=c)
  assert float(loss) == pytest.approx(ref.mean(), rel=1e-5)


def test_ppo_gradient_is_zero_where_clipped():
  # A > 0 and r > 1 + ε: the clipped branch is flat, so no gradient; r inside the band: gradient −A·r.
  lp = jnp.array([[math.log(1.5), math.log(1.1)]])
  g = jax.jit(jax.grad(lambda x: losses.ppo_policy_loss(x, jnp.zeros((1, 2)), jnp.ones((1, 2)),
                                                         agg="seq-mean-token-sum")[0]))(lp)
  np.testing.assert_allclose(g, [[0.0, -1.1]], rtol=1e-5)


def test_value_loss_clipping_hand_computed():
  v = np.array([[1.0, 0.0, 3.0]])
  old = np.array([[0.0, 0.0, 2.9]])
  ret = np.array([[2.0, 1.0, 0.0]])
  # token 0: unclipped (1−2)² = 1, clipped V = 0.2 → (0.2−2)² = 3.24 → 0.5·3.24
  # token 1: both (0−1)² = 1 → 0.5;  token 2: unclipped 9, clipped V = 3.0 (within 2.9±0.2) → 9 → 4.5
  loss, m = losses.value_loss(v, old, ret, clip=0.2)
  assert float(loss) == pytest.approx((1.62 + 0.5 + 4.5) / 3, rel=1e-5)
  assert float(m["vf_clipfrac"]) == pytest.approx(1 / 3)
  loss, _ = losses.value_loss(v, old, ret, clip=None)
  assert float(loss) == pytest.approx((0.5 + 0.5 + 4.5) / 3, rel=1e-5)


def test_policy_and_value_losses_ignore_padding_even_nan():
  lp, olp, a = _ppo_case(seed=3, B=2, T=4)
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
  lp_g, olp_g, a_g = lp.copy(), olp.copy(), a.copy()
  lp_g[mask == 0], olp_g[mask == 0], a_g[mask == 0] = np.nan, -np.inf, 1e9

  @jax.jit
  def all_modes(x, o, adv):
    return {agg: jax.value_and_grad(lambda x_: losses.ppo_policy_loss(x_, o, adv, mask, agg=agg)[0])(x)
            for agg in losses.AGG_MODES}

  clean, garbage = all_modes(lp, olp, a), all_modes(lp_g, olp_g, a_g)
  for agg in losses.AGG_MODES:
    assert float(garbage[agg][0]) == pytest.approx(float(clean[agg][0]), rel=1e-6)
    grad = np.asarray(garbage[agg][1])
    assert np.all(np.isfinite(grad)) and np.all(grad[mask == 0] == 0)
    np.testing.assert_allclose(grad, clean[agg][1], rtol=1e-6)
  v = np.random.default_rng(0).normal(size=(2, 4))
  v_g = v.copy()
  v_g[mask == 0] = np.nan
  assert float(losses.value_loss(v_g, v_g, v_g + 1, mask)[0]) == pytest.approx(0.5)

# --------------------------------------------------------------------------------- KL and entropy


@pytest.mark.parametrize("kind,fn", [
    ("k1", lambda x: x), ("kl", lambda x: x), ("abs", abs), ("k2", lambda x: 0.5 * x * x),
    ("mse", lambda x: 0.5 * x * x),
    ("k3", lambda x: max(-10.0, min(10.0, math.exp(-x) + x - 1))),
    ("low_var_kl", lambda x: max(-10.0, min(10.0, math.exp(-x) + x - 1)))])
def test_kl_estimators_hand_computed(kind, fn):
  lp = np.array([-1.0, -0.5, -3.0, -0.1, -20.0])
  ref_lp = np.array([-1.5, -0.5, -0.2, -4.0, -0.1])  # x = 0.5, 0, −2.8, 3.9, −19.9 (k3 clamps at 10)
  got = np.asarray(losses.kl_estimate(lp, ref_lp, kind))
  np.testing.assert_allclose(got, [fn(a - b) for a, b in zip(lp, ref_lp)], rtol=1e-5, atol=1e-6)
  mask = np.array([1, 1, 1, 1, 0])
  assert float(losses.kl_estimate(lp, ref_lp, kind, mask)[-1]) == 0.0


def test_k1_and_k3_are_unbiased_for_kl_and_k3_has_lower_variance():
  p = np.array([0.5, 0.3, 0.15, 0.05])
  q = np.array([0.4, 0.4, 0.1, 0.1])
  exact = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
  idx = np.random.default_rng(0).choice(4, size=100_000, p=p)
  lp, lq = np.log(p)[idx], np.log(q)[idx]
  k1, k2, k3 = (np.asarray(losses.kl_estimate(lp, lq, k)) for k in ("k1", "k2", "k3"))
  assert k1.mean() == pytest.approx(exact, abs=4e-3)
  assert k3.mean() == pytest.approx(exact, abs=4e-3)
  assert k3.min() >= 0 and k3.var() < k1.var()
  assert abs(k2.mean() - exact) < 0.01  # k2 is biased but close for nearby distributions


def test_entropy_and_bonus():
  logits = jnp.zeros((2, 3, 5))
  np.testing.assert_allclose(losses.entropy_from_logits(logits), np.full((2, 3), math.log(5)), rtol=1e-6)
  p = np.array([0.7, 0.2, 0.1])
  assert float(losses.entropy_from_logits(jnp.log(p))) == pytest.approx(-sum(x * math.log(x) for x in p), rel=1e-5)
  ent = jnp.array([[1.0, 2.0, 100.0]])
  assert float(losses.entropy_bonus(ent, jnp.array([[1, 1, 0]]), coef=0.1)) == pytest.approx(-0.15)

# ----------------------------------------------------------------------------------------- aggregation


def test_aggregation_modes_on_a_ragged_batch():
  L = np.array([[1.0, 2.0, 3.0, 99.0], [4.0, np.nan, 99.0, 99.0], [5.0, 6.0, -7.0, np.inf]])
  m = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])
  expected = {"token-mean": (6 + 4 + 11) / 6,
              "seq-mean-token-mean": (6 / 3 + 4 / 1 + 11 / 2) / 3,
              "seq-mean-token-sum": (6 + 4 + 11) / 3,
              "seq-mean-token-sum-norm": (6 + 4 + 11) / 4}
  for mode, want in expected.items():
    assert float(losses.agg_loss(L, m, mode)) == pytest.approx(want, rel=1e-6), mode
    # an all-padding row changes nothing
    L2, m2 = np.concatenate([L, np.full((1, 4), 5.0)]), np.concatenate([m, np.zeros((1, 4), int)])
    assert float(losses.agg_loss(L2, m2, mode)) == pytest.approx(want, rel=1e-6), mode
  assert float(losses.agg_loss(L, m, "seq-mean-token-sum-norm", norm=7.0)) == pytest.approx(21 / 7)
  with pytest.raises(ValueError, match="aggregation mode"):
    losses.agg_loss(L, m, "token-sum")

# ------------------------------------------------------------------------------------------- CartPole


def _cartpole_reference(x, x_dot, th, th_dot, action):
  """The classic cart-pole equations (Barto, Sutton & Anderson 1983, as in gym's cartpole.py), Euler, τ = 0.02."""
  g, mc, mp, l, f_mag, tau = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
  f = f_mag if action == 1 else -f_mag
  temp = (f + mp * l * th_dot ** 2 * math.sin(th)) / (mc + mp)
  th_acc = (g * math.sin(th) - math.cos(th) * temp) / (l * (4 / 3 - mp * math.cos(th) ** 2 / (mc + mp)))
  x_acc = temp - mp * l * th_acc * math.cos(th) / (mc + mp)
  return x + tau * x_dot, x_dot + tau * x_acc, th + tau * th_dot, th_dot + tau * th_acc


def test_cartpole_first_push_hand_computed():
  state = cartpole.State(*(jnp.float32(0.0),) * 4, jnp.int32(0), jnp.float32(0.0))
  obs, _, reward, done, info = cartpole.step(jax.random.key(0), state, 1)
  # F = 10: temp = 10/1.1, θ̈ = −temp/(0.5·(4/3 − 0.1/1.1)), ẍ = temp − 0.05·θ̈/1.1
  temp = 10 / 1.1
  th_acc = -temp / (0.5 * (4 / 3 - 0.1 / 1.1))
  np.testing.assert_allclose(obs, [0.0, 0.02 * (temp - 0.05 * th_acc / 1.1), 0.0, 0.02 * th_acc], rtol=1e-5)
  assert float(reward) == 1.0 and not bool(done) and not bool(info["truncated"])


def test_cartpole_matches_classic_equations_and_terminates():
  step = jax.jit(cartpole.step)
  obs, state = cartpole.reset(jax.random.key(3))
  assert np.all(np.abs(np.asarray(obs)) <= 0.05)
  ref = [float(v) for v in obs]
  actions = [1, 1, 0, 1, 0, 0, 0, 1] + [1] * 60
  for t, a in enumerate(actions):
    ref = _cartpole_reference(*ref, a)
    obs, state, reward, done, info = step(jax.random.key(100 + t), state, a)
    np.testing.assert_allclose(info["final_obs"], ref, rtol=1e-4, atol=1e-5)
    term = abs(ref[0]) > 2.4 or abs(ref[2]) > 12 * 2 * math.pi / 360
    assert bool(info["terminated"]) == term and bool(done) == term and not bool(info["truncated"])
    if term:
      break
  assert term, "pushing right for 60 steps must drop the pole"
  # auto-reset: a fresh episode's observation, and the ended episode's return/length reported
  assert int(state.time) == 0 and np.all(np.abs(np.asarray(obs)) <= 0.05)
  assert int(info["episode_length"]) == t + 1 and float(info["episode_return"]) == t + 1


def test_cartpole_truncates_at_500_steps_separately_from_termination():
  state = cartpole.State(*(jnp.float32(0.0),) * 4, jnp.int32(499), jnp.float32(499.0))
  obs, new_state, _, done, info = cartpole.step(jax.random.key(0), state, 1)
  assert bool(done) and bool(info["truncated"]) and not bool(info["terminated"])
  assert float(info["episode_return"]) == 500 and int(new_state.time) == 0
  assert float(info["final_obs"][1]) > 0  # the reached state, not the reset one
  state = state._replace(time=jnp.int32(498))
  assert not bool(cartpole.step(jax.random.key(0), state, 1)[3])

# ------------------------------------------------------------------------------------------------ PPO


def test_ppo_config_validation():
  with pytest.raises(ValueError, match="unknown PPO config field"):
    ppo.make_train({"learning_rate": 1e-3})
  with pytest.raises(ValueError, match="divisible by num_minibatches"):
    ppo.make_train({"num_envs": 3, "num_steps": 5})
  cfg = ppo.resolve_config({"total_timesteps": 5120})
  assert cfg["num_updates"] == 10 and cfg["minibatch_size"] == 128


@pytest.mark.slow
def test_ppo_a_few_updates_improve_cartpole_return():
  # 64 updates of PureJaxRL's default config (4 envs × 128 steps, 32k env steps). A random policy lasts ~22 steps.
  out = jax.jit(ppo.make_train({"total_timesteps": 32_768, "eval_envs": 16}))(jax.random.key(0))
  ret = np.asarray(out["metrics"]["episode_return"])
  assert np.all(np.isfinite(np.asarray(out["metrics"]["loss"])))
  assert ret[:2].mean() < 40 and ret[-4:].mean() > 2 * ret[:2].mean()
  assert float(np.mean(out["eval_return"])) > 60


def test_ppo_loss_gradient_matches_hand_written_numpy_backprop():
  # benchmarks/ppo_cartpole.py's NumPy PPO differentiates both MLPs by hand: an independent check of ppo.loss.
  from benchmarks import ppo_cartpole
  r = ppo_cartpole.grad_check({})
  assert r["loss_abs_diff"] < 1e-5 and r["grad_max_abs_diff"] < 1e-5 * max(1.0, r["grad_max_abs"] * 100)
  assert r["grad_max_abs"] > 1e-3  # a real gradient, not zeros on both sides


def test_numpy_baseline_cartpole_is_the_same_environment():
  # The benchmark's NumPy CartPole (its PPO baseline's environment) steps like lmx.envs.cartpole.
  from benchmarks import ppo_cartpole
  g = np.random.default_rng(1)
  env = ppo_cartpole.NumpyCartPole(64, g)
  env.s = g.uniform([-2.5, -1.0, -0.25, -1.0], [2.5, 1.0, 0.25, 1.0], (64, 4))  # some beyond the limits
  env.t = g.integers(490, 500, 64)
  s0, t0, a = env.s.copy(), env.t.copy(), g.integers(0, 2, 64)
  _, _, term, trunc, final, _ = env.step(a)
  state = cartpole.State(*(jnp.asarray(s0[:, i], jnp.float32) for i in range(4)), jnp.asarray(t0, jnp.int32),
                         jnp.zeros(64))
  _, _, _, _, info = jax.jit(jax.vmap(cartpole.step))(jax.random.split(jax.random.key(0), 64), state, jnp.asarray(a))
  np.testing.assert_allclose(final, info["final_obs"], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(term, info["terminated"])
  np.testing.assert_array_equal(trunc, info["truncated"])
  assert trunc.any() and term.any()
