r"""PPO on CartPole-v1: lmx's pure-JAX ``make_train`` (the RL core's learning check) next to the same PPO in NumPy.

    PYTHONPATH=. python benchmarks/ppo_cartpole.py [--seeds=3] [--total_timesteps=500000]
        [--numpy_timesteps=500000] [--out=benchmarks/results/ppo_cartpole.json]

Rows, all in one process:
  jax_ppo     ``jax.jit(jax.vmap(make_train(cfg)))`` over the seeds (one compile): compile seconds, wall seconds of
              the compiled run, env-steps/s (all seeds together), and per seed the mean return of the training
              episodes that ended in the last 10% of updates (PureJaxRL's curve) and of the final policy's
              evaluation (32 sampled episodes), plus the first update at which the 10-update mean reached 475.
  numpy_ppo   the same algorithm written in NumPy (vectorised CartPole, hand-written backprop of both MLPs,
              global-norm clip, Adam with the same annealing), one seed, its gradient checked against
              ``jax.grad`` of :func:`lmx.rl.ppo.loss` on one minibatch first.
  env_only    random-action CartPole steps/s: JAX (``vmap`` + ``lax.scan``) vs NumPy vectorised vs a
              single-environment Python loop (the gym style).
Config: PureJaxRL's CartPole defaults (4 envs × 128 steps, 4 epochs × 4 minibatches, lr 2.5e-4 annealed).
"""
from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import environment, record
from lmx.core.rng import np_stream, rng_stream
from lmx.envs import cartpole
from lmx.rl import ppo

SOLVED = 475.0


# ------------------------------------------------------------------------------------------ NumPy CartPole
class NumpyCartPole:
  """Vectorised CartPole-v1 in NumPy with the same constants, auto-reset and truncation at 500 steps."""

  def __init__(self, n, rng):
    self.n, self.rng = n, rng
    self.s = rng.uniform(-0.05, 0.05, (n, 4))
    self.t = np.zeros(n, np.int64)
    self.ret = np.zeros(n)

  def step(self, action):
    x, x_dot, th, th_dot = self.s.T
    f = np.where(action == 1, cartpole.FORCE_MAG, -cartpole.FORCE_MAG)
    cos, sin = np.cos(th), np.sin(th)
    temp = (f + cartpole.POLE_MASS_LENGTH * th_dot ** 2 * sin) / cartpole.TOTAL_MASS
    th_acc = (cartpole.GRAVITY * sin - cos * temp) / (
        cartpole.HALF_LENGTH * (4.0 / 3.0 - cartpole.MASS_POLE * cos ** 2 / cartpole.TOTAL_MASS))
    x_acc = temp - cartpole.POLE_MASS_LENGTH * th_acc * cos / cartpole.TOTAL_MASS
    tau = cartpole.TAU
    final = np.stack([x + tau * x_dot, x_dot + tau * x_acc, th + tau * th_dot, th_dot + tau * th_acc], 1)
    self.t += 1
    self.ret += 1.0
    term = (np.abs(final[:, 0]) > cartpole.X_LIMIT) | (np.abs(final[:, 2]) > cartpole.THETA_LIMIT)
    trunc = self.t >= cartpole.MAX_STEPS
    done = term | trunc
    ep_ret = np.where(done, self.ret, 0.0)
    self.s = np.where(done[:, None], self.rng.uniform(-0.05, 0.05, (self.n, 4)), final)
    self.t = np.where(done, 0, self.t)
    self.ret = np.where(done, 0.0, self.ret)
    return self.s.astype(np.float32), np.ones(self.n), term, trunc, final.astype(np.float32), ep_ret


def python_cartpole_steps(n_steps, rng):
  """Single-environment Python-float CartPole with random actions (gym's per-step style); returns steps/s."""
  x = x_dot = th = th_dot = 0.0
  t0 = time.perf_counter()
  actions = rng.integers(0, 2, n_steps)
  k = 0
  for i in range(n_steps):
    f = 10.0 if actions[i] else -10.0
    cos, sin = math.cos(th), math.sin(th)
    temp = (f + 0.05 * th_dot * th_dot * sin) / 1.1
    th_acc = (9.8 * sin - cos * temp) / (0.5 * (4.0 / 3.0 - 0.1 * cos * cos / 1.1))
    x_acc = temp - 0.05 * th_acc * cos / 1.1
    x, x_dot, th, th_dot = x + 0.02 * x_dot, x_dot + 0.02 * x_acc, th + 0.02 * th_dot, th_dot + 0.02 * th_acc
    k += 1
    if abs(x) > 2.4 or abs(th) > 0.2094 or k >= 500:
      x, x_dot, th, th_dot = rng.uniform(-0.05, 0.05, 4)
      k = 0
  return n_steps / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- NumPy PPO
