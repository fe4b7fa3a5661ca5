"""TPU flash attention: lmx's [B, T, H, E] grouped-query layout on the maintained Mosaic kernel.

:func:`tpu_flash_attention` calls ``jax.experimental.pallas.ops.tpu.flash_attention`` (forward and its own
backward kernels, lowered to ``tpu_custom_call``). That kernel takes [B, H, T, D] with as many kv heads as query
heads, so q/k/v are transposed to head-major and each kv head is repeated to the ``G = H // K`` query heads of
its group (query head ``h`` reads kv head ``h // G``, as in :func:`lmx.kernels.flash_attention.flash_attention`;
the gradient of the repeat sums dK/dV over each group).

Mosaic's (8, 128) rule: the last two dims of every block must be multiples of (8, 128) or span the whole array.
The kernel's blocks are [block_q, D] for q and [block_k, D] for k/v (D whole), and the kv segment-id blocks have
``block_k`` on the lane axis, so ``block_q`` and ``block_k`` must be multiples of 128 (checked by
:func:`check_blocks`). Sequence lengths that are not multiples of the blocks are padded: with ``causal=True``
the padded keys come after every real query and are masked by the causal mask; without it, segment ids (1 for
real positions, 0 for padding) keep real queries off padded keys. Padded query rows are sliced off.

Caller segment ids (``q_segment_ids_BT`` / ``kv_segment_ids_BS``, 0 = padding) go to the kernel's own
``SegmentIds`` (padded positions get id 0); the kernel masks keys of another id, and the output of padding
queries (id 0, which the kernel lets attend each other) is set to 0, as in the lmx kernel.

Not supported (:func:`unsupported_reason` says why, the dispatcher falls back to XLA under ``auto``): causal
attention with S != T (the Mosaic kernel's causal mask is top-left aligned; lmx's is bottom-right, used by
cached decoding), and dtypes other than float32/bfloat16.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import flash_attention as tpu_fa

LANES = 128  # the 128 of Mosaic's (8, 128) block rule
DEFAULT_BLOCKS = (512, 256, 128)  # the largest that divides the 128-padded length is the default block
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def unsupported_reason(q_shape, kv_shape, dtype, *, causal: bool) -> str | None:
  """Why :func:`tpu_flash_attention` cannot run these shapes (None when it can)."""
  t, s = q_shape[1], kv_shape[1]
  if causal and t != s:
    return (f"causal attention with query length T={t} != kv length S={s} (the TPU kernel's causal mask is "
            "top-left aligned)")
  if jnp.dtype(dtype) not in DTYPES:
    return f"dtype {jnp.dtype(dtype).name} (the TPU kernel takes float32 or bfloat16)"
  return None


def _default_block(n: int) -> int:
  """Largest of DEFAULT_BLOCKS that divides ``n`` rounded up to 128 (so padding stays under 128)."""
  padded = -(-n // LANES) * LANES
  return next(b for b in DEFAULT_BLOCKS if padded % b == 0)


def check_blocks(block_q: int, block_k: int) -> None:
  """Raises ValueError unless both block sizes respect the (8, 128) rule as the TPU kernel uses them."""
  for name, blk in (("block_q", block_q), ("block_k", block_k)):
    if not isinstance(blk, int) or blk <= 0 or blk % LANES:
      raise ValueError(f"TPU flash attention needs {name} to be a positive multiple of {LANES} (Mosaic's (8, 128) "
                       f"block rule; the kv segment ids put block_k on the lane axis), got {name}={blk!r}")


def tpu_flash_attention(q_BTHE, k_BSKE, v_BSKE, *, causal: bool = True, scale: float | None = None,
                        block_q: int | None = None, block_k: int | None = None, q_segment_ids_BT=None,
                        kv_segment_ids_BS=None):
  """Softmax attention [B, T, H, E] x [B, S, K, E] -> [B, T, H, E] by the Mosaic TPU flash kernel.

  Same semantics as :func:`lmx.kernels.flash_attention.flash_attention` (grouped-query, ``scale`` default
  ``E ** -0.5``), differentiable. ``block_q`` / ``block_k``: multiples of 128, default the largest of 512, 256,
  128 dividing the 128-padded length; the same blocks are used by the backward kernels. Raises ValueError for
  unsupported shapes (see :func:`unsupported_reason`) and invalid blocks. ``q_segment_ids_BT`` /
  ``kv_segment_ids_BS``: optional int segment ids (kv default: the query ids; 0 = padding, output 0).
  """
  b, t, h, e = q_BTHE.shape
  s, kh = k_BSKE.shape[1], k_BSKE.shape[2]
  reason = unsupported_reason(q_BTHE.shape, k_BSKE.shape, q_BTHE.dtype, causal=causal)
  if reason:
    raise ValueError(f"TPU flash attention does not support {reason}; use impl='xla' (or 'auto')")
  block_q = _default_block(t) if block_q is None else block_q
  block_k = _default_block(s) if block_k is None else block_k
  check_blocks(block_q, block_k)
  tp, sp = -(-t // block_q) * block_q, -(-s // block_k) * block_k
  scale = e ** -0.5 if scale is None else float(scale)
  g = h // kh
  # [B, T, H, E] -> [B, H, T, E]; kv heads repeated to their query heads (head h reads kv head h // g).
  q = jnp.swapaxes(q_BTHE, 1, 2)
  k = jnp.repeat(jnp.swapaxes(k_BSKE, 1, 2), g, axis=1)
  v = jnp.repeat(jnp.swapaxes(v_BSKE, 1, 2), g, axis=1)
  q = jnp.pad(q, ((0, 0), (0, 0), (0, tp - t), (0, 0))) if tp != t else q
  if sp != s:
    k = jnp.pad(k, ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, 0), (0, sp - s), (0, 0)))
  segment_ids = None
  if q_segment_ids_BT is not None:
    kv_segment_ids_BS = q_segment_ids_BT if kv_segment_ids_BS is None else kv_segment_ids_BS
    seg_q = jnp.pad(q_segment_ids_BT.astype(jnp.int32), ((0, 0), (0, tp - t)))
    seg_kv = jnp.pad(kv_segment_ids_BS.astype(jnp.int32), ((0, 0), (0, sp - s)))
    segment_ids = tpu_fa.SegmentIds(q=seg_q, kv=seg_kv)
  elif sp != s and not causal:  # causal: padded keys lie after every real query, the causal mask hides them
    seg_q = jnp.broadcast_to((jnp.arange(tp) < t).astype(jnp.int32), (b, tp))
    seg_kv = jnp.broadcast_to((jnp.arange(sp) < s).astype(jnp.int32), (b, sp))
    segment_ids = tpu_fa.SegmentIds(q=seg_q, kv=seg_kv)
  blocks = tpu_fa.BlockSizes(
      block_q=block_q, block_k_major=block_k, block_k=block_k, block_b=1,
      block_q_major_dkv=block_q, block_k_major_dkv=block_k, block_k_dkv=block_k, block_q_dkv=block_q,
      block_k_major_dq=block_k, block_k_dq=block_k, block_q_dq=block_q)
  o = tpu_fa.flash_attention(q, k, v, segment_ids=segment_ids, causal=causal, sm_scale=scale, block_sizes=blocks)
  o_BTHE = jnp.swapaxes(o[:, :, :t], 1, 2).astype(q_BTHE.dtype)
  if q_segment_ids_BT is not None:  # padding queries attended each other (equal ids 0): their output is 0
    o_BTHE = jnp.where((q_segment_ids_BT != 0)[:, :, None, None], o_BTHE, 0).astype(q_BTHE.dtype)
  return o_BTHE


__all__ = ["tpu_flash_attention", "unsupported_reason", "check_blocks"]
