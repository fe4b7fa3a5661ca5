"""Classification losses written once: masked integer-label and soft-target cross-entropy (float32).

``mask`` (same shape as the per-example loss, 1 = counts; non-negative weights also work) averages over the
valid positions only; an all-zero mask gives 0, not NaN. Logits below float32 (bfloat16, float16) are upcast to
float32 before the log-softmax; float64 stays float64 (finite-difference tests need it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _at_least_f32(x):
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _masked_mean(per_example, mask):
  if mask is None:
    return jnp.mean(per_example)
  # Exact shapes, not broadcasting: a [B, 1] mask against a [B, T] loss would divide a sum over B·T positions by
  # a count over B and silently give T times the mean.
  if tuple(mask.shape) != tuple(per_example.shape):
    raise ValueError(f"loss mask has shape {tuple(mask.shape)}, but the per-example loss has shape "
                     f"{tuple(per_example.shape)}; pass one mask entry per label")
  mask = mask.astype(per_example.dtype)
  # An all-zero mask gives 0 (not 0/0); a positive total is divided as is, so fractional weights (summing below
  # 1) still give their weighted mean.
  total = jnp.sum(mask)
  return jnp.sum(per_example * mask) / jnp.where(total > 0, total, 1.0)


def cross_entropy(logits_NC, labels_N, mask_N=None) -> jax.Array:
  """Mean of −log softmax(logits)[label] over the (masked) leading axes; ``logits_[..., C]``, ``labels_[...]``."""
  logp = jax.nn.log_softmax(_at_least_f32(logits_NC), axis=-1)
  ll = jnp.take_along_axis(logp, labels_N[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return _masked_mean(-ll, mask_N)


def soft_cross_entropy(logits_NC, targets_NC, mask_N=None) -> jax.Array:
  """Mean of −Σ_c targets · log softmax(logits) over the (masked) leading axes (targets are probabilities)."""
  logp = jax.nn.log_softmax(_at_least_f32(logits_NC), axis=-1)
  return _masked_mean(-jnp.sum(targets_NC.astype(logp.dtype) * logp, axis=-1), mask_N)


def next_token_loss(logits_BTV, tokens_BT, mask_BT=None) -> jax.Array:
  """Cross-entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]``-aligned positions.

  ``logits_BTV`` are the model's outputs for inputs ``tokens[:, :-1]`` (T = len − 1); ``mask_BT`` (optional, over
  the targets) excludes padding.
  """
  if logits_BTV.shape[:2] != (tokens_BT.shape[0], tokens_BT.shape[1] - 1):
    raise ValueError(f"next_token_loss: logits {tuple(logits_BTV.shape)} must be [B, T, V] for tokens "
                     f"[B, T + 1] = {tuple(tokens_BT.shape)} (the model's outputs for tokens[:, :-1])")
  return cross_entropy(logits_BTV, tokens_BT[:, 1:], mask_BT)
