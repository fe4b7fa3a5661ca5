"""The networks and losses, as pure functions of parameter pytrees (the released code's shapes, scaled down).

* ``encoder``: a small ResNet per view, GroupNorm instead of BatchNorm, the residual branch's last norm initialised
  to zero scale, global average pooling (the released code: ResNet-18, GroupNorm(32), 512-d per view).
* ``bc``: per-view encoders + a projection of the robot state (here the grasp flag; the released code: the tool's
  z) -> MLP -> mean and log-std of a tanh-squashed diagonal Gaussian over the action; trained by its negative
  log-likelihood with the tanh log-det (``tanh_gaussian_logprob``), log-std clipped to [-20, 2], actions to +-0.99.
* ``selector``: frozen image features + an embedding of the last H primitive ids (0 = padding, id = class + 1)
  -> Dense+ReLU each, concatenated -> Dense -> logits over the primitives; softmax cross-entropy.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0
ACTION_CLIP = 0.99


# ----------------------------------------------------------------------------------------------- losses

def tanh_gaussian_logprob(mean_BA, log_std_BA, a_BA):
  """log pi(a) of a = tanh(u), u ~ N(mean, exp(log_std)^2) (diagonal), summed over A: the Gaussian log-density of
  u = atanh(a) minus sum log(1 - a^2) (the tanh log-det). log_std is clipped to [-20, 2], a to +-0.99."""
  log_std = jnp.clip(log_std_BA, LOG_STD_MIN, LOG_STD_MAX)
  a = jnp.clip(a_BA, -ACTION_CLIP, ACTION_CLIP)
  u = jnp.arctanh(a)
  z = (u - mean_BA) * jnp.exp(-log_std)
  logn = -0.5 * z * z - log_std - 0.5 * math.log(2 * math.pi)
  return (logn - jnp.log1p(-a * a)).sum(-1)


def bc_nll_loss(mean_BA, log_std_BA, a_BA, mask_B=None):
  """-mean log pi(a|s) over the (masked) batch, and the MSE of the deterministic action tanh(mean)."""
  lp = tanh_gaussian_logprob(mean_BA, log_std_BA, a_BA)
  mse = ((jnp.tanh(mean_BA) - jnp.clip(a_BA, -ACTION_CLIP, ACTION_CLIP)) ** 2).sum(-1)
  m = jnp.ones_like(lp) if mask_B is None else mask_B.astype(lp.dtype)
  den = jnp.maximum(m.sum(), 1.0)
  return -(lp * m).sum() / den, (mse * m).sum() / den


def selection_loss(logits_BC, labels_B, mask_B=None):
  """Softmax cross-entropy of the demonstrated (or corrected) primitive, and the accuracy."""
  logp = jax.nn.log_softmax(logits_BC)
  nll = -jnp.take_along_axis(logp, labels_B[:, None], -1)[:, 0]
  acc = (logits_BC.argmax(-1) == labels_B).astype(jnp.float32)
  m = jnp.ones_like(nll) if mask_B is None else mask_B.astype(nll.dtype)
  den = jnp.maximum(m.sum(), 1.0)
  return (nll * m).sum() / den, (acc * m).sum() / den


# ----------------------------------------------------------------------------------------------- layers

def _normal(key, shape):
  """``jax.random.normal(key, shape)`` (the same values) drawn flat: XLA's CPU compile of a many-dimensional
  random draw is far slower than of a flat one."""
  return jax.random.normal(key, (math.prod(shape),)).reshape(shape)


def _dense_init(key, din, dout, scale=1.0):
  return dict(w=_normal(key, (din, dout)) * scale * math.sqrt(1.0 / din), b=jnp.zeros(dout))


def _dense(p, x):
  return x @ p["w"] + p["b"]


def _conv_init(key, k, cin, cout):
  return _normal(key, (k, k, cin, cout)) * math.sqrt(2.0 / (k * k * cin))


def _conv(w, x, stride=1):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _gn_init(c, zero=False):
  return dict(scale=jnp.zeros(c) if zero else jnp.ones(c), bias=jnp.zeros(c))


def group_norm(p, x_BHWC, groups, eps=1e-5):
  """GroupNorm over (H, W, C/groups) per sample and group, then a per-channel affine."""
  b, h, w, c = x_BHWC.shape
  g = x_BHWC.reshape(b, h, w, groups, c // groups)
  mu = g.mean((1, 2, 4), keepdims=True)
  var = g.var((1, 2, 4), keepdims=True)
  g = (g - mu) * jax.lax.rsqrt(var + eps)
  return g.reshape(b, h, w, c) * p["scale"] + p["bias"]


def init_encoder(key, in_ch: int = 3, widths=(16, 32)):
  """A ResNet: a 3x3 stride-2 stem, one basic block per width (stride 2 after the first), GroupNorm, GAP."""
  keys = iter(jax.random.split(key, 4 * len(widths) + 2))
  p = dict(stem=_conv_init(next(keys), 3, in_ch, widths[0]), stem_gn=_gn_init(widths[0]), blocks=[])
  cin = widths[0]
  for w in widths:
    blk = dict(c1=_conv_init(next(keys), 3, cin, w), g1=_gn_init(w), c2=_conv_init(next(keys), 3, w, w),
               g2=_gn_init(w, zero=True))
    if cin != w:
      blk["proj"] = _conv_init(next(keys), 1, cin, w)
    p["blocks"].append(blk)
    cin = w
  return p


def _groups(c):
  return min(8, c)


def encoder(p, x_BHWC):
  """Features (B, widths[-1]) of images in [0, 1]."""
  h = jax.nn.relu(group_norm(p["stem_gn"], _conv(p["stem"], x_BHWC, 2), _groups(p["stem"].shape[-1])))
  for i, blk in enumerate(p["blocks"]):
    s = 1 if i == 0 else 2
    c = blk["c1"].shape[-1]
    y = jax.nn.relu(group_norm(blk["g1"], _conv(blk["c1"], h, s), _groups(c)))
    y = group_norm(blk["g2"], _conv(blk["c2"], y), _groups(c))
    sc = _conv(blk["proj"], h, s) if "proj" in blk else (h[:, ::s, ::s] if s > 1 else h)
    h = jax.nn.relu(y + sc)
  return h.mean((1, 2))


def init_bc(key, n_views: int = 2, action_dim: int = 2, widths=(16, 32), hidden=(128, 128), state_dim: int = 1):
  """Parameters of the tanh-Gaussian BC policy: one encoder per view, a state projection, an MLP head."""
  ks = jax.random.split(key, n_views + 2 + len(hidden))
  feat = n_views * widths[-1] + 16
  mlp, din = [], feat
  for i, h in enumerate(hidden):
    mlp.append(_dense_init(ks[n_views + 2 + i], din, h))
    din = h
  return dict(enc=[init_encoder(ks[i], 3, widths) for i in range(n_views)], state=_dense_init(ks[n_views], state_dim, 16),
              mlp=mlp, out=_dense_init(ks[n_views + 1], din, 2 * action_dim, scale=0.1))


def features(p, views, state_BS):
  """Concatenated per-view features and the state projection: (B, n_views * F + 16)."""
  f = [encoder(e, v) for e, v in zip(p["enc"], views)]
  return jnp.concatenate(f + [jax.nn.relu(_dense(p["state"], state_BS))], -1)


def bc_apply(p, views, state_BS):
  """Mean and log-std (B, A) of the pre-tanh Gaussian."""
  h = features(p, views, state_BS)
  for d in p["mlp"]:
    h = jax.nn.relu(_dense(d, h))
  out = _dense(p["out"], h)
  mean, log_std = jnp.split(out, 2, -1)
  return mean, jnp.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)


def init_selector(key, feat_dim: int, n_prims: int = 4, history: int = 6, embed: int = 4, hidden: int = 128):
  ks = jax.random.split(key, 5)
  return dict(emb=_normal(ks[0], (n_prims + 1, embed)) * 0.1, f=_dense_init(ks[1], feat_dim, hidden),
              h=_dense_init(ks[2], history * embed, hidden), mix=_dense_init(ks[3], 2 * hidden, hidden),
              out=_dense_init(ks[4], hidden, n_prims, scale=0.1))


def selector_apply(p, feat_BF, hist_BH):
  """Logits (B, n_prims) from frozen features and the last H primitive tokens (0 = padding)."""
  e = p["emb"][hist_BH].reshape(hist_BH.shape[0], -1)
  h = jnp.concatenate([jax.nn.relu(_dense(p["f"], feat_BF)), jax.nn.relu(_dense(p["h"], e))], -1)
  return _dense(p["out"], _dense(p["mix"], h))
