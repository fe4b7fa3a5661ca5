"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen 2021) in JAX, as used by MTT/DATM.

Strategy ``color_crop_cutout_flip_scale_rotate`` in 'S' mode: each call picks **one** group uniformly at random
for the whole batch, then draws its parameters per sample. All ops are pure functions of a key
and differentiable w.r.t. the images; shapes are preserved. Constants follow ``ParamDiffAug`` (the reference code's).
"""
from __future__ import annotations

import functools

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

GROUPS = ("color", "crop", "cutout", "flip", "scale", "rotate")
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
BRIGHTNESS, SATURATION, CONTRAST = 1.0, 2.0, 0.5
CROP_RATIO, CUTOUT_RATIO, SCALE_RATIO, ROTATE_DEG, FLIP_PROB = 0.125, 0.5, 1.2, 15.0, 0.5


def parse_strategy(strategy: str) -> tuple[str, ...]:
  """Splits 'color_crop_...' into groups, checking names; '' or 'none' means no augmentation."""
  if strategy in ("", "none"):
    return ()
  groups = tuple(strategy.split("_"))
  for g in groups:
    if g not in GROUPS:
      raise ValueError(f"data.dsa_strategy={strategy!r}: unknown group {g!r}; valid groups: {list(GROUPS)}")
  return groups


# Every DSA op is "resample with a per-sample affine map (pixel units, align_corners=True, zero padding), then a
# per-sample colour transform, then a cutout mask". Each group only sets its own parameters and leaves the rest at
# the identity, so the 'S' mode can select *parameters* by the random group index instead of branching on the
# images (no lax.switch in the differentiated graph: much faster to compile and run inside the meta-gradient).


def identity_params(n: int) -> dict[str, jax.Array]:
  """Per-sample parameters of the identity augmentation."""
  return {"A": jnp.broadcast_to(jnp.eye(2, dtype=jnp.float32), (n, 2, 2)), "t": jnp.zeros((n, 2), jnp.int32),
          "color": jnp.zeros((n,), bool), "b": jnp.zeros((n,)), "s": jnp.ones((n,)), "c": jnp.ones((n,)),
          "cut": jnp.zeros((n,), bool), "o": jnp.zeros((n, 2), jnp.int32)}


# All random numbers of one call come from a single uniform draw (N, 11): few RNG ops to compile.
_COLS = dict(b=0, s=1, c=2, tx=3, ty=4, ox=5, oy=6, flip=7, sx=8, sy=9, rot=10)


def _randint(u, lo, hi):
  """Integer in [lo, hi) from a uniform in [0, 1)."""
  return jnp.clip(jnp.floor(u * (hi - lo)).astype(jnp.int32) + lo, lo, hi - 1)


def group_params(group: str, u_NK: jax.Array, shape) -> dict[str, jax.Array]:
  """Parameters of one DSA group from per-sample uniforms ``u_NK`` (identity for everything else)."""
  n, h, w, _ = shape
  p = identity_params(n)
  col = lambda name: u_NK[:, _COLS[name]]
  if group == "color":
    p.update(color=jnp.ones((n,), bool), b=(col("b") - 0.5) * BRIGHTNESS, s=col("s") * SATURATION,
             c=col("c") + CONTRAST)
  elif group == "crop":  # out[h, w] = x[h + t_row, w + t_col], shift up to int(0.125·H + 0.5)
    sx, sy = int(h * CROP_RATIO + 0.5), int(w * CROP_RATIO + 0.5)
    p["t"] = jnp.stack([_randint(col("tx"), -sx, sx + 1), _randint(col("ty"), -sy, sy + 1)], -1)
  elif group == "cutout":
    cx, cy = int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)
    p["cut"] = jnp.ones((n,), bool)
    p["o"] = jnp.stack([_randint(col("ox"), 0, h + (1 - cx % 2)), _randint(col("oy"), 0, w + (1 - cy % 2))], -1)
  elif group == "flip":
    sign = jnp.where(col("flip") < FLIP_PROB, -1.0, 1.0)
    p["A"] = jnp.zeros((n, 2, 2)).at[:, 0, 0].set(sign).at[:, 1, 1].set(1.0)
  elif group == "scale":
    lo = 1.0 / SCALE_RATIO
    sx, sy = col("sx") * (SCALE_RATIO - lo) + lo, col("sy") * (SCALE_RATIO - lo) + lo
    p["A"] = jnp.zeros((n, 2, 2)).at[:, 0, 0].set(sx).at[:, 1, 1].set(sy)
  elif group == "rotate":
    ang = (col("rot") - 0.5) * 2.0 * ROTATE_DEG / 180.0 * math.pi
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    p["A"] = jnp.stack([jnp.stack([cos, -sin], -1), jnp.stack([sin, cos], -1)], 1)
  else:
    raise ValueError(f"unknown DSA group {group!r}")
  return p


def _groups(strategy) -> tuple[str, ...]:
  return parse_strategy(strategy) if isinstance(strategy, str) else tuple(strategy)


def draw(key: jax.Array, shape, strategy: str | Sequence[str] = DEFAULT_STRATEGY) -> dict[str, jax.Array]:
  """Random parameters of one 'S'-mode DSA call on a batch of ``shape``: one group for the whole batch, chosen
  uniformly, with per-sample parameters. Independent of the images, so it can be drawn outside a gradient."""
  groups = _groups(strategy)
  if not groups:
    return identity_params(shape[0])
  k_choice, k_op = jax.random.split(key)
  u_NK = jax.random.uniform(k_op, (shape[0], len(_COLS)), jnp.float32)
  if len(groups) == 1:
    return group_params(groups[0], u_NK, shape)
  choice = jax.random.randint(k_choice, (), 0, len(groups))
  cands = [group_params(g, u_NK, shape) for g in groups]
  return jax.tree.map(lambda *a: jnp.stack(a)[choice], *cands)


def resample(x_NHWC, a_N22, t_N2):
  """``grid_sample(x, affine_grid(θ), bilinear, align_corners=True, zeros)`` with θ = [A | 0] (A acts on (x, y)
  = (width, height) coordinates about the image centre), then an integer shift ``t`` = (rows, cols).

  Four-corner bilinear gather; exact for integer shifts and flips (weights 1/0), zero outside the image. (A
  separable two-einsum form avoids the scatter in the backward pass but was slower on CPU.)"""
  n, h, w, c = x_NHWC.shape
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  ii, jj = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
  u, v = (jj - cx).ravel(), (ii - cy).ravel()  # (P,)
  ratio = cx / cy if cy > 0 else 1.0
  px_NP = a_N22[:, 0, :1] * u + a_N22[:, 0, 1:] * v * ratio + cx + t_N2[:, 1:].astype(jnp.float32)
  py_NP = a_N22[:, 1, :1] * u / ratio + a_N22[:, 1, 1:] * v + cy + t_N2[:, :1].astype(jnp.float32)
  x0, y0 = jnp.floor(px_NP), jnp.floor(py_NP)
  flat_NPC = x_NHWC.reshape(n, h * w, c)
  out = 0.0
  for dx in (0, 1):
    for dy in (0, 1):
      xi, yi = x0 + dx, y0 + dy
      wgt = jnp.maximum(1.0 - jnp.abs(px_NP - xi), 0.0) * jnp.maximum(1.0 - jnp.abs(py_NP - yi), 0.0)
      ok = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
      idx = (jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).astype(jnp.int32)
      vals = jnp.take_along_axis(flat_NPC, idx[..., None], axis=1)
      out = out + vals * jnp.where(ok, wgt, 0.0).astype(x_NHWC.dtype)[..., None]
  return out.reshape(n, h, w, c)


def cutout_mask(shape, o_N2):
  """Mask (N, H, W, 1) zeroing a square of int(0.5·H + 0.5) pixels at offsets o, as DSA's clamped grid."""
  _, h, w, _ = shape
  cx, cy = int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)
  ox, oy = o_N2[:, 0], o_N2[:, 1]
  lo_x, lo_y = jnp.clip(ox - cx // 2, 0, h - 1), jnp.clip(oy - cy // 2, 0, w - 1)
  hi_x, hi_y = jnp.clip(ox - cx // 2 + cx - 1, 0, h - 1), jnp.clip(oy - cy // 2 + cy - 1, 0, w - 1)
  r, c = jnp.arange(h), jnp.arange(w)
  in_r = (r[None] >= lo_x[:, None]) & (r[None] <= hi_x[:, None])
  in_c = (c[None] >= lo_y[:, None]) & (c[None] <= hi_y[:, None])
  return ~(in_r[:, :, None] & in_c[:, None, :])[..., None]


def apply_params(x_NHWC, p: dict[str, jax.Array]):
  """Applies unified per-sample DSA parameters: resample → colour (where enabled) → cutout (where enabled)."""
  y = resample(x_NHWC, p["A"], p["t"])
  b, s, c = (p[k][:, None, None, None] for k in ("b", "s", "c"))
  z = y + b
  m = z.mean(axis=3, keepdims=True)
  z = (z - m) * s + m
  m = z.mean(axis=(1, 2, 3), keepdims=True)
  z = (z - m) * c + m
  y = jnp.where(p["color"][:, None, None, None], z, y)
  keep = cutout_mask(x_NHWC.shape, p["o"]) | ~p["cut"][:, None, None, None]
  return jnp.where(keep, y, 0.0)


def _op(group):
  def op(key, x_NHWC):
    return apply_params(x_NHWC, draw(key, x_NHWC.shape, (group,)))
  op.__name__ = group
  op.__doc__ = f"DSA '{group}' with per-sample parameters."
  return op


OPS: dict[str, Callable] = {g: _op(g) for g in GROUPS}
color, crop, cutout, flip, scale, rotate = (OPS[g] for g in GROUPS)


def augment(key: jax.Array, x_NHWC: jax.Array, strategy: str | Sequence[str] = DEFAULT_STRATEGY) -> jax.Array:
  """DSA 'S' mode on a batch: ``apply_params(x, draw(key, x.shape, strategy))``."""
  if not _groups(strategy):
    return x_NHWC
  return apply_params(x_NHWC, draw(key, x_NHWC.shape, strategy))


@functools.partial(jax.jit, static_argnames=("strategy",))
def augment_batches(keys_K: jax.Array, x_all: jax.Array, idx_KB: jax.Array, strategy: tuple[str, ...]) -> jax.Array:
  """K augmented minibatches (K, B, H, W, C): ``augment(keys_K[k], x_all[idx_KB[k]], strategy)``.

  Expert training and evaluation call this as its own jitted function before their SGD step, on purpose: traced
  into the step, XLA:CPU fuses the resampling into the convolutions' operands and recomputes it (slower per step,
  benchmarks/convnet_train_step.py; the results are bitwise the same either way).
  """
  return jax.vmap(lambda k, i: augment(k, x_all[i], strategy))(keys_K, idx_KB)

