"""PPO on a pure-JAX environment in the PureJaxRL shape: ``make_train(config)`` returns a pure ``train(key)``.

The check that the RL core learns: the whole run (rollouts of ``vmap``-ed environments under
``lax.scan``, truncation-aware GAE from :mod:`lmx.rl.advantages`, the clipped losses of :mod:`lmx.rl.losses`,
epochs × minibatches of Adam) is one jittable function of a key, so seeds are ``jax.vmap(train)(keys)``::

    train = jax.jit(jax.vmap(make_train({"total_timesteps": 500_000})))
    out = train(jax.random.split(key, 3))

The actor-critic is a plain parameter pytree (separate 64-64 tanh MLPs for policy and value, orthogonal init as
PureJaxRL), applied by :func:`apply`, as lmx's other small nets (``lmx.models.convnet.apply``).

Differences from PureJaxRL's ``ppo.py``: time-limit truncations bootstrap from V(final observation) instead of
being treated as terminations (PureJaxRL's CartPole ``done`` zeroes the value at step 500); the value loss clip
has its own ε (``vf_clip``, PureJaxRL reuses ``clip_eps``); the optional dual clip (off by default here, as in
PureJaxRL). Defaults are PureJaxRL's CartPole settings.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmx.envs import cartpole
from lmx.rl import advantages as adv_lib
from lmx.rl import losses

DEFAULTS = {
    "lr": 2.5e-4, "num_envs": 4, "num_steps": 128, "total_timesteps": 500_000, "update_epochs": 4,
    "num_minibatches": 4, "gamma": 0.99, "gae_lambda": 0.95, "clip_eps": 0.2, "vf_clip": 0.2,
    "dual_clip": None, "ent_coef": 0.01, "vf_coef": 0.5, "max_grad_norm": 0.5, "hidden": 64, "anneal_lr": True,
    "normalize_advantages": True, "eval_envs": 32, "eval_greedy": False,
}


def resolve_config(config: Mapping[str, Any] | None = None) -> dict:
  """PureJaxRL's CartPole defaults overridden by ``config`` (a dict or ConfigDict); unknown keys are an error."""
  config = dict(config.to_dict() if hasattr(config, "to_dict") else (config or {}))
  unknown = sorted(set(config) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"unknown PPO config field(s) {unknown}; known: {sorted(DEFAULTS)}")
  cfg = {**DEFAULTS, **config}
  batch = cfg["num_envs"] * cfg["num_steps"]
  if batch % cfg["num_minibatches"]:
    raise ValueError(f"num_envs·num_steps = {batch} must be divisible by num_minibatches={cfg['num_minibatches']}")
  cfg["num_updates"] = int(cfg["total_timesteps"]) // batch
  if cfg["num_updates"] < 1:
    raise ValueError(f"total_timesteps={cfg['total_timesteps']} is less than one rollout of {batch} steps")
  cfg["minibatch_size"] = batch // cfg["num_minibatches"]
  return cfg


def _dense(key, n_in, n_out, scale):
  return {"w": jax.nn.initializers.orthogonal(scale)(key, (n_in, n_out), jnp.float32),
          "b": jnp.zeros((n_out,), jnp.float32)}


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def init_params(key, obs_dim: int, num_actions: int, hidden: int = 64) -> dict:
  """Actor and critic MLPs (two tanh layers each), orthogonal init: √2 hidden, 0.01 policy head, 1 value head.

  Jitted: eagerly, the orthogonal init compiles op by op, several times slower than as one program."""
  k = jax.random.split(key, 6)
  s2 = float(np.sqrt(2))
  return {"actor": [_dense(k[0], obs_dim, hidden, s2), _dense(k[1], hidden, hidden, s2),
                    _dense(k[2], hidden, num_actions, 0.01)],
          "critic": [_dense(k[3], obs_dim, hidden, s2), _dense(k[4], hidden, hidden, s2),
                     _dense(k[5], hidden, 1, 1.0)]}


