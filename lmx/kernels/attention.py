"""Attention dispatcher: ``attention(q, k, v, causal=True, impl=...)`` over [B, T, H, E] inputs.

impl: ``xla`` (plain jnp reference). Grouped-query attention: k/v may have fewer heads than q (H % K == 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def reference_attention(q_BTHE, k_BSKE, v_BSKE, *, causal: bool = True, scale: float | None = None):
  """Plain-jnp softmax attention (float32 softmax). Returns [B, T, H, E] in q's dtype."""
  b, t, h, e = q_BTHE.shape
  kh = k_BSKE.shape[2]
  g = h // kh
  scale = e ** -0.5 if scale is None else scale
  q = q_BTHE.reshape(b, t, kh, g, e)
  s_BKGTS = jnp.einsum("btkge,bske->bkgts", q, k_BSKE, preferred_element_type=jnp.float32) * scale
  if causal:
    s = k_BSKE.shape[1]
    mask_TS = jnp.arange(t)[:, None] + (s - t) >= jnp.arange(s)[None, :]
    s_BKGTS = jnp.where(mask_TS, s_BKGTS, -1e30)
  p = jax.nn.softmax(s_BKGTS, axis=-1).astype(v_BSKE.dtype)
  o = jnp.einsum("bkgts,bske->btkge", p, v_BSKE)
  return o.reshape(b, t, h, e).astype(q_BTHE.dtype)


def attention(q_BTHE, k_BSKE, v_BSKE, *, causal: bool = True, impl: str = "xla"):
  if impl in ("xla", "auto"):
    return reference_attention(q_BTHE, k_BSKE, v_BSKE, causal=causal)
  raise ValueError(f"attention impl {impl!r} not available; choose one of ['xla']")
