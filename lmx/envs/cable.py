"""A 2-D cable-through-clips table in pure JAX: a position-based (PBD) cable, clips, a gripper, a rasteriser.

Why not MuJoCo: MuJoCo 4.0 renders headless here (``MUJOCO_GL=egl``, 64x64 works), but its XML schema rejects the
``<composite type="cable">`` element this task needs (4.0 removed it), and a MuJoCo step is a Python call per
environment, so demonstrations and evaluations could not be ``vmap``-ed and ``lax.scan``-ed with the policies. The
cable here is particles + hard segment-length constraints + a soft bending (minimum i..i+2 distance) constraint,
solved by PBD projection; quasi-static (no inertia: a table with friction). Everything is a pure, jittable
function of (layout, state, action, key) with static shapes.

The scene (top view, the table is [0, 1]^2):
  * the cable: ``N`` particles, particle 0 fixed at the anchor, particle ``N-1`` held by the gripper when grasped;
  * ``K`` clips, each two circular posts either side of a gate; clip k's channel direction is ``u_k``; the cable is
    *through* clip k when one of its segments crosses the gate (the segment between the two post centres); the
    task is to pass the clips in order (first-crossing segment index strictly increasing with k);
  * the gripper: a point moved by 2-D velocity actions in [-1, 1] (scaled by ``vmax``), pushed out of the posts.

Failure modes (what the recovery primitives exist for):
  * miss: the gripper passes a clip outside its gap, so the cable wraps a post without crossing the gate;
  * snag: while the cable slides through a passed clip (the first segment crossing its gate changes), with
    probability ``p_snag`` per such step the crossing particle catches on the clip (pinned) until the gripper comes
    back to it (moving against the clip's channel direction); pulling on a snagged cable stretches it;
  * slip: when the cable is stretched beyond ``slip_stretch`` (pulled taut around posts, or against a snag), it
    slips out of the gripper, which must regrasp the free end (automatic once the open gripper is back on it).

Layouts are a pure function of (split, index): ``layout_from_id(i)`` for training ids ``i < HELDOUT_BASE``,
held-out layouts are ids ``>= HELDOUT_BASE`` (disjoint random streams).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

HELDOUT_BASE = 1_000_000


class Params(NamedTuple):
  """Static scene and physics constants (hashable: a ``jit`` static argument)."""
  n: int = 28  # particles
  seg: float = 0.05  # rest segment length (cable length (n-1)*seg = 1.35)
  k: int = 3  # clips
  post_r: float = 0.025  # post radius
  gap: float = 0.045  # half distance between the two post centres of a clip (free gap 2*(gap-post_r) = 0.04)
  cable_r: float = 0.006  # cable half-width (collisions and drawing)
  vmax: float = 0.03  # gripper displacement per step at |action| = 1
  iters: int = 24  # PBD iterations per step
  bend_min: float = 1.5  # soft bending: |p_i - p_{i+2}| >= bend_min * seg
  bend_w: float = 0.3  # bending stiffness per iteration (0 = no bending)
  slip_stretch: float = 1.08  # total length / rest length above which the cable slips out of the gripper
  p_snag: float = 0.03  # probability that a step sliding the cable through a passed clip snags it
  release_r: float = 0.045  # the gripper within this of a snag, moving back, frees it
  grasp_r: float = 0.025  # the open gripper closes on the free end within this distance
  cooldown: int = 3  # steps after a slip before the gripper may close again
  approach: float = 0.075  # pre/post points at this distance before/after a gate along u_k


class Layout(NamedTuple):
  """One clip layout: the anchor and the clips (centres and unit channel directions)."""
  anchor: jax.Array  # (2,)
  clip_c_K2: jax.Array
  clip_u_K2: jax.Array


class State(NamedTuple):
  p_N2: jax.Array  # particle positions
  grip: jax.Array  # (2,) gripper position
  grasped: jax.Array  # bool
  pin: jax.Array  # int32 particle index of a snag, -1 when none
  pin_pos: jax.Array  # (2,)
  pin_clip: jax.Array  # int32 clip of the snag
  first_K: jax.Array  # int32: first segment crossing each gate after the previous step (N-1: none)
  cooldown: jax.Array  # int32
  t: jax.Array  # int32 step count


def _normal(u):
  return jnp.stack([-u[..., 1], u[..., 0]], -1)


def posts_of(layout: Layout, prm: Params) -> jax.Array:
  """Post centres (2K, 2): clip k's posts are rows 2k and 2k+1 (at c_k +- gap * n_k)."""
  n = _normal(layout.clip_u_K2)
  a = layout.clip_c_K2 + prm.gap * n
  b = layout.clip_c_K2 - prm.gap * n
  return jnp.stack([a, b], 1).reshape(-1, 2)


