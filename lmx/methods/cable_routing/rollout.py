"""Episodes as ``lax.scan``: hierarchical (a selector picks a primitive every ``T`` steps, ``D`` decisions) or flat
(one policy for the same ``D*T`` steps); ``vmap`` over layouts. The same code collects demonstrations (oracle selector,
scripted primitives, action noise, clean labels) and evaluates the learned policies.

Selector: ``select(d, top, wrist, grasped, hist_H, state, layout, key) -> prim`` (int32; -1 = idle).
Route:    ``route(top, wrist, grasped, state, layout, k, key) -> action (2,)`` (``k``: the clip at the decision; a
          learned route ignores it).
Flat:     ``flat(top, wrist, grasped, state, layout, key) -> action (2,)``.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lmx.envs import cable
from lmx.methods.cable_routing import primitives as P


class EpisodeCfg(NamedTuple):
  decisions: int = 12  # D
  steps: int = 12  # T per primitive
  res: int = 32
  wrist_half: float = 0.12
  action_sigma: float = 0.0  # executed action = label + N(0, sigma) (demonstrations)
  goto_sigma: float = 0.015  # GOTO's arrival error (lateral, per call)
  history: int = 6  # H


def observe(state, layout, ec: EpisodeCfg, prm):
  top = cable.render_top(state, layout, ec.res, prm)
  wrist = cable.render_wrist(state, layout, ec.res, ec.wrist_half, prm)
  return top, wrist


def _u8(x):
  return jnp.round(x * 255).astype(jnp.uint8)


def hier_episode(key, layout, select, route, prm: cable.Params, ec: EpisodeCfg):
  """One hierarchical episode. Returns (final state, per-decision record, per-step record)."""
  return _episode(key, layout, select, route, None, False, ec.action_sigma, prm, ec)


def _episode(key, layout, select, route, flat_fn, flat, action_sigma, prm: cable.Params, ec: EpisodeCfg):
  k_reset, k_run = jax.random.split(key)
  state = cable.reset(k_reset, layout, prm)
  hist = jnp.zeros(ec.history, jnp.int32)

  def decision(carry, d):
    state, hist = carry
    kd = jax.random.fold_in(k_run, d)
    k_sel, k_off, k_steps = jax.random.split(kd, 3)
    top, wrist = observe(state, layout, ec, prm)
    k0 = cable.progress(state.p_N2, layout, prm)
    done0 = k0 >= prm.k
    prim = select(d, top, wrist, state.grasped, hist, state, layout, k_sel)
    oracle = P.oracle_select(layout, state, prm)
    prim = jnp.where(done0, -1, prim).astype(jnp.int32)
    offset = ec.goto_sigma * jax.random.normal(k_off)

    def inner(st, t):
      ks = jax.random.fold_in(k_steps, t)
      k_env, k_noise, k_pol = jax.random.split(ks, 3)
      top_t, wrist_t = observe(st, layout, ec, prm)
      done = cable.progress(st.p_N2, layout, prm) >= prm.k
      def hier_a():
        a_route = route(top_t, wrist_t, st.grasped, st, layout, k0, k_pol)
        a_scr = P.expert_action(jnp.clip(prim, 0, P.NUM_PRIMS - 1), layout, st, k0, offset, prm)
        return jnp.where(prim == P.ROUTE, a_route, a_scr)

      if flat_fn is None:
        a = hier_a()
        active = (prim >= 0) & ~done
      else:
        a = jax.lax.cond(flat > 0, lambda: flat_fn(top_t, wrist_t, st.grasped, st, layout, k_pol), hier_a)
        active = ((prim >= 0) | (flat > 0)) & ~done
      a = jnp.where(active, a, 0.0)
      a_exec = jnp.clip(a + action_sigma * jax.random.normal(k_noise, (2,)), -1, 1)
      a_exec = jnp.where(active, a_exec, 0.0)
      st2, info = cable.step(k_env, layout, st, a_exec, prm)
      rec = dict(top=_u8(top_t), wrist=_u8(wrist_t), grasped=st.grasped, action=a, prim=prim, active=active,
                 progress=info["progress"], slipped=info["slipped"], snagged=info["snagged"])
      return st2, rec

    state2, steps = jax.lax.scan(inner, state, jnp.arange(ec.steps))
    hist2 = jnp.where(prim >= 0, jnp.concatenate([hist[1:], (prim + 1)[None]]), hist)
    drec = dict(top=_u8(top), wrist=_u8(wrist), grasped=state.grasped, hist=hist, prim=prim, oracle=oracle,
                active=~done0, progress=cable.progress(state2.p_N2, layout, prm))
    return (state2, hist2), (drec, steps)

  (state, _), (drec, srec) = jax.lax.scan(decision, (state, hist), jnp.arange(ec.decisions))
  srec = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), srec)
  if flat_fn is not None:
    return cable.progress(state.p_N2, layout, prm), drec, srec
  return state, drec, srec


# ------------------------------------------------------------------------------------- scripted selectors

def oracle_selector(prm):
  def select(d, top, wrist, grasped, hist, state, layout, key):
    return P.oracle_select(layout, state, prm)
  return select


def fixed_order_selector(prm):
  """GOTO, ROUTE for each clip in turn, then idle: the primitive chain without recovery."""
  def select(d, top, wrist, grasped, hist, state, layout, key):
    return jnp.where(d < 2 * prm.k, jnp.where(d % 2 == 0, P.GOTO, P.ROUTE), -1).astype(jnp.int32)
  return select


def expert_route_fn(prm):
  def route(top, wrist, grasped, state, layout, k, key):
    return P.expert_route(layout, state, k, prm)
  return route


def stage_success(final_progress_B, k: int):
  """Fraction of episodes whose cable passes at least clips 0..j in order, j = 0..K-1 (K numbers)."""
  return [float((final_progress_B >= j + 1).mean()) for j in range(k)]


# ------------------------------------------------------------------------------- one function for every arm

SEL_ORACLE, SEL_LEARNED, SEL_FIXED = 0, 1, 2


def learned_action(bc_p, top, wrist, grasped):
  """The deterministic action tanh(mean) of a BC policy on one observation."""
  from lmx.methods.cable_routing import policy as pol

  mean, _ = pol.bc_apply(bc_p, [top[None], wrist[None]], grasped.astype(jnp.float32)[None, None])
  return jnp.tanh(mean[0])


def learned_primitive(sel_p, enc_p, top, wrist, grasped, hist):
  """argmax of the selector on frozen features of ``enc_p`` (a BC policy's encoders)."""
  from lmx.methods.cable_routing import policy as pol

  f = jax.lax.stop_gradient(pol.features(enc_p, [top[None], wrist[None]], grasped.astype(jnp.float32)[None, None]))
  return pol.selector_apply(sel_p, f, hist[None])[0].argmax().astype(jnp.int32)


def episode(key, layout, nets, modes, action_sigma, prm: cable.Params, ec: EpisodeCfg):
  """One episode of any arm. ``nets`` = dict(route, flat, sel) parameter pytrees (the selector's features come from
  the flat policy's encoders); ``modes`` = (sel_mode, route_learned, flat) int32 scalars, *not* batched under vmap
  so their ``lax.switch``/``cond`` stay branches (only the arm's networks run). Returns (final progress, decision
  record, step record)."""
  sel_mode, route_learned, flat = modes
  oracle, fixed = oracle_selector(prm), fixed_order_selector(prm)
  exp_route = expert_route_fn(prm)

  def select(d, top, wrist, grasped, hist, state, layout, key):
    return jax.lax.switch(sel_mode, [
        lambda: oracle(d, top, wrist, grasped, hist, state, layout, key),
        lambda: learned_primitive(nets["sel"], nets["flat"], top, wrist, grasped, hist),
        lambda: fixed(d, top, wrist, grasped, hist, state, layout, key)])

  def route(top, wrist, grasped, state, layout, k, key):
    return jax.lax.cond(route_learned > 0, lambda: learned_action(nets["route"], top, wrist, grasped),
                        lambda: exp_route(top, wrist, grasped, state, layout, k, key))

  def flat_fn(top, wrist, grasped, state, layout, key):
    return learned_action(nets["flat"], top, wrist, grasped)

  return _episode(key, layout, select, route, flat_fn, flat, action_sigma, prm, ec)
