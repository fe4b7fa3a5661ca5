"""Evaluation protocol: train K fresh ConvNets on a (synthetic or real) training set, test them.

K networks are trained in parallel with ``vmap`` (same data, different init, shuffle and DSA keys):
SGD with momentum 0.9, weight decay 5e-4, batch ``batch`` (128 in DATM), DSA on every batch, soft cross-entropy
against the given targets (softmax(Ŷ) for DATM, one-hot for real data / MTT), and the learning rate ×0.1 after
half the epochs with the momentum buffer reset (the reference re-creates its optimiser there). The result is
the final test accuracy of each network, reported as mean ± sample std over the K networks
(:func:`lmx.core.stages.mean_std`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmx.core.losses import soft_cross_entropy
from lmx.core.rng import np_stream, rng_stream
from lmx.core.stages import mean_std
from lmx.methods.datm import dsa
from lmx.methods.datm.experts import NetBatches, accuracy, map_stacked, train_nets
from lmx.models.registry import build_model


@functools.partial(jax.jit, static_argnames=("momentum", "weight_decay", "apply_fn", "use_vmap"))
def _sgd_step(params_K, mom_K, xb_KB, t_all, idx_KB, mask_KB, lr, *, momentum, weight_decay, apply_fn,
              use_vmap=True):
  def one(params, mom, xb, idx_B, mask_B):
    loss, g = jax.value_and_grad(lambda p: soft_cross_entropy(apply_fn(p, xb), t_all[idx_B], mask_B))(params)
    mom = jax.tree.map(lambda m, gi, p: momentum * m + gi + weight_decay * p, mom, g, params)
    return jax.tree.map(lambda p, m: p - lr * m, params, mom), mom, loss

  return map_stacked(one, (0, 0, 0, 0, 0), use_vmap)(params_K, mom_K, xb_KB, idx_KB, mask_KB)


def _train_step(params_K, mom_K, x_all, t_all, idx_KB, mask_KB, keys_K, lr, *, strategy, momentum, weight_decay,
                apply_fn, use_vmap=True):
  """One SGD step of K networks: DSA on each network's minibatch (own key), soft cross-entropy, momentum + wd."""
  xb_KB = dsa.augment_batches(keys_K, x_all, idx_KB, tuple(strategy))
  return _sgd_step(params_K, mom_K, xb_KB, t_all, idx_KB, mask_KB, lr, momentum=momentum,
                   weight_decay=weight_decay, apply_fn=apply_fn, use_vmap=use_vmap)


def train_and_test(seed: int, x_train_NHWC, targets_NC, x_test_NHWC, y_test_N, *, num_classes: int, model_cfg,
                   num_nets: int, epochs: int, lr: float, batch: int, dsa_strategy: tuple[str, ...],
                   momentum: float = 0.9, weight_decay: float = 5e-4, use_vmap: bool = True, writer=None,
                   name: str = "eval", desc: str = "eval") -> np.ndarray:
  """Trains ``num_nets`` fresh networks on (x_train, targets) and returns their test accuracies (num_nets,).

  The networks train on the shared loop (:func:`lmx.methods.datm.experts.train_nets`); their loss per epoch goes
  to ``writer`` under ``<name>/``.

  Randomness comes from the named streams of ``seed`` only — network inits ``eval_init``, minibatch order
  ``eval_order``, augmentation ``eval_dsa`` — so two calls with one seed (two arms of a comparison) train
  networks from the same initialisations with the same order and augmentation streams (paired), and two seeds
  share nothing.
  """
  x_all = jnp.asarray(x_train_NHWC, jnp.float32)
  image_shape = tuple(x_all.shape[1:])
  model = build_model(model_cfg, image_shape=image_shape, num_classes=num_classes)
  params = jax.jit(jax.vmap(model.init))(jax.random.split(rng_stream(seed, "eval_init"), num_nets))
  kw = dict(momentum=float(momentum), weight_decay=float(weight_decay), use_vmap=bool(use_vmap),
            apply_fn=model.apply)
  batches = NetBatches(x_all, num_nets=num_nets, batch=batch, strategy=tuple(dsa_strategy),
                       order_rng=lambda k, ep: np_stream(seed, "eval_order", k, ep),
                       keys_fn=lambda ep, steps: jax.random.split(rng_stream(seed, "eval_dsa", ep), (steps, num_nets)))
  state = train_nets(sgd=lambda p, m, xb, t, i, k, lr: _sgd_step(p, m, xb, t, i, k, lr, **kw), params_K=params,
                     targets=jnp.asarray(targets_NC, jnp.float32), data=batches, epochs=epochs, lr=lr,
                     drop_epoch=epochs // 2 + 1, writer=writer, name=name, seed=seed, progress_desc=desc)
  return accuracy(state["params"], x_test_NHWC, y_test_N, model.apply)


def summarize(accs) -> dict:
  """``{"mean", "std", "n", "values"}`` of the K networks' test accuracies (sample std; None for one network)."""
  return mean_std(np.asarray(accs, np.float64).ravel().tolist())


def random_subset(rng: np.random.Generator, y_N: np.ndarray, num_classes: int, ipc: int) -> np.ndarray:
  """``ipc`` random real images per class (indices grouped by class), drawn with ``rng``."""
  return np.concatenate([rng.choice(np.flatnonzero(y_N == c), ipc, replace=False) for c in range(num_classes)])