def _mlp(layers, x):
  for layer in layers[:-1]:
    x = jnp.tanh(x @ layer["w"] + layer["b"])
  return x @ layers[-1]["w"] + layers[-1]["b"]


def apply(params, obs_ND):
  """``(logits_NA, value_N)`` for observations ``[N, obs_dim]``."""
  return _mlp(params["actor"], obs_ND), _mlp(params["critic"], obs_ND)[..., 0]


def evaluate(params, key, num_envs: int = 32, greedy: bool = False, env=cartpole):
  """Return of the first episode of each of ``num_envs`` environments under the policy (sampled, or argmax
  when ``greedy``), run for ``env.MAX_STEPS`` steps; shape ``[num_envs]``."""
  k_reset, k_run = jax.random.split(key)
  obs, state = jax.vmap(env.reset)(jax.random.split(k_reset, num_envs))

  def body(carry, key_t):
    obs, state, ret, alive = carry
    logits, _ = apply(params, obs)
    k_act, k_env = jax.random.split(key_t)
    action = jnp.argmax(logits, -1) if greedy else jax.random.categorical(k_act, logits)
    obs, state, reward, done, _ = jax.vmap(env.step)(jax.random.split(k_env, num_envs), state, action)
    ret = ret + jnp.where(alive, reward, 0.0)
    return (obs, state, ret, alive & ~done), None

  init = (obs, state, jnp.zeros(num_envs), jnp.ones(num_envs, bool))
  (_, _, ret, _), _ = jax.lax.scan(body, init, jax.random.split(k_run, env.MAX_STEPS))
  return ret


def loss(params, batch, cfg):
  """The PPO loss of one minibatch (``obs``, ``action``, ``logp``, ``value``, ``advantage``, ``return``):
  clipped surrogate + ``vf_coef``·clipped value loss − ``ent_coef``·entropy, token-mean over the minibatch;
  advantages normalised per minibatch when ``normalize_advantages``. Returns ``(loss, metrics)``."""
  logits, value = apply(params, batch["obs"])
  logp_all = jax.nn.log_softmax(logits)
  logp = jnp.take_along_axis(logp_all, batch["action"][:, None], -1)[:, 0]
  adv = batch["advantage"]
  if cfg["normalize_advantages"]:
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
  pg, pg_m = losses.ppo_policy_loss(logp, batch["logp"], adv, clip_low=cfg["clip_eps"], dual_clip=cfg["dual_clip"])
  vf, _ = losses.value_loss(value, batch["value"], batch["return"], clip=cfg["vf_clip"])
  entropy = losses.entropy_from_logits(logits).mean()
  total = pg + cfg["vf_coef"] * vf - cfg["ent_coef"] * entropy
  return total, {"loss": total, "pg_loss": pg, "vf_loss": vf, "entropy": entropy,
                 "approx_kl": pg_m["ppo_kl"], "clipfrac": pg_m["clipfrac_high"] + pg_m["clipfrac_low"]}


