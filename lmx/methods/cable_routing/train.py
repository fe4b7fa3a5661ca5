"""Training loops for the BC policies and the selector: pure jitted steps ``step(params, opt, batch, key)``, numpy
datasets sampled with replacement by a seeded generator, images stored uint8 and scaled to [0, 1] on device."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lmx.core.optim import make_optimizer
from lmx.methods.cable_routing import policy as pol


@functools.lru_cache(maxsize=None)
def _opt(lr, steps, warmup, wd):  # cached: the same transform object, so jitted steps are reused
  cfg = ml_collections.ConfigDict(dict(name="adamw", lr=lr, warmup_steps=warmup, min_lr_ratio=0.0, b1=0.9,
                                       b2=0.999, eps=1e-8, weight_decay=wd, clip_norm=1.0))
  return make_optimizer(cfg, steps)[0]


def random_shift(key, x_BHWC, pad: int):
  """DrQ-style augmentation: pad by edge replication, crop back at a random offset per image."""
  if pad <= 0:
    return x_BHWC
  b, h, w, c = x_BHWC.shape
  xp = jnp.pad(x_BHWC, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
  off = jax.random.randint(key, (b, 2), 0, 2 * pad + 1)
  return jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(xp, off)


def _f(x):
  return x.astype(jnp.float32) / 255.0


@functools.partial(jax.jit, static_argnames=("tx", "pad"))
def bc_step(params, opt_state, batch, key, tx, pad):
  """One BC step: NLL of the tanh-Gaussian on (top, wrist, grasped) -> action."""
  k1, k2 = jax.random.split(key)

  def loss_fn(p):
    views = [random_shift(k1, _f(batch["top"]), pad), random_shift(k2, _f(batch["wrist"]), pad)]
    mean, log_std = pol.bc_apply(p, views, batch["grasped"].astype(jnp.float32)[:, None])
    nll, mse = pol.bc_nll_loss(mean, log_std, batch["action"])
    return nll, mse

  (nll, mse), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
  upd, opt_state = tx.update(g, opt_state, params)
  return optax.apply_updates(params, upd), opt_state, dict(nll=nll, mse=mse)


def train_bc(params, data: dict, *, steps, batch, lr, warmup, weight_decay, pad, seed_key, rng: np.random.Generator,
             log=None, name="bc"):
  """Trains a BC policy on ``data`` (numpy: top, wrist uint8 (M, H, W, 3), grasped (M,), action (M, 2))."""
  if len(data["action"]) == 0:
    raise ValueError(f"{name}: no training samples (the demonstrations produced none)")
  tx = _opt(float(lr), int(steps), int(warmup), float(weight_decay))
  opt_state = tx.init(params)
  m = len(data["action"])
  hist = []
  for i in range(steps):
    idx = rng.integers(0, m, batch)
    b = {k: jnp.asarray(v[idx]) for k, v in data.items()}
    params, opt_state, met = bc_step(params, opt_state, b, jax.random.fold_in(seed_key, i), tx, pad)
    if log is not None and (i % 100 == 0 or i == steps - 1):
      hist.append(log(i, {f"{name}/nll": met["nll"], f"{name}/mse": met["mse"]}))
  return params, hist


@jax.jit
def bc_eval(params, data):
  mean, log_std = pol.bc_apply(params, [_f(data["top"]), _f(data["wrist"])],
                               data["grasped"].astype(jnp.float32)[:, None])
  return pol.bc_nll_loss(mean, log_std, data["action"])


@jax.jit
def _features(enc_p, top, wrist, grasped):
  return pol.features(enc_p, [_f(top), _f(wrist)], grasped.astype(jnp.float32)[:, None])


def features(enc_p, top, wrist, grasped, chunk: int = 256):
  """Frozen features (M, F) of uint8 images, in chunks (one compiled shape: the last chunk is padded)."""
  out = []
  m = len(top)
  for s in range(0, m, chunk):
    sl = slice(s, min(s + chunk, m))
    n = sl.stop - sl.start
    pad = lambda x: np.concatenate([x, np.repeat(x[-1:], chunk - n, 0)]) if n < chunk else x
    out.append(np.asarray(_features(enc_p, pad(top[sl]), pad(wrist[sl]), pad(grasped[sl])))[:n])
  return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


@functools.partial(jax.jit, static_argnames=("tx",))
def sel_step(params, opt_state, batch, tx):
  def loss_fn(p):
    logits = pol.selector_apply(p, batch["feat"], batch["hist"])
    return pol.selection_loss(logits, batch["label"])

  (ce, acc), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
  upd, opt_state = tx.update(g, opt_state, params)
  return optax.apply_updates(params, upd), opt_state, dict(ce=ce, acc=acc)


def train_selector(params, data: dict, *, steps, batch, lr, warmup, weight_decay, rng, log=None, name="sel"):
  """Cross-entropy training of the selector on (feat (M, F), hist (M, H), label (M,))."""
  if len(data["label"]) == 0:
    raise ValueError(f"{name}: no decision samples")
  tx = _opt(float(lr), int(steps), int(warmup), float(weight_decay))
  opt_state = tx.init(params)
  m = len(data["label"])
  hist = []
  for i in range(steps):
    idx = rng.integers(0, m, batch)
    b = {k: jnp.asarray(v[idx]) for k, v in data.items()}
    params, opt_state, met = sel_step(params, opt_state, b, tx)
    if log is not None and (i % 100 == 0 or i == steps - 1):
      hist.append(log(i, {f"{name}/ce": met["ce"], f"{name}/acc": met["acc"]}))
  return params, hist


@jax.jit
def sel_accuracy(params, feat, hist, label):
  return pol.selection_loss(pol.selector_apply(params, feat, hist), label)