def make_layout(key: jax.Array, prm: Params = Params()) -> Layout:
  """A random layout: anchor at (0.06, 0.5); clip k at x ~ 0.42 + 0.22 k (+-0.03), y in [0.25, 0.75] with
  |y_k - y_{k-1}| <= 0.3, channel angle in +-35 deg around +x."""
  kx, ky, ka = jax.random.split(key, 3)
  xs = 0.42 + (0.86 - 0.42) * jnp.arange(prm.k) / max(prm.k - 1, 1)
  xs = xs + jax.random.uniform(kx, (prm.k,), minval=-0.03, maxval=0.03)
  steps = jax.random.uniform(ky, (prm.k,), minval=-0.3, maxval=0.3)

  def body(y, s):
    y2 = jnp.clip(y + s, 0.25, 0.75)
    return y2, y2

  _, ys = jax.lax.scan(body, jnp.float32(0.5), steps)
  ang = jax.random.uniform(ka, (prm.k,), minval=-math.radians(35), maxval=math.radians(35))
  u = jnp.stack([jnp.cos(ang), jnp.sin(ang)], -1)
  return Layout(jnp.array([0.06, 0.5], jnp.float32), jnp.stack([xs, ys], -1).astype(jnp.float32),
                u.astype(jnp.float32))


def layout_from_id(i, prm: Params = Params()) -> Layout:
  """Layout number ``i`` (training ids < HELDOUT_BASE; held-out ids >= HELDOUT_BASE): a pure function of i."""
  return make_layout(jax.random.fold_in(jax.random.key(17), i), prm)


def layouts(ids, prm: Params = Params()) -> Layout:
  """A batch of layouts (leading axis B) for integer ids (B,)."""
  return jax.vmap(lambda i: layout_from_id(i, prm))(jnp.asarray(ids, jnp.int32))


# ----------------------------------------------------------------------------------------------- geometry

def segments_cross(a0, a1, b0, b1):
  """Whether segments a0-a1 and b0-b1 properly intersect (broadcasting over leading axes)."""
  def orient(p, q, r):
    return (q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1]) - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0])

  d1, d2 = orient(b0, b1, a0), orient(b0, b1, a1)
  d3, d4 = orient(a0, a1, b0), orient(a0, a1, b1)
  return (d1 * d2 < 0) & (d3 * d4 < 0)


def gate_crossings(p_N2: jax.Array, layout: Layout, prm: Params) -> jax.Array:
  """(K, N-1) bool: segment i of the cable crosses clip k's gate (post centre to post centre)."""
  posts = posts_of(layout, prm).reshape(prm.k, 2, 2)
  a0, a1 = p_N2[:-1][None], p_N2[1:][None]
  return segments_cross(a0, a1, posts[:, 0][:, None], posts[:, 1][:, None])


def progress(p_N2: jax.Array, layout: Layout, prm: Params) -> jax.Array:
  """Number of leading clips the cable passes in order (0..K): clip k counts when clips 0..k are crossed and the
  first-crossing segment indices increase strictly."""
  return _progress_from_first(first_crossings(p_N2, layout, prm), prm)


