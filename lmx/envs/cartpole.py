"""CartPole-v1 in pure JAX (the classic Barto–Sutton–Anderson cart-pole, gymnasium/gymnax constants).

``reset(key) -> (obs, state)`` and ``step(key, state, action) -> (obs, state, reward, done, info)`` are pure and
jittable; ``vmap`` them for a batch of environments. Dynamics: explicit Euler (gymnasium's default "euler"
integrator) with τ = 0.02 s. The episode terminates when |x| > 2.4 or |θ| > 12°, and is truncated after 500 steps
(the v1 time limit). Reward 1 on every step, the terminating one included.

``step`` auto-resets: when ``done = terminated ∨ truncated`` the returned ``obs``/``state`` are a fresh episode's,
and ``info`` keeps what a learner needs to bootstrap correctly:
  ``terminated``, ``truncated``   the two reasons, separately (termination wins the bootstrap: no future value)
  ``final_obs``                   the observation the step really reached (before the reset)
  ``episode_return``, ``episode_length``   of the episode that ended at this step (0 when not done)
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

GRAVITY = 9.8
MASS_CART = 1.0
MASS_POLE = 0.1
TOTAL_MASS = MASS_CART + MASS_POLE
HALF_LENGTH = 0.5  # "length" in gymnasium: half the pole's length
POLE_MASS_LENGTH = MASS_POLE * HALF_LENGTH
FORCE_MAG = 10.0
TAU = 0.02
THETA_LIMIT = 12 * 2 * math.pi / 360
X_LIMIT = 2.4
MAX_STEPS = 500
OBS_DIM = 4
NUM_ACTIONS = 2


class State(NamedTuple):
  """The physical state plus the step count and running return of the current episode."""
  x: jax.Array
  x_dot: jax.Array
  theta: jax.Array
  theta_dot: jax.Array
  time: jax.Array
  episode_return: jax.Array


def observation(state: State) -> jax.Array:
  """``[x, ẋ, θ, θ̇]`` as float32."""
  return jnp.stack([state.x, state.x_dot, state.theta, state.theta_dot]).astype(jnp.float32)


def reset(key) -> tuple[jax.Array, State]:
  """A fresh episode: the four state variables uniform in [−0.05, 0.05]."""
  s = jax.random.uniform(key, (4,), jnp.float32, -0.05, 0.05)
  state = State(s[0], s[1], s[2], s[3], jnp.int32(0), jnp.float32(0.0))
  return observation(state), state


def dynamics(state: State, action) -> State:
  """One Euler step of the cart-pole equations for action 0 (push left) or 1 (push right); ``time`` + 1."""
  force = jnp.where(action == 1, FORCE_MAG, -FORCE_MAG)
  cos, sin = jnp.cos(state.theta), jnp.sin(state.theta)
  temp = (force + POLE_MASS_LENGTH * state.theta_dot ** 2 * sin) / TOTAL_MASS
  theta_acc = (GRAVITY * sin - cos * temp) / (HALF_LENGTH * (4.0 / 3.0 - MASS_POLE * cos ** 2 / TOTAL_MASS))
  x_acc = temp - POLE_MASS_LENGTH * theta_acc * cos / TOTAL_MASS
  return State(x=state.x + TAU * state.x_dot, x_dot=state.x_dot + TAU * x_acc,
               theta=state.theta + TAU * state.theta_dot, theta_dot=state.theta_dot + TAU * theta_acc,
               time=state.time + 1, episode_return=state.episode_return)


def is_terminal(state: State) -> jax.Array:
  """The pole fell (|θ| > 12°) or the cart left the track (|x| > 2.4)."""
  return (jnp.abs(state.x) > X_LIMIT) | (jnp.abs(state.theta) > THETA_LIMIT)


def step(key, state: State, action) -> tuple[jax.Array, State, jax.Array, jax.Array, dict]:
  """One step with auto-reset; see the module docstring for ``info``. ``key`` draws the reset state."""
  nxt = dynamics(state, action)
  reward = jnp.float32(1.0)
  nxt = nxt._replace(episode_return=state.episode_return + reward)
  terminated = is_terminal(nxt)
  truncated = nxt.time >= MAX_STEPS
  done = terminated | truncated
  final_obs = observation(nxt)
  reset_obs, reset_state = reset(key)
  new_state = jax.tree.map(lambda a, b: jnp.where(done, a, b), reset_state, nxt)
  obs = jnp.where(done, reset_obs, final_obs)
  info = {"terminated": terminated, "truncated": truncated, "final_obs": final_obs,
          "episode_return": jnp.where(done, nxt.episode_return, 0.0),
          "episode_length": jnp.where(done, nxt.time, 0)}
  return obs, new_state, reward, done, info
