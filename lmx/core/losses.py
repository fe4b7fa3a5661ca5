"""Classification losses written once: masked integer-label and soft-target cross-entropy (float32).

``mask`` (same shape as the per-example loss, 1 = counts) averages over the valid positions only; an all-zero
mask gives 0, not NaN. Logits of any float dtype are upcast to float32 before the log-softmax.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _masked_mean(per_example, mask):
  if mask is None:
    return jnp.mean(per_example)
  mask = mask.astype(jnp.float32)
  return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def cross_entropy(logits_NC, labels_N, mask_N=None) -> jax.Array:
  """Mean of −log softmax(logits)[label] over the (masked) leading axes; ``logits_[..., C]``, ``labels_[...]``."""
  logp = jax.nn.log_softmax(logits_NC.astype(jnp.float32), axis=-1)
  ll = jnp.take_along_axis(logp, labels_N[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return _masked_mean(-ll, mask_N)


def soft_cross_entropy(logits_NC, targets_NC, mask_N=None) -> jax.Array:
  """Mean of −Σ_c targets · log softmax(logits) over the (masked) leading axes (targets are probabilities)."""
  logp = jax.nn.log_softmax(logits_NC.astype(jnp.float32), axis=-1)
  return _masked_mean(-jnp.sum(targets_NC.astype(jnp.float32) * logp, axis=-1), mask_N)


def next_token_loss(logits_BTV, tokens_BT, mask_BT=None) -> jax.Array:
  """Cross-entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]``-aligned positions.

  ``logits_BTV`` are the model's outputs for inputs ``tokens[:, :-1]`` (T = len − 1); ``mask_BT`` (optional, over
  the targets) excludes padding.
  """
  return cross_entropy(logits_BTV, tokens_BT[:, 1:], mask_BT)