def first_crossings(p_N2, layout: Layout, prm: Params) -> jax.Array:
  """(K,) int32: the first segment index crossing each gate, N-1 when none."""
  c = gate_crossings(p_N2, layout, prm)
  return jnp.where(c.any(-1), jnp.argmax(c, -1), prm.n - 1).astype(jnp.int32)


def _progress_from_first(first, prm: Params):
  prev = jnp.concatenate([jnp.array([-1], jnp.int32), first[:-1]])
  ok = (first < prm.n - 1) & (first > prev)
  return jnp.cumprod(ok.astype(jnp.int32)).sum().astype(jnp.int32)


def stretch(p_N2: jax.Array, prm: Params) -> jax.Array:
  """Total cable length over rest length."""
  return jnp.linalg.norm(p_N2[1:] - p_N2[:-1], axis=-1).sum() / (prm.seg * (prm.n - 1))


def push_out(x, posts_P2, r):
  """Points x (2,) projected out of discs of radius r at posts_P2 (the posts do not overlap: one push each)."""
  d = x[None] - posts_P2
  dist = jnp.linalg.norm(d, axis=-1)
  pen = jnp.maximum(r - dist, 0.0)
  dirn = d / jnp.maximum(dist, 1e-9)[:, None]
  return x + (pen[:, None] * dirn).sum(0)


def _fix(p, w, anchor, grip, grasped, pin, pin_pos):
  n = p.shape[0]
  idx = jnp.arange(n)
  p = p.at[0].set(anchor)
  p = jnp.where(((idx == n - 1) & grasped)[:, None], grip[None], p)
  p = jnp.where((idx == pin)[:, None], pin_pos[None], p)
  return p


def pbd_solve(p_N2, anchor, grip, grasped, pin, pin_pos, posts_P2, prm: Params):
  """PBD projection: fixed points (anchor, held end, snag), segment lengths (red-black Gauss-Seidel), soft
  bending, segment-post collisions, table bounds; ``prm.iters`` iterations."""
  n = prm.n
  idx = jnp.arange(n)
  w = jnp.ones(n).at[0].set(0.0)
  w = jnp.where((idx == n - 1) & grasped, 0.0, w)
  w = jnp.where(idx == pin, 0.0, w)
  rad = prm.post_r + prm.cable_r

  def dist_pass(p, parity):
    i = jnp.arange(n - 1)
    m = (i % 2 == parity).astype(p.dtype)
    d = p[1:] - p[:-1]
    ln = jnp.linalg.norm(d, axis=-1)
    wi, wj = w[:-1], w[1:]
    ws = jnp.maximum(wi + wj, 1e-9)
    corr = (m * (ln - prm.seg) / jnp.maximum(ln, 1e-9) / ws)[:, None] * d
    dp = jnp.zeros_like(p).at[:-1].add(wi[:, None] * corr).at[1:].add(-wj[:, None] * corr)
    return p + dp

  def bend_pass(p):
    d = p[2:] - p[:-2]
    ln = jnp.linalg.norm(d, axis=-1)
    wi, wj = w[:-2], w[2:]
    ws = jnp.maximum(wi + wj, 1e-9)
    short = (ln < prm.bend_min * prm.seg).astype(p.dtype)
    corr = (prm.bend_w * 0.5 * short * (ln - prm.bend_min * prm.seg) / jnp.maximum(ln, 1e-9) / ws)[:, None] * d
    dp = jnp.zeros_like(p).at[:-2].add(wi[:, None] * corr).at[2:].add(-wj[:, None] * corr)
    return p + dp

  def collide(p):  # every segment against every post at once (Jacobi over posts)
    a, b = p[:-1], p[1:]
    ab = b - a
    c = posts_P2[:, None]  # (P, 1, 2)
    t = jnp.clip(((c - a[None]) * ab[None]).sum(-1) / jnp.maximum((ab * ab).sum(-1), 1e-12)[None], 0.0, 1.0)
    q = a[None] + t[..., None] * ab[None]  # (P, S, 2)
    d = q - c
    dist = jnp.linalg.norm(d, axis=-1)
    pen = jnp.maximum(rad - dist, 0.0)
    dirn = d / jnp.maximum(dist, 1e-9)[..., None]
    wa, wb = w[:-1][None] * (1 - t), w[1:][None] * t
    s = jnp.maximum(wa * (1 - t) + wb * t, 1e-9)
    push = ((pen / s)[..., None] * dirn)
    dpa, dpb = (wa[..., None] * push).sum(0), (wb[..., None] * push).sum(0)
    return p + jnp.zeros_like(p).at[:-1].add(dpa).at[1:].add(dpb)

  def it(p, _):
    p = dist_pass(p, 0)
    p = dist_pass(p, 1)
    p = bend_pass(p)
    p = collide(p)
    p = jnp.clip(p, 0.0, 1.0)
    p = _fix(p, w, anchor, grip, grasped, pin, pin_pos)
    return p, None

  p = _fix(p_N2, w, anchor, grip, grasped, pin, pin_pos)
  p, _ = jax.lax.scan(it, p, None, length=prm.iters)
  return p


