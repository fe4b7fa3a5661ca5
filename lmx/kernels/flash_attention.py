"""Pallas flash attention (causal or not, grouped-query), forward and backward, with a plain-jnp reference.

``flash_attention(q_BTHE, k_BSKE, v_BSKE, *, causal=True, scale=None, block_q=None, block_k=None,
interpret=None)`` computes softmax attention block by block (online softmax, FlashAttention-2) without
materialising the [T, S] score matrix. Layout is [batch, time, heads, head_dim] for q and
[batch, time, kv_heads, head_dim] for k/v; ``H % K == 0`` and query head ``h`` reads kv head ``h // (H // K)``
(grouped-query attention, MQA when K == 1). With ``causal=True`` and ``S > T`` the mask is aligned bottom-right
(query ``i`` sees keys ``<= i + S - T``), as in :func:`reference_attention`.

Gradients go through a ``jax.custom_vjp``: the forward kernel saves the per-row logsumexp; the backward pass is
two kernels, one over query blocks (dQ) and one over key blocks (dK, dV per query head, summed over each GQA
group outside the kernel). All accumulation is in float32; outputs come back in q's dtype.

The kernels use the generic Pallas API (grid + BlockSpec, refs indexed directly). Compiled
(``interpret=False``), every ``pallas_call`` carries Triton ``CompilerParams`` (``num_warps``, ``num_stages``):
without them jax 0.10 lowers a GPU ``pallas_call`` with Mosaic GPU, which cannot lower these kernels; with them
the kernels lower to the ``__gpu$xla.gpu.triton`` custom call, also from a CPU host
(``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))``). ``interpret=None`` picks the Pallas interpreter
on a CPU backend only (where compiled kernels cannot run). The [B, T, H, E] blocks break Mosaic's (8, 128) rule,
so on TPU :mod:`lmx.kernels.tpu_attention` (the maintained Mosaic kernel) is used instead; the dispatcher
:func:`lmx.kernels.attention.attention` chooses. Sequence lengths that are not multiples of the block sizes are
padded (padded keys are masked); a head dim that is not a power of two is zero-padded (Triton needs power-of-two
tiles).

:func:`reference_attention` is the plain-jnp version (same signature, float32 softmax): the kernel's test
reference and the dispatcher's ``xla`` path; :func:`masked_attention` is the same computation with an explicit
[B, T, S] mask (KV-cache decoding).

Segment ids (``q_segment_ids_BT`` / ``kv_segment_ids_BS``, int, 0 = padding; the kv ids default to the query ids)
mask, on top of the causal mask, every key whose id differs from the query's, and every key of a padding query:
left-padded rows and packed sequences. Query rows that see no key give output 0 (zero gradients), in the kernel
and in :func:`reference_attention` alike. Without segment ids both compute exactly what they did before.

The functions are pure and can be called inside ``jax.shard_map`` (each shard runs the kernel on its local
batch and heads); :func:`lmx.kernels.attention.attention` does that wrapping itself when a mesh is set.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
DEFAULT_BLOCK_Q = 64
DEFAULT_BLOCK_K = 64
DEFAULT_NUM_WARPS = 4
DEFAULT_NUM_STAGES = 2


def _softmax_attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS, scale, zero_masked_rows):
  """Softmax attention in plain jnp; ``mask_BTS`` (broadcastable to [B, T, S], True = attend) or None.

  Scores, softmax and the PV accumulation are float32; the probabilities are cast to v's dtype before the PV
  matmul, as in the kernel. ``zero_masked_rows`` gives 0 for query rows that see no key.
  """
  b, t, h, e = q_BTHE.shape
  kh = k_BSKE.shape[2]
  scale = e ** -0.5 if scale is None else scale
  q_BTKGE = q_BTHE.reshape(b, t, kh, h // kh, e)
  s_BKGTS = jnp.einsum("btkge,bske->bkgts", q_BTKGE, k_BSKE, preferred_element_type=jnp.float32) * scale
  if mask_BTS is not None:
    m_B11TS = jnp.broadcast_to(mask_BTS, (b,) + mask_BTS.shape[-2:])[:, None, None]
    s_BKGTS = jnp.where(m_B11TS, s_BKGTS, MASK_VALUE)
  p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1)
  if mask_BTS is not None and zero_masked_rows:
    p_BKGTS = jnp.where(m_B11TS, p_BKGTS, 0.0)
  o_BTKGE = jnp.einsum("bkgts,bske->btkge", p_BKGTS.astype(v_BSKE.dtype), v_BSKE,
                       preferred_element_type=jnp.float32)
  return o_BTKGE.reshape(b, t, h, e).astype(q_BTHE.dtype)


def segment_mask(q_segment_ids_BT, kv_segment_ids_BS):
  """Boolean [B, T, S] mask (True = attend) of segment ids: query i sees key j iff their ids are equal and
  nonzero (id 0 is padding: a padding query sees no key)."""
  q_BT1 = q_segment_ids_BT[:, :, None]
  return (q_BT1 == kv_segment_ids_BS[:, None, :]) & (q_BT1 != 0)


def _kv_segments(q_segment_ids_BT, kv_segment_ids_BS):
  """The kv segment ids: ``kv_segment_ids_BS`` or, for self-attention, the query ids (None when neither)."""
  if q_segment_ids_BT is None:
    if kv_segment_ids_BS is not None:
      raise ValueError("kv_segment_ids needs q_segment_ids as well")
    return None
  return q_segment_ids_BT if kv_segment_ids_BS is None else kv_segment_ids_BS


def _check_segments(q, k, q_seg, kv_seg):
  if q_seg is None:
    return
  if q_seg.shape != q.shape[:2] or kv_seg.shape != k.shape[:2]:
    raise ValueError(f"segment ids must be q [B, T]={q.shape[:2]} and kv [B, S]={k.shape[:2]}, got "
                     f"{q_seg.shape} and {kv_seg.shape}")
  if not jnp.issubdtype(q_seg.dtype, jnp.integer) or not jnp.issubdtype(kv_seg.dtype, jnp.integer):
    raise ValueError(f"segment ids must be integers, got {q_seg.dtype} and {kv_seg.dtype}")


def reference_attention(q_BTHE, k_BSKE, v_BSKE, *, causal: bool = True, scale: float | None = None,
                        block_q: int | None = None, block_k: int | None = None, interpret: bool | None = None,
                        q_segment_ids_BT=None, kv_segment_ids_BS=None):
  """Plain-jnp attention with the same signature and semantics as :func:`flash_attention`.

  This is the ``xla`` path of :func:`lmx.kernels.attention.attention` and the tests' reference for the kernel.
  Returns [B, T, H, E] in q's dtype. ``block_q``, ``block_k`` and ``interpret`` are accepted and ignored so the
  two functions are interchangeable. ``q_segment_ids_BT`` / ``kv_segment_ids_BS`` (int, 0 = padding; kv
  default: the query ids, self-attention) restrict attention to equal nonzero ids (:func:`segment_mask`), on
  top of the causal mask; query rows that see no key give 0. Without them the computation is unchanged.
  """
  del block_q, block_k, interpret
  _check_shapes(q_BTHE, k_BSKE, v_BSKE, causal)
  kv_segment_ids_BS = _kv_segments(q_segment_ids_BT, kv_segment_ids_BS)
  _check_segments(q_BTHE, k_BSKE, q_segment_ids_BT, kv_segment_ids_BS)
  t, s = q_BTHE.shape[1], k_BSKE.shape[1]
  mask_TS = (jnp.arange(t)[:, None] + (s - t) >= jnp.arange(s)[None, :]) if causal else None
  if q_segment_ids_BT is None:
    return _softmax_attention(q_BTHE, k_BSKE, v_BSKE, mask_TS, scale, zero_masked_rows=False)
  mask_BTS = segment_mask(q_segment_ids_BT, kv_segment_ids_BS)
  if mask_TS is not None:
    mask_BTS = mask_BTS & mask_TS[None]
  return _softmax_attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS, scale, zero_masked_rows=True)


def masked_attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS, *, scale: float | None = None):
  """Reference attention with an explicit boolean mask [B, T, S] (True = attend); rows with no visible key
  give 0. Used by the KV-cache decode path, where the visible keys depend on each row's prompt length."""
  _check_shapes(q_BTHE, k_BSKE, v_BSKE, causal=False)
  return _softmax_attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS, scale, zero_masked_rows=True)


