"""Scripted primitives (the demonstrator) and the privileged high-level oracle (the corrector).

Primitive classes (the selector's 4 outputs; history tokens are class + 1, 0 = padding, as in the released code's
vocabulary of 5):
  ROUTE    (learned at test time) from the pre-point of the next clip, line up with the gap and pass through it to
           the post-point, then hold;
  PERTURB  go back to a snag (against the clip's channel direction), which frees it; with no snag, back off;
  REGRASP  go to the free end of the cable (the open gripper closes on it);
  GOTO     "move to next clip": to the pre-point of the first clip not yet passed (with an arrival error drawn per
           call, the primitive's imprecision).
"""
from __future__ import annotations

import jax.numpy as jnp

from lmx.envs import cable

ROUTE, PERTURB, REGRASP, GOTO = 0, 1, 2, 3
NAMES = ("route", "perturb", "regrasp", "goto")
NUM_PRIMS = 4


def _toward(target, g, prm: cable.Params, gain: float = 1.0):
  return jnp.clip(gain * (target - g) / prm.vmax, -1.0, 1.0) * 0.95


def clip_frame(layout: cable.Layout, k):
  kk = jnp.clip(k, 0, layout.clip_c_K2.shape[0] - 1)
  c, u = layout.clip_c_K2[kk], layout.clip_u_K2[kk]
  return c, u, jnp.stack([-u[1], u[0]])


def pre_point(layout, k, prm: cable.Params):
  c, u, _ = clip_frame(layout, k)
  return c - prm.approach * u


def expert_route(layout, state: cable.State, k, prm: cable.Params):
  """Line up with clip k's gap (lateral error -> 0) while advancing along u_k; hold at the post-point."""
  c, u, n = clip_frame(layout, k)
  g = state.grip
  s, l = ((g - c) * u).sum(), ((g - c) * n).sum()
  fwd = 0.03 * jnp.clip(1.0 - jnp.abs(l) / 0.03, 0.25, 1.0)
  s_t = jnp.where(s < prm.approach, jnp.minimum(s + fwd, prm.approach + 0.005), prm.approach + 0.005)
  target = c + u * s_t
  return _toward(target, g, prm)


def expert_perturb(layout, state: cable.State, k, prm: cable.Params):
  c, u, _ = clip_frame(layout, k)
  u_pin = layout.clip_u_K2[jnp.clip(state.pin_clip, 0, prm.k - 1)]
  t_pin = state.pin_pos + 0.01 * u_pin
  t_none = state.grip - 0.06 * u
  return _toward(jnp.where(state.pin >= 0, t_pin, t_none), state.grip, prm)


def expert_regrasp(layout, state: cable.State, k, prm: cable.Params):
  del layout, k
  return _toward(state.p_N2[-1], state.grip, prm)


def expert_goto(layout, state: cable.State, k, offset, prm: cable.Params):
  _, _, n = clip_frame(layout, k)
  return _toward(pre_point(layout, k, prm) + offset * n, state.grip, prm)


def expert_action(prim, layout, state: cable.State, k, offset, prm: cable.Params):
  """The scripted action of primitive ``prim`` (int) at ``state`` for clip ``k`` (the first clip not yet passed
  when the primitive started: fixed for its duration)."""
  acts = jnp.stack([expert_route(layout, state, k, prm), expert_perturb(layout, state, k, prm),
                    expert_regrasp(layout, state, k, prm), expert_goto(layout, state, k, offset, prm)])
  return acts[jnp.clip(prim, 0, NUM_PRIMS - 1)]


def oracle_select(layout, state: cable.State, prm: cable.Params, at_tol: float = 0.035):
  """The correct next primitive from the privileged state: regrasp when the cable is out of the gripper, perturb
  on a snag, route when at the next clip's pre-point, else go to it."""
  k = cable.progress(state.p_N2, layout, prm)
  at_pre = jnp.linalg.norm(state.grip - pre_point(layout, k, prm)) < at_tol
  return jnp.where(~state.grasped, REGRASP,
                   jnp.where(state.pin >= 0, PERTURB, jnp.where(at_pre, ROUTE, GOTO))).astype(jnp.int32)