def _np_params(params):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


def _np_forward(layers, x):
  hs = [x]
  for layer in layers[:-1]:
    hs.append(np.tanh(hs[-1] @ layer["w"] + layer["b"]))
  return hs, hs[-1] @ layers[-1]["w"] + layers[-1]["b"]


def _np_backward(layers, hs, d_out):
  grads = [None] * len(layers)
  d = d_out
  for i in range(len(layers) - 1, -1, -1):
    grads[i] = {"w": hs[i].T @ d, "b": d.sum(0)}
    if i:
      d = (d @ layers[i]["w"].T) * (1.0 - hs[i] ** 2)
  return grads


def numpy_loss_and_grad(params, mb, cfg):
  """The PPO minibatch loss of :func:`lmx.rl.ppo.loss` (dual clip off) and its gradient, by hand."""
  M = mb["obs"].shape[0]
  hs_a, logits = _np_forward(params["actor"], mb["obs"])
  hs_c, v = _np_forward(params["critic"], mb["obs"])
  v = v[:, 0]
  z = logits - logits.max(1, keepdims=True)
  logp_all = z - np.log(np.exp(z).sum(1, keepdims=True))
  p = np.exp(logp_all)
  logp = logp_all[np.arange(M), mb["action"]]
  adv = mb["advantage"]
  if cfg["normalize_advantages"]:
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
  eps = cfg["clip_eps"]
  ratio = np.exp(logp - mb["logp"])
  l1, l2 = -adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps)
  pg = np.maximum(l1, l2).mean()
  d_logp = np.where(l1 >= l2, -adv * ratio, 0.0) / M  # the clipped branch is flat in θ
  ent_i = -(p * logp_all).sum(1)
  onehot = np.eye(logits.shape[1])[mb["action"]]
  d_logits = d_logp[:, None] * (onehot - p) - cfg["ent_coef"] * (-p * (logp_all + ent_i[:, None])) / M
  ret, old_v, vc = mb["return"], mb["value"], cfg["vf_clip"]
  v_clip = old_v + np.clip(v - old_v, -vc, vc)
  uncl, cl = (v - ret) ** 2, (v_clip - ret) ** 2
  vf = 0.5 * np.maximum(uncl, cl).mean()
  d_v = np.where(uncl >= cl, v - ret, (v_clip - ret) * (np.abs(v - old_v) < vc)) / M * cfg["vf_coef"]
  total = pg + cfg["vf_coef"] * vf - cfg["ent_coef"] * ent_i.mean()
  grads = {"actor": _np_backward(params["actor"], hs_a, d_logits),
           "critic": _np_backward(params["critic"], hs_c, d_v[:, None])}
  return total, grads


