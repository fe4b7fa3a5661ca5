"""Training stages of the BC policies and the selector on the one loop, and their full-data evaluations.

Each training is a stage of the workdir (:func:`lmx.core.stages.train`): minibatches drawn with replacement from
in-memory demonstration arrays (:class:`lmx.core.data.ArrayBatches`, batch k a pure function of (seed, stream,
k)), the optimiser from its config block (:func:`lmx.core.optim.make_optimizer`), checkpoints under
``checkpoints/<stage>``, scalars under ``<stage>/`` in the method's writer, the NaN guard and a progress bar.
Images are stored uint8 and scaled to [0, 1] on device; the BC step's random-shift augmentation draws from the
step's rng.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmx.core import interrupt, loop, stages
from lmx.core.data import ArrayBatches
from lmx.core.optim import make_optimizer
from lmx.methods.cable_routing import policy as pol

BC_KEYS = ("top", "wrist", "grasped", "action")
SEL_KEYS = ("feat", "hist", "label")


def random_shift(key, views, pad: int):
  """DrQ-style augmentation of each view (B, H, W, C): pad by edge replication, crop back at a random offset per
  image (the offsets of all views from one draw)."""
  if pad <= 0:
    return list(views)
  b, h, w, c = views[0].shape
  off_VB2 = jax.random.randint(key, (len(views) * b * 2,), 0, 2 * pad + 1).reshape(len(views), b, 2)
  crop = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))
  return [crop(jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge"), o) for x, o in zip(views, off_VB2)]


def _f(x):
  return x.astype(jnp.float32) / 255.0


def bc_loss(params, frozen, batch, rng, *, pad: int):
  """Tanh-Gaussian NLL of (top, wrist, grasped) -> action on randomly shifted views; the mean-action MSE."""
  del frozen
  views = random_shift(rng, [_f(batch["top"]), _f(batch["wrist"])], pad)
  mean, log_std = pol.bc_apply(params, views, batch["grasped"].astype(jnp.float32)[:, None])
  nll, mse = pol.bc_nll_loss(mean, log_std, batch["action"])
  return nll, {"mse": mse}


def selector_loss(params, frozen, batch, rng):
  """Cross-entropy of the demonstrated (or corrected) primitive; the accuracy."""
  del frozen, rng
  logits = pol.selector_apply(params, batch["feat"], batch["hist"])
  ce, acc = pol.selection_loss(logits, batch["label"])
  return ce, {"acc": acc}


def fit(workdir: str, name: str, params, data: dict, loss_fn, *, optim, steps: int, batch: int, seed: int,
        stream: str, writer):
  """Trains ``params`` for ``steps`` steps on minibatches of ``data`` (the stream ``stream`` of ``seed``) as the
  training stage ``name`` of ``workdir`` (resumed from its checkpoints when interrupted); returns the params."""
  if len(next(iter(data.values()))) == 0:
    raise ValueError(f"{name}: no training samples (the demonstrations produced none)")
  tx, schedule = make_optimizer(optim, steps)
  res = stages.train(workdir, name, writer=writer, total_steps=steps, seed=seed,
                     step_fn=loop.optax_step(loss_fn, tx, schedule),
                     init_fn=lambda _: loop.optax_state(params, tx),
                     data=ArrayBatches(data, batch, seed=seed, name=stream))
  return jax.device_get(res.state["params"])


def train_bc(workdir: str, name: str, params, data: dict, *, optim, steps: int, batch: int, pad: int, seed: int,
             stream: str, writer):
  """A BC policy trained on ``data`` (top, wrist uint8 (M, H, W, 3), grasped (M,), action (M, A))."""
  return fit(workdir, name, params, {k: data[k] for k in BC_KEYS}, functools.partial(bc_loss, pad=int(pad)),
             optim=optim, steps=steps, batch=batch, seed=seed, stream=stream, writer=writer)


def train_selector(workdir: str, name: str, params, data: dict, *, optim, steps: int, batch: int, seed: int,
                   stream: str, writer):
  """The selector trained on decisions (feat (M, F), hist (M, H), label (M,))."""
  d = dict(feat=np.asarray(data["feat"], np.float32), hist=np.asarray(data["hist"], np.int32),
           label=np.asarray(data["label"], np.int32))
  return fit(workdir, name, params, d, selector_loss, optim=optim, steps=steps, batch=batch, seed=seed,
             stream=stream, writer=writer)


# ------------------------------------------------------------------------------------------ full-data passes


def _chunks(arrays: dict, chunk: int):
  """``(chunk of arrays padded to `chunk` rows, number of real rows)`` over the rows (one compiled shape)."""
  m = len(next(iter(arrays.values())))
  for s in range(0, m, chunk):
    interrupt.check("in a full-data pass")
    n = min(chunk, m - s)
    pad = lambda x: np.concatenate([x[s:s + n], np.repeat(x[s + n - 1:s + n], chunk - n, 0)])  # noqa: E731
    yield {k: pad(np.asarray(v)) for k, v in arrays.items()}, n


@jax.jit
def _bc_sums(params, data, mask):
  mean, log_std = pol.bc_apply(params, [_f(data["top"]), _f(data["wrist"])],
                               data["grasped"].astype(jnp.float32)[:, None])
  nll, mse = pol.bc_nll_loss(mean, log_std, data["action"], mask)
  n = mask.sum()
  return nll * n, mse * n


def bc_eval(params, data: dict, chunk: int = 256) -> dict:
  """NLL and mean-action MSE of a BC policy over every row of ``data`` (no augmentation), in chunks."""
  tot, m = np.zeros(2), 0
  for b, n in _chunks({k: data[k] for k in BC_KEYS}, chunk):
    mask = (np.arange(chunk) < n).astype(np.float32)
    tot += np.asarray(jax.device_get(_bc_sums(params, b, mask)), np.float64)
    m += n
  return {"nll": float(tot[0] / max(m, 1)), "mse": float(tot[1] / max(m, 1))}


@jax.jit
def _features(enc_p, top, wrist, grasped):
  return pol.features(enc_p, [_f(top), _f(wrist)], grasped.astype(jnp.float32)[:, None])


def features(enc_p, top, wrist, grasped, chunk: int = 256):
  """Frozen features (M, F) of uint8 images, in chunks."""
  out = [np.asarray(_features(enc_p, b["top"], b["wrist"], b["grasped"]))[:n]
         for b, n in _chunks(dict(top=top, wrist=wrist, grasped=grasped), chunk)]
  return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


@jax.jit
def _selector_eval(params, feat, hist, label):
  return pol.selection_loss(pol.selector_apply(params, feat, hist), label)


def selector_eval(params, data: dict) -> dict:
  """Cross-entropy and accuracy of the selector over every decision of ``data``."""
  ce, acc = _selector_eval(params, np.asarray(data["feat"], np.float32), np.asarray(data["hist"], np.int32),
                           np.asarray(data["label"], np.int32))
  return {"ce": float(ce), "acc": float(acc)}