def make_train(config: Mapping[str, Any] | None = None, env=cartpole):
  """A pure ``train(key) -> dict`` running PPO on ``env`` (a module with ``reset``/``step``/``OBS_DIM``/
  ``NUM_ACTIONS``/``MAX_STEPS``), for ``jax.jit`` and ``jax.vmap`` over keys.

  The result: ``params`` (final), ``metrics`` (per update: ``episode_return`` = mean return of the episodes that
  ended in that update's rollout, NaN if none; ``episodes``; ``loss``, ``pg_loss``, ``vf_loss``, ``entropy``,
  ``approx_kl``, ``clipfrac`` averaged over its minibatches) and ``eval_return`` (:func:`evaluate` of the final
  policy, ``[eval_envs]``; ``eval_envs=0`` skips it, which also saves its compile time).
  """
  cfg = resolve_config(config)
  n_env, n_steps, n_mb = cfg["num_envs"], cfg["num_steps"], cfg["num_minibatches"]
  n_updates, mb_size = cfg["num_updates"], cfg["minibatch_size"]

  def schedule(count):
    frac = 1.0 - (count // (n_mb * cfg["update_epochs"])) / n_updates
    return cfg["lr"] * frac

  tx = optax.chain(optax.clip_by_global_norm(cfg["max_grad_norm"]),
                   optax.adam(schedule if cfg["anneal_lr"] else cfg["lr"], eps=1e-5))

  loss_fn = functools.partial(loss, cfg=cfg)

  def train(key):
    k_init, k_reset, k_loop, k_eval = jax.random.split(key, 4)
    params = init_params(k_init, env.OBS_DIM, env.NUM_ACTIONS, cfg["hidden"])
    opt_state = tx.init(params)
    obs, env_state = jax.vmap(env.reset)(jax.random.split(k_reset, n_env))

    def env_step(carry, key_t):
      params, obs, env_state = carry
      k_act, k_env = jax.random.split(key_t)
      logits, value = apply(params, obs)
      action = jax.random.categorical(k_act, logits)
      logp = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], -1)[:, 0]
      next_obs, env_state, reward, done, info = jax.vmap(env.step)(jax.random.split(k_env, n_env), env_state,
                                                                  action)
      _, boot = apply(params, info["final_obs"])  # V(s_final): the bootstrap of a truncated step
      tr = {"obs": obs, "action": action, "logp": logp, "value": value, "reward": reward,
            "terminated": info["terminated"], "truncated": info["truncated"], "boot": boot, "done": done,
            "episode_return": info["episode_return"]}
      return (params, next_obs, env_state), tr

    def update(carry, key_u):
      params, opt_state, obs, env_state = carry
      k_roll, k_perm = jax.random.split(key_u)
      (_, obs, env_state), tr = jax.lax.scan(env_step, (params, obs, env_state), jax.random.split(k_roll, n_steps))
      _, last_value = apply(params, obs)
      adv, ret = adv_lib.gae(tr["reward"], tr["value"], last_value, tr["terminated"], tr["truncated"], tr["boot"],
                             gamma=cfg["gamma"], lam=cfg["gae_lambda"], time_axis=0)
      flat = {k: tr[k].reshape((n_steps * n_env,) + tr[k].shape[2:]) for k in ("obs", "action", "logp", "value")}
      flat["advantage"], flat["return"] = adv.reshape(-1), ret.reshape(-1)

      def epoch(carry, key_e):
        def minibatch(carry, mb):
          params, opt_state = carry
          grads, m = jax.grad(loss_fn, has_aux=True)(params, mb)
          updates, opt_state = tx.update(grads, opt_state, params)
          return (optax.apply_updates(params, updates), opt_state), m
        perm = jax.random.permutation(key_e, n_steps * n_env)
        mbs = jax.tree.map(lambda x: x[perm].reshape((n_mb, mb_size) + x.shape[1:]), flat)
        return jax.lax.scan(minibatch, carry, mbs)

      (params, opt_state), m = jax.lax.scan(epoch, (params, opt_state),
                                            jax.random.split(k_perm, cfg["update_epochs"]))
      m = jax.tree.map(jnp.mean, m)
      n_done = tr["done"].sum()
      m["episodes"] = n_done
      m["episode_return"] = jnp.where(n_done > 0, tr["episode_return"].sum() / jnp.maximum(n_done, 1), jnp.nan)
      return (params, opt_state, obs, env_state), m

    (params, _, _, _), metrics = jax.lax.scan(update, (params, opt_state, obs, env_state),
                                              jax.random.split(k_loop, n_updates))
    eval_return = (evaluate(params, k_eval, cfg["eval_envs"], cfg["eval_greedy"], env) if cfg["eval_envs"]
                   else jnp.zeros((0,)))
    return {"params": params, "metrics": metrics, "eval_return": eval_return}

  return train