# ----------------------------------------------------------------------------------------------- dynamics

def initial_cable(key, layout: Layout, prm: Params) -> jax.Array:
  """A meander from the anchor: headings alternate +-84 deg (jittered) around +x every 5 segments."""
  groups = (jnp.arange(prm.n - 1) // 5) % 2
  base = jnp.where(groups == 0, math.radians(84), -math.radians(84))
  jit_ = jax.random.uniform(key, (prm.n - 1,), minval=-0.1, maxval=0.1)
  th = base + jit_
  d = prm.seg * jnp.stack([jnp.cos(th), jnp.sin(th)], -1)
  return jnp.concatenate([layout.anchor[None], layout.anchor[None] + jnp.cumsum(d, 0)], 0)


def reset(key: jax.Array, layout: Layout, prm: Params = Params()) -> State:
  """The cable in a jittered meander by the anchor, settled, held at its free end."""
  p = initial_cable(key, layout, prm)
  posts = posts_of(layout, prm)
  p = pbd_solve(p, layout.anchor, p[-1], jnp.bool_(False), jnp.int32(-1), jnp.zeros(2), posts, prm)
  return State(p, p[-1], jnp.bool_(True), jnp.int32(-1), jnp.zeros(2), jnp.int32(0),
               first_crossings(p, layout, prm), jnp.int32(0), jnp.int32(0))


def step(key: jax.Array, layout: Layout, state: State, action: jax.Array, prm: Params = Params()):
  """One control step: ``action`` (2,) in [-1, 1] moves the gripper by ``action * vmax``. Returns
  ``(state, info)`` with ``info`` = progress, stretch, slipped, snagged (events of this step)."""
  posts = posts_of(layout, prm)
  a = jnp.clip(action, -1.0, 1.0)
  g = jnp.clip(state.grip + a * prm.vmax, 0.0, 1.0)
  g = push_out(g, posts, prm.post_r + 0.004)
  close = (~state.grasped) & (state.cooldown == 0) & (jnp.linalg.norm(g - state.p_N2[-1]) < prm.grasp_r)
  grasped = state.grasped | close
  # snag release: the gripper back at the snag, moving against the clip's channel direction
  u_pin = layout.clip_u_K2[jnp.clip(state.pin_clip, 0, prm.k - 1)]
  release = (state.pin >= 0) & (jnp.linalg.norm(g - state.pin_pos) < prm.release_r) & (
      ((g - state.grip) * u_pin).sum() < 0)
  pin = jnp.where(release, -1, state.pin)
  p = pbd_solve(state.p_N2, layout.anchor, g, grasped, pin, state.pin_pos, posts, prm)
  s = stretch(p, prm)
  slipped = grasped & (s > prm.slip_stretch)
  grasped = grasped & ~slipped
  cooldown = jnp.where(slipped, prm.cooldown, jnp.maximum(state.cooldown - 1, 0))
  # snag: while the cable slides through a passed clip (its first-crossing segment changes), it may catch there
  first = first_crossings(p, layout, prm)
  ok = jnp.cumprod(((first < prm.n - 1) & (first > jnp.concatenate([jnp.array([-1]), first[:-1]]))).astype(
      jnp.int32)).astype(bool)
  slid = ok & (state.first_K < prm.n - 1) & (first != state.first_K)
  kk = jnp.argmax(slid).astype(jnp.int32)
  cand = first[kk]
  u = jax.random.uniform(key)
  snag = (pin < 0) & slid.any() & grasped & (u < prm.p_snag) & (cand >= 1) & (cand <= prm.n - 2)
  pin_pos = jnp.where(snag, p[jnp.clip(cand, 0, prm.n - 1)], state.pin_pos)
  pin_clip = jnp.where(snag, kk, state.pin_clip).astype(jnp.int32)
  pin = jnp.where(snag, cand, pin).astype(jnp.int32)
  new_state = State(p, g, grasped, pin, pin_pos, pin_clip, first, cooldown.astype(jnp.int32), state.t + 1)
  info = dict(progress=_progress_from_first(first, prm), stretch=s, slipped=slipped, snagged=snag, released=release)
  return new_state, info


# ----------------------------------------------------------------------------------------------- rendering

def render(state: State, layout: Layout, center, half: float, res: int, prm: Params = Params()) -> jax.Array:
  """A (res, res, 3) float32 image in [0, 1] of the square ``center +- half``: red = cable (and anchor), green =
  clip posts, blue = gripper (a filled disc when grasping, a ring when open). Row 0 is the top (max y)."""
  px = 2 * half / res
  lin = (jnp.arange(res) + 0.5) / res * 2 * half - half
  xs = center[0] + lin
  ys = center[1] - lin
  P = jnp.stack(jnp.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)  # (res*res, 2), row-major from the top
  a, b = state.p_N2[:-1], state.p_N2[1:]
  ab = b - a
  t = jnp.clip(((P[:, None] - a[None]) * ab[None]).sum(-1) / jnp.maximum((ab * ab).sum(-1), 1e-12)[None], 0, 1)
  q = a[None] + t[..., None] * ab[None]
  dc = jnp.linalg.norm(P[:, None] - q, axis=-1).min(-1)
  da = jnp.linalg.norm(P - layout.anchor[None], axis=-1)
  cable = jnp.maximum(jnp.clip(1 - (dc - prm.cable_r) / px, 0, 1), jnp.clip(1 - (da - 0.015) / px, 0, 1))
  dp = (jnp.linalg.norm(P[:, None] - posts_of(layout, prm)[None], axis=-1) - prm.post_r).min(-1)
  posts = jnp.clip(1 - dp / px, 0, 1)
  dg = jnp.linalg.norm(P - state.grip[None], axis=-1)
  disc = jnp.clip(1 - (dg - 0.018) / px, 0, 1)
  ring = jnp.clip(1 - jnp.abs(dg - 0.018) / px, 0, 1)
  grip = jnp.where(state.grasped, disc, ring)
  return jnp.stack([cable, posts, grip], -1).reshape(res, res, 3).astype(jnp.float32)


def render_top(state: State, layout: Layout, res: int = 32, prm: Params = Params()) -> jax.Array:
  """The whole table from above, (res, res, 3)."""
  return render(state, layout, jnp.array([0.5, 0.5]), 0.5, res, prm)


def render_wrist(state: State, layout: Layout, res: int = 32, half: float = 0.12, prm: Params = Params()):
  """A wrist-like close-up centred on the gripper (``half`` = 0.12: a 0.24-wide window), (res, res, 3)."""
  return render(state, layout, state.grip, half, res, prm)