def numpy_ppo(cfg, seed, total_timesteps):
  """The PPO of :func:`lmx.rl.ppo.make_train` in NumPy; returns its return curve and wall seconds."""
  cfg = ppo.resolve_config({**cfg, "total_timesteps": total_timesteps})
  rng = np_stream(seed, "numpy_ppo")
  params = _np_params(ppo.init_params(rng_stream(seed, "numpy_ppo_init"), 4, 2, cfg["hidden"]))
  n_env, n_steps, n_mb = cfg["num_envs"], cfg["num_steps"], cfg["num_minibatches"]
  mu = jax.tree.map(np.zeros_like, params)
  nu = jax.tree.map(np.zeros_like, params)
  count = 0
  env = NumpyCartPole(n_env, rng)
  obs = env.s.astype(np.float32)
  curve = []
  t0 = time.perf_counter()
  for update in range(cfg["num_updates"]):
    buf = {k: [] for k in ("obs", "action", "logp", "value", "reward", "term", "trunc", "boot", "ep_ret", "done")}
    for _ in range(n_steps):
      _, logits = _np_forward(params["actor"], obs)
      _, v = _np_forward(params["critic"], obs)
      z = logits - logits.max(1, keepdims=True)
      logp_all = z - np.log(np.exp(z).sum(1, keepdims=True))
      action = (rng.random(n_env) < np.exp(logp_all[:, 1])).astype(np.int64)
      next_obs, r, term, trunc, final, ep_ret = env.step(action)
      _, boot = _np_forward(params["critic"], final)
      for k, val in (("obs", obs), ("action", action), ("logp", logp_all[np.arange(n_env), action]),
                     ("value", v[:, 0]), ("reward", r), ("term", term), ("trunc", trunc), ("boot", boot[:, 0]),
                     ("ep_ret", ep_ret), ("done", term | trunc)):
        buf[k].append(val)
      obs = next_obs
    b = {k: np.stack(val) for k, val in buf.items()}  # [T, N]
    _, last_v = _np_forward(params["critic"], obs)
    next_v, next_a = last_v[:, 0], np.zeros(n_env)
    adv = np.zeros((n_steps, n_env))
    for t in range(n_steps - 1, -1, -1):
      v_next = np.where(b["trunc"][t], b["boot"][t], next_v)
      delta = b["reward"][t] + cfg["gamma"] * np.where(b["term"][t], 0.0, v_next) - b["value"][t]
      next_a = delta + cfg["gamma"] * cfg["gae_lambda"] * np.where(b["done"][t], 0.0, next_a)
      adv[t], next_v = next_a, b["value"][t]
    flat = {"obs": b["obs"].reshape(-1, 4), "action": b["action"].reshape(-1), "logp": b["logp"].reshape(-1),
            "value": b["value"].reshape(-1), "advantage": adv.reshape(-1), "return": (adv + b["value"]).reshape(-1)}
    for _ in range(cfg["update_epochs"]):
      perm = rng.permutation(n_steps * n_env)
      for i in range(n_mb):
        idx = perm[i * cfg["minibatch_size"]:(i + 1) * cfg["minibatch_size"]]
        _, g = numpy_loss_and_grad(params, {k: val[idx] for k, val in flat.items()}, cfg)
        leaves = jax.tree.leaves(g)
        gnorm = math.sqrt(sum(float((x ** 2).sum()) for x in leaves))
        scale = min(1.0, cfg["max_grad_norm"] / max(gnorm, 1e-12))
        lr = cfg["lr"] * (1.0 - (count // (n_mb * cfg["update_epochs"])) / cfg["num_updates"])
        count += 1
        mu = jax.tree.map(lambda m, gg: 0.9 * m + 0.1 * gg * scale, mu, g)
        nu = jax.tree.map(lambda n, gg: 0.999 * n + 0.001 * (gg * scale) ** 2, nu, g)
        params = jax.tree.map(lambda p, m, n: p - lr * (m / (1 - 0.9 ** count)) / (
            np.sqrt(n / (1 - 0.999 ** count)) + 1e-5), params, mu, nu)
    n_done = b["done"].sum()
    curve.append(b["ep_ret"].sum() / n_done if n_done else float("nan"))
  return np.array(curve), time.perf_counter() - t0


def grad_check(cfg, seed=0):
  """Max |numpy − jax.grad| over all parameters on one random minibatch (both float64 inputs where possible)."""
  cfg = ppo.resolve_config(cfg)
  g = np_stream(seed, "grad_check")
  h = cfg["hidden"]
  # Random dense layers (not the orthogonal init: the check needs generic weights, and no init compile)
  params = {net: [{"w": (g.normal(size=(i, o)) / math.sqrt(i)).astype(np.float32),
                   "b": (0.1 * g.normal(size=o)).astype(np.float32)} for i, o in ((4, h), (h, h), (h, n_out))]
            for net, n_out in (("actor", 2), ("critic", 1))}
  M = cfg["minibatch_size"]
  mb = {"obs": g.normal(size=(M, 4)).astype(np.float32), "action": g.integers(0, 2, M),
        "logp": np.log(g.uniform(0.2, 0.8, M)).astype(np.float32), "value": g.normal(size=M).astype(np.float32),
        "advantage": g.normal(size=M).astype(np.float32), "return": g.normal(size=M).astype(np.float32)}
  jl, jg = jax.jit(jax.value_and_grad(lambda p, b: ppo.loss(p, b, cfg)[0]))(params, mb)
  jl = float(jl)
  nl, ng = numpy_loss_and_grad(_np_params(params), {k: np.asarray(v, np.float64) if v.dtype.kind == "f" else v
                                                    for k, v in mb.items()}, cfg)
  diff = max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(jax.tree.leaves(jg), jax.tree.leaves(ng)))
  scale = max(float(np.max(np.abs(b))) for b in jax.tree.leaves(ng))
  return {"loss_abs_diff": abs(jl - nl), "grad_max_abs_diff": diff, "grad_max_abs": scale}


# -------------------------------------------------------------------------------------------------- main
def first_solved(curve, window=10):
  c = np.asarray(curve, np.float64)
  for i in range(window, len(c) + 1):
    if np.nanmean(c[i - window:i]) >= SOLVED:
      return i
  return None


def jax_ppo(cfg, seeds):
  keys = jnp.stack([rng_stream(s, "ppo") for s in seeds])
  train = jax.jit(jax.vmap(ppo.make_train(cfg)))
  t0 = time.perf_counter()
  compiled = train.lower(keys).compile()
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  out = jax.block_until_ready(compiled(keys))
  wall = time.perf_counter() - t0
  curves = np.asarray(out["metrics"]["episode_return"])
  ev = np.asarray(out["eval_return"])
  tail = max(1, curves.shape[1] // 10)
  per_seed = [{"seed": s, "train_return_last10pct": float(np.nanmean(curves[i, -tail:])),
               "eval_return_mean": float(ev[i].mean()), "eval_return_min": float(ev[i].min()),
               "first_update_10avg_ge_475": first_solved(curves[i]),
               "curve_every_10pct": [round(float(np.nanmean(curves[i, j:j + tail])), 1)
                                     for j in range(0, curves.shape[1], tail)]} for i, s in enumerate(seeds)]
  ts = ppo.resolve_config(cfg)["num_updates"] * cfg.get("num_envs", 4) * cfg.get("num_steps", 128)
  return {"name": "jax_ppo", "seeds": list(seeds), "env_steps_per_seed": ts, "compile_seconds": round(compile_s, 2),
          "wall_seconds": round(wall, 2), "env_steps_per_sec": round(ts * len(seeds) / wall),
          "mean_train_return_last10pct": float(np.mean([p["train_return_last10pct"] for p in per_seed])),
          "mean_eval_return": float(np.mean([p["eval_return_mean"] for p in per_seed])),
          "reaches_475": bool(np.mean([p["eval_return_mean"] for p in per_seed]) >= SOLVED), "per_seed": per_seed}


def env_only(n_envs=1024, n_steps=1000):
  def run(key):
    obs, state = jax.vmap(cartpole.reset)(jax.random.split(key, n_envs))

    def body(c, k):
      state = c
      ka, ke = jax.random.split(k)
      a = jax.random.bernoulli(ka, 0.5, (n_envs,)).astype(jnp.int32)
      _, state, r, done, _ = jax.vmap(cartpole.step)(jax.random.split(ke, n_envs), state, a)
      return state, done.sum()
    return jax.lax.scan(body, state, jax.random.split(key, n_steps))[1].sum()
  f = jax.jit(run).lower(jax.random.key(0)).compile()
  jax.block_until_ready(f(jax.random.key(1)))
  t0 = time.perf_counter()
  jax.block_until_ready(f(jax.random.key(2)))
  jax_sps = n_envs * n_steps / (time.perf_counter() - t0)
  rng = np.random.default_rng(0)
  env = NumpyCartPole(n_envs, rng)
  t0 = time.perf_counter()
  for _ in range(n_steps // 10):
    env.step(rng.integers(0, 2, n_envs))
  np_sps = n_envs * (n_steps // 10) / (time.perf_counter() - t0)
  return {"name": "env_only", "envs": n_envs, "jax_env_steps_per_sec": round(jax_sps),
          "numpy_vectorised_env_steps_per_sec": round(np_sps),
          "python_single_env_steps_per_sec": round(python_cartpole_steps(100_000, rng))}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--total_timesteps", type=int, default=500_000)
  ap.add_argument("--numpy_timesteps", type=int, default=500_000, help="0 skips the NumPy PPO")
  ap.add_argument("--out", default="benchmarks/results/ppo_cartpole.json")
  args = ap.parse_args(argv)
  cfg = {"total_timesteps": args.total_timesteps}
  results = environment(config={**ppo.DEFAULTS, **cfg}, command="PYTHONPATH=. python benchmarks/ppo_cartpole.py "
                        + " ".join(argv if argv is not None else __import__("sys").argv[1:]))
  record(results, jax_ppo(cfg, list(range(args.seeds))), args.out)
  record(results, {"name": "grad_check_numpy_vs_jax", **grad_check(cfg)}, args.out)
  if args.numpy_timesteps:
    curve, wall = numpy_ppo(cfg, 0, args.numpy_timesteps)
    tail = max(1, len(curve) // 10)
    steps = len(curve) * ppo.DEFAULTS["num_envs"] * ppo.DEFAULTS["num_steps"]
    record(results, {"name": "numpy_ppo", "seed": 0, "env_steps": steps, "wall_seconds": round(wall, 2),
                     "env_steps_per_sec": round(steps / wall),
                     "train_return_last10pct": float(np.nanmean(curve[-tail:])),
                     "first_update_10avg_ge_475": first_solved(curve),
                     "curve_every_10pct": [round(float(np.nanmean(curve[j:j + tail])), 1)
                                           for j in range(0, len(curve), tail)]}, args.out)
  record(results, env_only(), args.out)


if __name__ == "__main__":
  main()