def _check_shapes(q, k, v, causal):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"attention expects rank-4 [B, T, H, E] inputs, got q{q.shape} k{k.shape} v{v.shape}")
  b, t, h, e = q.shape
  if k.shape != v.shape or k.shape[0] != b or k.shape[3] != e:
    raise ValueError(f"k and v must be [B={b}, S, K, E={e}] with equal shapes, got k{k.shape} v{v.shape}")
  if h % k.shape[2]:
    raise ValueError(f"query heads H={h} must be a multiple of kv heads K={k.shape[2]} (grouped-query attention)")
  if causal and k.shape[1] < t:
    raise ValueError(f"causal attention needs kv length S={k.shape[1]} >= query length T={t}")


def _round_up(x: int, m: int) -> int:
  return (x + m - 1) // m * m


def _next_pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


# ----------------------------------------------------------------------------------------------------------------
# Kernels. Refs carry one (batch, head) slice: q/o/do [block_q, E] or [T, E]; k/v [S, E] or [block_k, E].


def _block_scores(q, k, j, rows, *, scale, causal, block_k, kv_len, qseg=None, kseg=None):
  """Scaled scores of a query block against key block ``j`` and the mask of keys it may attend to.

  ``qseg`` [block_q] / ``kseg`` [block_k]: segment ids (None: unsegmented); keys of another segment and every key
  of a padding query (id 0) are masked."""
  s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
  cols = j * block_k + jnp.arange(block_k)
  mask = cols[None, :] < kv_len
  if causal:
    mask = mask & (rows[:, None] >= cols[None, :])
  if qseg is not None:
    mask = mask & (qseg[:, None] == kseg[None, :]) & (qseg[:, None] != 0)
  return s, mask


def _split_refs(refs, n_in, segmented):
  """(inputs, q segment ref, kv segment ref, outputs): the segment refs follow the ``n_in`` inputs when
  ``segmented`` (else None)."""
  if segmented:
    return refs[:n_in], refs[n_in], refs[n_in + 1], refs[n_in + 2:]
  return refs[:n_in], None, None, refs[n_in:]


def _fwd_kernel(*refs, scale, causal, block_q, block_k, offset, kv_len, num_k_blocks, segmented):
  (q_ref, k_ref, v_ref), qseg_ref, kseg_ref, (o_ref, lse_ref) = _split_refs(refs, 3, segmented)
  i = pl.program_id(2)
  q = q_ref[...]
  e = q.shape[-1]
  rows = i * block_q + jnp.arange(block_q) + offset  # absolute query positions
  qseg = qseg_ref[...] if segmented else None

  def body(j, carry):
    o, m, l = carry
    k = k_ref[pl.ds(j * block_k, block_k), :]
    v = v_ref[pl.ds(j * block_k, block_k), :]
    kseg = kseg_ref[pl.ds(j * block_k, block_k)] if segmented else None
    s, mask = _block_scores(q, k, j, rows, scale=scale, causal=causal, block_k=block_k, kv_len=kv_len,
                            qseg=qseg, kseg=kseg)
    s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    corr = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    if segmented:  # a row may see no key of a block (or none at all): masked scores must add nothing to l
      p = jnp.where(mask, p, 0.0)
    l_new = corr * l + jnp.sum(p, axis=-1)
    o_new = corr[:, None] * o + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o_new, m_new, l_new

  if causal:  # key blocks past the last visible key of this query block are skipped
    upper = jnp.minimum(lax.div((i + 1) * block_q + offset + block_k - 1, block_k), num_k_blocks)
  else:
    upper = num_k_blocks
  init = (jnp.zeros((block_q, e), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  o, m, l = lax.fori_loop(0, upper, body, init)
  if segmented:  # rows that see no key (padding queries): output 0, lse +inf so the backward's p is 0
    seen = l > 0
    o_ref[...] = (o / jnp.where(seen, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
  else:
    o_ref[...] = (o / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _dq_kernel(*refs, scale, causal, block_q, block_k, offset, kv_len, num_k_blocks, segmented):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qseg_ref, kseg_ref, (dq_ref,) = _split_refs(refs, 6, segmented)
  i = pl.program_id(2)
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  rows = i * block_q + jnp.arange(block_q) + offset
  qseg = qseg_ref[...] if segmented else None

  def body(j, dq):
    k = k_ref[pl.ds(j * block_k, block_k), :]
    v = v_ref[pl.ds(j * block_k, block_k), :]
    kseg = kseg_ref[pl.ds(j * block_k, block_k)] if segmented else None
    s, mask = _block_scores(q, k, j, rows, scale=scale, causal=causal, block_k=block_k, kv_len=kv_len,
                            qseg=qseg, kseg=kseg)
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
    dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  if causal:
    upper = jnp.minimum(lax.div((i + 1) * block_q + offset + block_k - 1, block_k), num_k_blocks)
  else:
    upper = num_k_blocks
  dq = lax.fori_loop(0, upper, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, scale, causal, block_q, block_k, offset, kv_len, num_q_blocks, segmented):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qseg_ref, kseg_ref, (dk_ref, dv_ref) = _split_refs(
      refs, 6, segmented)
  j = pl.program_id(2)
  k = k_ref[...]
  v = v_ref[...]
  kseg = kseg_ref[...] if segmented else None

  def body(i, carry):
    dk, dv = carry
    q = q_ref[pl.ds(i * block_q, block_q), :]
    do = do_ref[pl.ds(i * block_q, block_q), :]
    lse = lse_ref[pl.ds(i * block_q, block_q)]
    delta = delta_ref[pl.ds(i * block_q, block_q)]
    qseg = qseg_ref[pl.ds(i * block_q, block_q)] if segmented else None
    rows = i * block_q + jnp.arange(block_q) + offset
    s, mask = _block_scores(q, k, j, rows, scale=scale, causal=causal, block_k=block_k, kv_len=kv_len,
                            qseg=qseg, kseg=kseg)
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
    dv = dv + jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])
    dk = dk + jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)
    return dk, dv

  if causal:  # query blocks entirely before this key block see none of it
    lower = jnp.maximum(lax.div(j * block_k - offset, block_q), 0)
  else:
    lower = 0
  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(lower, num_q_blocks, body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------------------------
# pallas_call wrappers on padded inputs.


@dataclasses.dataclass(frozen=True)
class _Static:
  """Static (hashable) kernel parameters: padded sizes, blocks, mask offsets."""

  b: int
  tp: int  # padded query length
  sp: int  # padded kv length
  h: int
  kh: int
  e: int  # padded head dim
  causal: bool
  scale: float
  block_q: int
  block_k: int
  interpret: bool
  num_warps: int
  num_stages: int
  offset: int  # S - T (bottom-right causal alignment)
  kv_len: int  # real kv length S; padded keys are masked
  segmented: bool = False  # q/kv segment ids [B, Tp] / [B, Sp] follow the inputs of every kernel

  @property
  def groups(self) -> int:
    return self.h // self.kh

  @property
  def nq(self) -> int:
    return self.tp // self.block_q

  @property
  def nk(self) -> int:
    return self.sp // self.block_k

  def compiler_params(self):
    """Triton parameters for compiled kernels (they select the Triton lowering over Mosaic GPU); None when
    interpreting."""
    return None if self.interpret else pltriton.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)

  def kw(self):
    return dict(scale=self.scale, causal=self.causal, block_q=self.block_q, block_k=self.block_k,
                offset=self.offset, kv_len=self.kv_len, segmented=self.segmented)


def _seg_specs(seg, q_block: int, kv_block: int, q_axis: bool):
  """BlockSpecs of the q/kv segment ids (none when ``seg`` is None): the one of the grid's blocked axis (q when
  ``q_axis``, else kv) follows the grid index, the other is whole."""
  if seg is None:
    return [], ()
  if q_axis:
    specs = [pl.BlockSpec((None, q_block), lambda b, h, i: (b, i)),
             pl.BlockSpec((None, kv_block), lambda b, h, i: (b, 0))]
  else:
    specs = [pl.BlockSpec((None, q_block), lambda b, h, j: (b, 0)),
             pl.BlockSpec((None, kv_block), lambda b, h, j: (b, j))]
  return specs, tuple(seg)


def _fwd_call(q, k, v, seg, st: _Static):
  g = st.groups
  kernel = functools.partial(_fwd_kernel, num_k_blocks=st.nk, **st.kw())
  seg_specs, seg_args = _seg_specs(seg, st.block_q, st.sp, q_axis=True)
  return pl.pallas_call(
      kernel,
      grid=(st.b, st.h, st.nq),
      in_specs=[
          pl.BlockSpec((None, st.block_q, None, st.e), lambda b, h, i: (b, i, h, 0)),
          pl.BlockSpec((None, st.sp, None, st.e), lambda b, h, i: (b, 0, h // g, 0)),
          pl.BlockSpec((None, st.sp, None, st.e), lambda b, h, i: (b, 0, h // g, 0)),
      ] + seg_specs,
      out_specs=[
          pl.BlockSpec((None, st.block_q, None, st.e), lambda b, h, i: (b, i, h, 0)),
          pl.BlockSpec((None, None, st.block_q), lambda b, h, i: (b, h, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((st.b, st.h, st.tp), jnp.float32)],
      interpret=st.interpret,
      compiler_params=st.compiler_params(),
      name="flash_attention_fwd",
  )(q, k, v, *seg_args)


def _bwd_call(q, k, v, seg, o, lse, do, st: _Static):
  g = st.groups
  dq_seg_specs, seg_args = _seg_specs(seg, st.block_q, st.sp, q_axis=True)
  dkv_seg_specs, _ = _seg_specs(seg, st.tp, st.block_k, q_axis=False)
  delta = jnp.einsum("bthe,bthe->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, num_k_blocks=st.nk, **st.kw()),
      grid=(st.b, st.h, st.nq),
      in_specs=[
          pl.BlockSpec((None, st.block_q, None, st.e), lambda b, h, i: (b, i, h, 0)),
          pl.BlockSpec((None, st.sp, None, st.e), lambda b, h, i: (b, 0, h // g, 0)),
          pl.BlockSpec((None, st.sp, None, st.e), lambda b, h, i: (b, 0, h // g, 0)),
          pl.BlockSpec((None, st.block_q, None, st.e), lambda b, h, i: (b, i, h, 0)),
          pl.BlockSpec((None, None, st.block_q), lambda b, h, i: (b, h, i)),
          pl.BlockSpec((None, None, st.block_q), lambda b, h, i: (b, h, i)),
      ] + dq_seg_specs,
      out_specs=pl.BlockSpec((None, st.block_q, None, st.e), lambda b, h, i: (b, i, h, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=st.interpret,
      compiler_params=st.compiler_params(),
      name="flash_attention_dq",
  )(q, k, v, do, lse, delta, *seg_args)
  dk_h, dv_h = pl.pallas_call(
      functools.partial(_dkv_kernel, num_q_blocks=st.nq, **st.kw()),
      grid=(st.b, st.h, st.nk),
      in_specs=[
          pl.BlockSpec((None, st.tp, None, st.e), lambda b, h, j: (b, 0, h, 0)),
          pl.BlockSpec((None, st.block_k, None, st.e), lambda b, h, j: (b, j, h // g, 0)),
          pl.BlockSpec((None, st.block_k, None, st.e), lambda b, h, j: (b, j, h // g, 0)),
          pl.BlockSpec((None, st.tp, None, st.e), lambda b, h, j: (b, 0, h, 0)),
          pl.BlockSpec((None, None, st.tp), lambda b, h, j: (b, h, 0)),
          pl.BlockSpec((None, None, st.tp), lambda b, h, j: (b, h, 0)),
      ] + dkv_seg_specs,
      out_specs=[
          pl.BlockSpec((None, st.block_k, None, st.e), lambda b, h, j: (b, j, h, 0)),
          pl.BlockSpec((None, st.block_k, None, st.e), lambda b, h, j: (b, j, h, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct((st.b, st.sp, st.h, st.e), jnp.float32)] * 2,
      interpret=st.interpret,
      compiler_params=st.compiler_params(),
      name="flash_attention_dkv",
  )(q, k, v, do, lse, delta, *seg_args)
  # Per-query-head dK/dV summed over each GQA group (heads h = kv * G + g).
  dk = dk_h.reshape(st.b, st.sp, st.kh, g, st.e).sum(3).astype(k.dtype)
  dv = dv_h.reshape(st.b, st.sp, st.kh, g, st.e).sum(3).astype(v.dtype)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash_padded(q, k, v, seg, st):
  """The kernel on padded inputs; ``seg``: None or (q ids [B, Tp], kv ids [B, Sp]) int32 (not differentiated)."""
  o, _ = _fwd_call(q, k, v, seg, st)
  return o


def _flash_padded_fwd(q, k, v, seg, st):
  o, lse = _fwd_call(q, k, v, seg, st)
  return o, (q, k, v, seg, o, lse)


def _flash_padded_bwd(st, res, do):
  q, k, v, seg, o, lse = res
  dq, dk, dv = _bwd_call(q, k, v, seg, o, lse, do, st)
  return dq, dk, dv, None  # integer segment ids: no cotangent


_flash_padded.defvjp(_flash_padded_fwd, _flash_padded_bwd)


def _check_block(name: str, block) -> None:
  if not isinstance(block, int) or block <= 0 or block & (block - 1):
    raise ValueError(f"flash attention {name} must be a positive power of two (Triton tiles), got {block!r}")


def flash_attention(q_BTHE, k_BSKE, v_BSKE, *, causal: bool = True, scale: float | None = None,
                    block_q: int | None = None, block_k: int | None = None, interpret: bool | None = None,
                    num_warps: int = DEFAULT_NUM_WARPS, num_stages: int = DEFAULT_NUM_STAGES,
                    q_segment_ids_BT=None, kv_segment_ids_BS=None):
  """Blockwise (flash) softmax attention as a Pallas kernel; differentiable (custom_vjp).

  Args:
    q_BTHE: queries [B, T, H, E].
    k_BSKE, v_BSKE: keys/values [B, S, K, E] with ``H % K == 0``.
    causal: mask keys after each query (bottom-right aligned when S > T; requires S >= T).
    scale: score scale, default ``E ** -0.5``.
    block_q, block_k: tile sizes along T and S (default 64, capped at the padded lengths; powers of two).
    interpret: run the kernel in the Pallas interpreter; default True on a CPU backend, False elsewhere. False
      builds the Triton kernels (GPU), which can be lowered but not run on a CPU host.
    num_warps, num_stages: Triton compiler parameters of the compiled kernels.
    q_segment_ids_BT, kv_segment_ids_BS: optional int segment ids [B, T] / [B, S] (kv default: the query ids);
      a query attends only keys of its own nonzero id (0 = padding); query rows that see no key give 0 (and
      zero gradients). None: no segment mask (the kernels are then exactly those without this option).

  Returns:
    [B, T, H, E] in q's dtype.
  """
  _check_shapes(q_BTHE, k_BSKE, v_BSKE, causal)
  kv_segment_ids_BS = _kv_segments(q_segment_ids_BT, kv_segment_ids_BS)
  _check_segments(q_BTHE, k_BSKE, q_segment_ids_BT, kv_segment_ids_BS)
  b, t, h, e = q_BTHE.shape
  s = k_BSKE.shape[1]
  scale = e ** -0.5 if scale is None else float(scale)
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  block_q = DEFAULT_BLOCK_Q if block_q is None else block_q
  block_k = DEFAULT_BLOCK_K if block_k is None else block_k
  _check_block("block_q", block_q)
  _check_block("block_k", block_k)
  block_q, block_k = min(block_q, _next_pow2(t)), min(block_k, _next_pow2(s))  # no block beyond the padded length
  tp, sp, ep = _round_up(t, block_q), _round_up(s, block_k), _next_pow2(e)
  q, k, v = q_BTHE, k_BSKE, v_BSKE
  if (tp, ep) != (t, e):
    q = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, ep - e)))
  if (sp, ep) != (s, e):
    k = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, ep - e)))
    v = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, ep - e)))
  st = _Static(b=b, tp=tp, sp=sp, h=h, kh=k.shape[2], e=ep, causal=causal, scale=scale, block_q=block_q,
               block_k=block_k, interpret=bool(interpret), num_warps=num_warps, num_stages=num_stages,
               offset=s - t, kv_len=s, segmented=q_segment_ids_BT is not None)
  seg = None
  if q_segment_ids_BT is not None:  # padded rows/keys get id 0 (padding)
    seg = (jnp.pad(q_segment_ids_BT.astype(jnp.int32), ((0, 0), (0, tp - t))),
           jnp.pad(kv_segment_ids_BS.astype(jnp.int32), ((0, 0), (0, sp - s))))
  o = _flash_padded(q, k, v, seg, st)
  return o[:, :t, :, :e]


def attention_flops(b: int, t: int, s: int, h: int, e: int, *, causal: bool) -> float:
  """Matmul FLOPs of one attention forward (QK^T and PV); causal counts the visible half."""
  f = 4.0 * b * t * s * h * e
  return f / 2 if causal else f


__all__ = ["flash_attention", "reference_attention", "masked_attention", "segment_mask", "attention_flops",
           "MASK_VALUE"]
