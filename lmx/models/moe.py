"""Mixture-of-experts feed-forward (Flax NNX) with pure routing, dispatch, loss and statistics functions.

A token's router logits ``z = x W_r`` (float32) choose ``top_k`` of ``n_experts`` SwiGLU experts; the output is
the gate-weighted sum of the chosen experts' outputs.

Routing (:func:`route`):
  ``router_softmax="before"``: p = softmax(z); top-k of p; gates = the chosen p (renormalised to sum to 1 when
  ``norm_topk_prob``), as in OLMoE / Switch.
  ``router_softmax="after"``: top-k of z; gates = softmax over the k chosen logits (Mixtral).
  Either way the full ``softmax(z)`` is what the load-balancing loss and the statistics use.

Dispatch:
  dropless (``capacity_factor=0``, default): the N·k (token, expert) assignments are sorted by expert and the
  three expert matmuls are grouped matmuls over the sorted rows; nothing is dropped. ``impl="ragged"`` uses
  ``jax.lax.ragged_dot`` with per-expert group sizes (a grouped GEMM where the backend has one; CPU runs it
  densely over all experts, E/k times the useful FLOPs); ``impl="tiled"`` pads each expert's rows to tiles and
  runs batched matmuls (pure jnp, near-ideal FLOPs, weight gathers of [tiles, D, F]: for small/medium models).
  Under a mesh (``jax.set_mesh``; read at trace time with ``jax.sharding.get_abstract_mesh()``) whose Auto axes
  split the tokens evenly (:func:`expert_parallel_axes`), routing and dispatch run per device in
  ``jax.shard_map`` (:func:`expert_parallel_dispatch`): each device sorts its own tokens' assignments, sends
  them with an all-to-all over ``expert`` to the devices holding their experts (E/ep each), runs the grouped
  matmul over its local experts and all-to-alls the results back; per-device compute is its share of the
  tokens (1/devices) on 1/ep of the experts. Without such a mesh (one device, no mesh, tokens that do not
  divide) it is the global sort above.
  capacity (``capacity_factor=c > 0``): per sequence (group of T tokens, one batch row) each expert takes at
  most ``C = ceil(c·T·k/E)`` assignments. Priority is causal (:func:`capacity_slots`): the T·k choices are
  taken in (position, rank) order -- token 0's choices in rank order, then token 1's, ... -- and a choice is
  kept iff fewer than C earlier choices (kept or not) went to the same expert. So whether token t's choices
  are kept depends only on tokens <= t (and on C), never on later tokens, and cached decoding (which carries
  the per-expert counts of the prefix, :meth:`MoE.__call__` ``counts_BE``) reproduces the full forward pass.
  (Ranking all first choices before any second choice, GShard/Switch style, is not causal: a later token's
  first choice would displace an earlier token's second choice.) Overflowing assignments are dropped (their
  gate weight is lost; the residual stream carries the token). Dispatch and combine are one-hot einsums
  [B, T, E, C] (GShard/Switch style), which shard cleanly over ``expert``. (Capacity mode stays on GSPMD: no
  all-to-all; only its routing is computed per device under a mesh.)

Losses (pure functions; the transformer combines them over MoE layers, see ``TransformerConfig.moe_aux_layers``,
and multiplies by the coefficients):
  :func:`load_balancing_loss` ``E · Σ_e f_e · P_e`` with ``P_e`` = mean router probability of expert e and
  ``f_e`` by ``lb_loss_norm``, named after what f is:
  ``assign_frac`` = fraction of all N·k assignments that go to e (Σf = 1; balanced → 1; Switch for k = 1,
  megablocks / OLMo's training code for any k);
  ``first_choice_frac`` = fraction of tokens whose first choice is e (GShard's m_e; Σf = 1; balanced → 1);
  ``assign_per_token`` = assignments to e per token (Σf = k; balanced → k; HF transformers'
  ``load_balancing_loss_func`` used by its OLMoE/Mixtral/Qwen-MoE ports).
  The former names ``switch``, ``gshard``, ``maxtext`` are rejected with the new name (:data:`LB_NORM_RENAMED`).
  :func:`load_balancing_terms` returns (f, P) so that a caller can also combine layers before the product.
  :func:`router_z_loss` ``mean_t (logsumexp_e z_te)²`` (ST-MoE).

Statistics (:func:`routing_stats`): per-expert load share and mean router probability, CV of the loads,
max/mean, MaxVio, normalised entropy H(load)/log E, dead experts, and the dropped fraction (capacity mode).

Shapes: B batch, T time, N = B·T tokens, D model width, F expert width, E experts, K top-k, C capacity,
A = N·K assignments.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lmx.core import mesh as mesh_lib

ROUTER_SOFTMAX = ("before", "after")
LB_NORMS = ("assign_frac", "first_choice_frac", "assign_per_token")
# Former names of the load-balancing variants -> their current names (the old ones are errors, not aliases, so
# a config that meant one of them is not silently reinterpreted).
LB_NORM_RENAMED = {"switch": "assign_frac", "gshard": "first_choice_frac", "maxtext": "assign_per_token"}


def lb_norm_error(norm: str, field: str = "lb_loss_norm") -> str | None:
  """The error message for an unknown or renamed load-balancing variant ``norm``; None when it is valid."""
  if norm in LB_NORMS:
    return None
  if norm in LB_NORM_RENAMED:
    return (f"{field}={norm!r} was renamed {LB_NORM_RENAMED[norm]!r} (the names now say what f_e counts); "
            f"choose one of {list(LB_NORMS)}")
  return f"{field}={norm!r}; choose one of {list(LB_NORMS)}"


# ---------------------------------------------------------------------------------------------------------------
# Pure functions.


def route(logits_NE, top_k: int, *, softmax: str = "before", norm_topk_prob: bool = False):
  """Top-k routing. Returns ``(experts_NK int32, gates_NK float32, probs_NE float32)``.

  ``probs_NE`` is the full softmax of the logits (for losses and statistics); ``gates_NK`` weight the chosen
  experts' outputs, in decreasing order of preference.
  """
  if softmax not in ROUTER_SOFTMAX:
    raise ValueError(f"router softmax {softmax!r}; choose one of {ROUTER_SOFTMAX} (model.router_softmax)")
  logits_NE = logits_NE.astype(jnp.float32)
  n_experts = logits_NE.shape[-1]
  if not 1 <= top_k <= n_experts:
    raise ValueError(f"top_k={top_k} must be in [1, n_experts={n_experts}] (model.top_k, model.n_experts)")
  probs_NE = jax.nn.softmax(logits_NE, axis=-1)
  if softmax == "before":
    gates_NK, experts_NK = jax.lax.top_k(probs_NE, top_k)
    if norm_topk_prob:
      gates_NK = gates_NK / jnp.sum(gates_NK, axis=-1, keepdims=True)
  else:
    top_logits_NK, experts_NK = jax.lax.top_k(logits_NE, top_k)
    gates_NK = jax.nn.softmax(top_logits_NK, axis=-1)
  return experts_NK.astype(jnp.int32), gates_NK, probs_NE


def expert_counts(experts_NK, n_experts: int):
  """Number of assignments per expert [E] (float32)."""
  return jnp.sum(jax.nn.one_hot(experts_NK, n_experts, dtype=jnp.float32), axis=tuple(range(experts_NK.ndim)))


def load_balancing_terms(probs_NE, experts_NK, *, norm: str = "assign_frac"):
  """The two factors of the load-balancing loss: ``(f_E, P_E)`` (see the module docstring for ``norm``).

  ``f_E`` is a count (no gradient); ``P_E`` is the mean router probability per expert (differentiable).
  """
  msg = lb_norm_error(norm, "load-balancing norm (model.lb_loss_norm)")
  if msg:
    raise ValueError(msg)
  n, e = probs_NE.shape
  k = experts_NK.shape[-1]
  p_E = jnp.mean(probs_NE, axis=0)
  if norm == "first_choice_frac":
    f_E = expert_counts(experts_NK[:, :1], e) / n
  elif norm == "assign_frac":
    f_E = expert_counts(experts_NK, e) / (n * k)
  else:  # assign_per_token
    f_E = expert_counts(experts_NK, e) / n
  return jax.lax.stop_gradient(f_E), p_E


def load_balancing_loss(probs_NE, experts_NK, *, norm: str = "assign_frac"):
  """Auxiliary load-balancing loss ``E · Σ_e f_e · P_e`` of one layer (see the module docstring for ``norm``).

  Gradients flow through ``P_e`` (the mean router probabilities) only; ``f_e`` is a count.
  """
  f_E, p_E = load_balancing_terms(probs_NE, experts_NK, norm=norm)
  return probs_NE.shape[-1] * jnp.sum(f_E * p_E)


def router_z_loss(logits_NE):
  """ST-MoE router z-loss: mean over tokens of logsumexp(logits)²."""
  lse_N = jax.nn.logsumexp(logits_NE.astype(jnp.float32), axis=-1)
  return jnp.mean(lse_N * lse_N)


def routing_stats(experts_NK, probs_NE, *, dropped_frac=None):
  """Routing statistics of one layer from the chosen experts and router probabilities.

  Returns a dict of arrays: ``load`` [E] (share of assignments, sums to 1), ``mean_prob`` [E], and scalars
  ``cv`` (std/mean of the counts), ``max_over_mean``, ``maxvio`` ((max − mean)/mean, DeepSeek-V3),
  ``entropy`` (H(load)/log E, 1 = balanced), ``dead`` (experts with no assignment), ``dropped_frac``.
  """
  e = probs_NE.shape[-1]
  counts_E = expert_counts(experts_NK, e)
  mean = jnp.mean(counts_E)
  load_E = counts_E / jnp.maximum(jnp.sum(counts_E), 1.0)
  plogp = jnp.where(load_E > 0, load_E * jnp.log(jnp.where(load_E > 0, load_E, 1.0)), 0.0)
  stats = {
      "load": load_E,
      "mean_prob": jnp.mean(probs_NE.astype(jnp.float32), axis=0),
      "cv": jnp.std(counts_E) / jnp.maximum(mean, 1e-9),
      "max_over_mean": jnp.max(counts_E) / jnp.maximum(mean, 1e-9),
      "maxvio": (jnp.max(counts_E) - mean) / jnp.maximum(mean, 1e-9),
      "entropy": -jnp.sum(plogp) / math.log(e) if e > 1 else jnp.ones(()),
      "dead": jnp.sum(counts_E == 0).astype(jnp.float32),
      "dropped_frac": jnp.zeros((), jnp.float32) if dropped_frac is None else dropped_frac,
  }
  return stats


def _next_pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def ragged_swiglu(xs_AD, group_sizes_E, w1_EDF, w3_EDF, w2_EFD):
  """SwiGLU over expert-sorted rows with ``jax.lax.ragged_dot`` (row block e uses expert e's weights)."""
  h1_AF = jax.lax.ragged_dot(xs_AD, w1_EDF, group_sizes_E)
  h3_AF = jax.lax.ragged_dot(xs_AD, w3_EDF, group_sizes_E)
  return jax.lax.ragged_dot(jax.nn.silu(h1_AF) * h3_AF, w2_EFD, group_sizes_E)


def tiled_swiglu(xs_AD, group_sizes_E, w1_EDF, w3_EDF, w2_EFD, tile: int | None = None):
  """SwiGLU over expert-sorted rows as batched matmuls on fixed-size tiles (pure jnp, megablox-style).

  Each expert's rows are padded to a multiple of ``tile`` rows, so every tile belongs to one expert; tiles
  are multiplied by their expert's weights (gathered per tile). FLOPs are within ``E·tile`` rows of the ideal,
  whereas backends without a grouped-GEMM kernel (e.g. CPU) run ``ragged_dot`` densely over all experts.
  Memory: the gathered weights are [n_tiles, D, F], so this suits small/medium models (``moe_impl="tiled"``).
  """
  a, d = xs_AD.shape
  e = w1_EDF.shape[0]
  m = tile or min(128, max(8, _next_pow2(-(-a // e))))
  n_tiles = -(-a // m) + e  # upper bound on sum_e ceil(g_e / m)
  padded_E = (group_sizes_E + m - 1) // m * m
  pad_end_E = jnp.cumsum(padded_E)
  pad_start_E = pad_end_E - padded_E
  start_E = jnp.cumsum(group_sizes_E) - group_sizes_E
  expert_A = jnp.repeat(jnp.arange(e), group_sizes_E, total_repeat_length=a)
  pos_A = pad_start_E[expert_A] + jnp.arange(a) - start_E[expert_A]
  xp_RD = jnp.zeros((n_tiles * m, d), xs_AD.dtype).at[pos_A].set(xs_AD, unique_indices=True)
  tile_expert = jnp.clip(jnp.searchsorted(pad_end_E, jnp.arange(n_tiles) * m, side="right"), 0, e - 1)
  x_TMD = xp_RD.reshape(n_tiles, m, d)
  h_TMF = jax.nn.silu(jnp.einsum("tmd,tdf->tmf", x_TMD, w1_EDF[tile_expert])) * jnp.einsum(
      "tmd,tdf->tmf", x_TMD, w3_EDF[tile_expert])
  y_RD = jnp.einsum("tmf,tfd->tmd", h_TMF, w2_EFD[tile_expert]).reshape(n_tiles * m, d)
  return y_RD[pos_A]


DROPLESS_IMPLS = ("ragged", "tiled")


def dropless_dispatch(x_ND, experts_NK, gates_NK, w1_EDF, w3_EDF, w2_EFD, *, impl: str = "ragged"):
  """Dropless MoE: sort assignments by expert, grouped matmuls, unsort, gate-weighted sum.

  ``impl="ragged"``: ``jax.lax.ragged_dot``; ``impl="tiled"``: :func:`tiled_swiglu`. Returns [N, D] in x's dtype.
  """
  if impl not in DROPLESS_IMPLS:
    raise ValueError(f"dropless impl {impl!r}; choose one of {DROPLESS_IMPLS} (model.moe_impl)")
  n, d = x_ND.shape
  e = w1_EDF.shape[0]
  k = experts_NK.shape[-1]
  flat_A = experts_NK.reshape(-1)
  order_A = jnp.argsort(flat_A, stable=True)
  token_A = order_A // k
  xs_AD = jnp.take(x_ND, token_A, axis=0)
  group_sizes_E = jnp.bincount(flat_A, length=e).astype(jnp.int32)
  ffn = ragged_swiglu if impl == "ragged" else tiled_swiglu
  ys_AD = ffn(xs_AD, group_sizes_E, w1_EDF, w3_EDF, w2_EFD)
  y_AD = jnp.zeros_like(ys_AD).at[order_A].set(ys_AD, unique_indices=True)
  y_NKD = y_AD.reshape(n, k, d)
  out = jnp.einsum("nkd,nk->nd", y_NKD.astype(jnp.float32), gates_NK)
  return out.astype(x_ND.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Expert parallelism (dropless, all-to-all over the ``expert`` mesh axis).


def _auto_axes(mesh) -> dict[str, int]:
  """{axis: size} of the mesh's Auto axes (Manual axes of an enclosing shard_map and Explicit axes excluded)."""
  return {a: s for a, s, t in zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types)
          if t == jax.sharding.AxisType.Auto}


def expert_parallel_axes(mesh, n_tokens: int, n_experts: int, batch_axes=()) -> tuple[str, ...] | None:
  """The mesh axes that :func:`expert_parallel_dispatch` splits ``n_tokens`` tokens over, or None when the
  expert-parallel path does not apply (no mesh, a single device, experts not divisible by the ``expert``
  axis, or tokens not divisible by the number of devices).

  The order is ``batch_axes`` first (the axes activations are already split over along B, so that the split
  of the flattened tokens refines it and costs no communication), then every other Auto axis of size > 1
  (``expert`` among them): every device takes an equal share of the tokens.
  """
  if mesh is None or mesh.empty:
    return None
  sizes = {a: s for a, s in _auto_axes(mesh).items() if s > 1}
  if not sizes or n_experts % sizes.get("expert", 1):
    return None
  axes = tuple(a for a in batch_axes if a in sizes) + tuple(a for a in mesh.axis_names
                                                            if a in sizes and a not in batch_axes)
  if n_tokens % math.prod(sizes[a] for a in axes):
    return None
  return axes


def ep_buffer_rows(n_local: int, top_k: int, n_local_experts: int, ep: int, buffer_factor: float = 0.0) -> int:
  """Rows per (source, destination) pair of the expert-parallel all-to-all buffer.

  ``buffer_factor=0``: the worst case, ``n_local · min(top_k, n_local_experts)``: a token's top-k experts are
  distinct, so at most min(k, E/ep) of its k assignments go to one expert shard; a source's n_local tokens
  can therefore never overflow it (dropless for any routing). ``buffer_factor=f > 0``: ``f`` times the
  balanced load ``n_local · k / ep``, rounded up to a multiple of 8 and at most the worst case (the caller
  falls back to the worst-case buffer when a pair overflows, so this too is dropless).
  """
  worst = n_local * min(top_k, n_local_experts)
  if buffer_factor <= 0:
    return worst
  return min(worst, -(-int(math.ceil(buffer_factor * n_local * top_k / ep)) // 8) * 8)


def _ep_exchange(x_nD, experts_nK, gates_nK, w1, w3, w2, *, ep: int, rows: int, impl: str):
  """One device's part of :func:`expert_parallel_dispatch` with ``rows`` rows per (source, destination) pair.

  Sender: sort the local n·k assignments by expert (so by destination shard, then local expert), write each
  into its destination's block of a [ep·rows, D] buffer (with its local expert id in a parallel int buffer),
  all-to-all. Receiver: sort the ep·rows received rows by local expert (empty slots, id E_l, go last),
  grouped SwiGLU over the E_l local experts, unsort, all-to-all back. Sender: read each assignment's result
  from the slot it was sent to, unsort, gate-weighted sum.
  """
  n, d = x_nD.shape
  k = experts_nK.shape[-1]
  e_local = w1.shape[0]
  flat_A = experts_nK.reshape(-1)
  order_A = jnp.argsort(flat_A, stable=True)
  sorted_expert_A = flat_A[order_A]
  dest_A = sorted_expert_A // e_local
  send_E = jnp.bincount(dest_A, length=ep)
  slot_A = jnp.arange(n * k) - (jnp.cumsum(send_E) - send_E)[dest_A]  # position within the destination block
  idx_A = dest_A * rows + slot_A
  xs_AD = jnp.take(x_nD, order_A // k, axis=0)
  send_RD = jnp.zeros((ep * rows, d), x_nD.dtype).at[idx_A].set(xs_AD, unique_indices=True, mode="drop")
  send_ids_R = jnp.full((ep * rows,), e_local, jnp.int32).at[idx_A].set(
      (sorted_expert_A % e_local).astype(jnp.int32), unique_indices=True, mode="drop")
  recv_RD = jax.lax.all_to_all(send_RD, "expert", 0, 0, tiled=True)  # block s: rows from expert shard s
  recv_ids_R = jax.lax.all_to_all(send_ids_R, "expert", 0, 0, tiled=True)
  local_order_R = jnp.argsort(recv_ids_R, stable=True)
  group_sizes = jnp.bincount(recv_ids_R, length=e_local).astype(jnp.int32)  # id e_local (empty) not counted
  ffn = ragged_swiglu if impl == "ragged" else tiled_swiglu
  ys_RD = ffn(jnp.take(recv_RD, local_order_R, axis=0), group_sizes, w1, w3, w2)
  y_RD = jnp.zeros_like(ys_RD).at[local_order_R].set(ys_RD, unique_indices=True)
  back_RD = jax.lax.all_to_all(y_RD, "expert", 0, 0, tiled=True)
  ys_AD = jnp.take(back_RD, jnp.clip(idx_A, 0, ep * rows - 1), axis=0)
  y_AD = jnp.zeros_like(ys_AD).at[order_A].set(ys_AD, unique_indices=True)
  out = jnp.einsum("nkd,nk->nd", y_AD.reshape(n, k, d).astype(jnp.float32), gates_nK)
  return out.astype(x_nD.dtype)


def expert_parallel_dispatch(x_ND, experts_NK, gates_NK, w1_EDF, w3_EDF, w2_EFD, *, mesh, axes, impl="ragged",
                             buffer_factor: float = 0.0):
  """Dropless MoE with expert parallelism: equals :func:`dropless_dispatch`, computed with ``jax.shard_map``.

  Tokens (and their routing) are split over the mesh axes ``axes`` (:func:`expert_parallel_axes`; n = N /
  devices each), expert weights over ``expert`` only (E_l = E / ep experts per device, gathered over the other
  axes). Each device sorts its n·k assignments by expert and sends them to the devices of its ``expert``
  group that hold their experts with one ``jax.lax.all_to_all`` over ``expert`` (``ragged_all_to_all`` is
  not implemented on XLA:CPU, so the buffer has a fixed number of rows per (source, destination) pair,
  :func:`ep_buffer_rows`), runs the grouped SwiGLU (``impl`` as in :func:`dropless_dispatch`) over its
  E_l local experts only, and a second all-to-all returns the results, which are un-permuted and gated.

  Buffer bound: ``buffer_factor=0`` (default) gives every pair the worst case n·min(k, E_l) rows, so no
  routing can drop anything; the receiver then holds ep·n·min(k, E_l) rows, of which about n·k are real
  when balanced (grouped-GEMM kernels skip the empty rows; ``ragged_dot`` on CPU, dense over the groups, costs
  rows·E_l, i.e. 1/ep of the expert weights). ``buffer_factor=f > 0``: pairs get ≈ f·n·k/ep rows, and a
  ``lax.cond`` (on the maximum pair load over all devices, so all devices take the same branch) reruns the
  exchange with the worst-case buffer when any pair overflows: still dropless, with compute ≈ f·n·k rows
  per device in the common case (``compiled.cost_analysis()`` reports the larger branch).
  Returns [N, D] in x's dtype.
  """
  if impl not in DROPLESS_IMPLS:
    raise ValueError(f"dropless impl {impl!r}; choose one of {DROPLESS_IMPLS} (model.moe_impl)")
  P = jax.sharding.PartitionSpec
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  ep = sizes.get("expert", 1) if "expert" in axes else 1
  n_dev = math.prod(sizes[a] for a in axes)
  n, k = x_ND.shape[0] // n_dev, experts_NK.shape[-1]
  e_local = w1_EDF.shape[0] // ep
  worst = ep_buffer_rows(n, k, e_local, ep)
  fast = ep_buffer_rows(n, k, e_local, ep, buffer_factor)
  tok = P(axes if len(axes) > 1 else axes[0])
  wspec = P("expert" if ep > 1 else None)

  def local(x_nD, experts_nK, gates_nK, w1, w3, w2):
    if ep == 1:  # every expert is local: a per-shard sort, no exchange
      return dropless_dispatch(x_nD, experts_nK, gates_nK, w1, w3, w2, impl=impl)
    run = lambda rows: _ep_exchange(x_nD, experts_nK, gates_nK, w1, w3, w2, ep=ep, rows=rows,  # noqa: E731
                                    impl=impl)
    if fast >= worst:
      return run(worst)
    # The largest (source, destination) load anywhere decides, so that all devices run the same collectives.
    dest_A = experts_nK.reshape(-1) // e_local
    overflow = jax.lax.pmax(jnp.max(jnp.bincount(dest_A, length=ep)), axes) > fast
    return jax.lax.cond(overflow, lambda: run(worst), lambda: run(fast))

  fn = jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, wspec, wspec, wspec), out_specs=tok)
  return fn(x_ND, experts_NK, gates_NK.astype(jnp.float32), w1_EDF, w3_EDF, w2_EFD)


def capacity(tokens_per_group: int, n_experts: int, top_k: int, capacity_factor: float) -> int:
  """Expert capacity per group: ceil(capacity_factor · tokens · k / E), at least 1."""
  return max(1, int(math.ceil(capacity_factor * tokens_per_group * top_k / n_experts)))


def capacity_slots(experts_BTK, n_experts: int, cap: int, *, counts_BE=None, valid_BT=None):
  """Causal capacity assignment: each choice's slot in its expert's buffer, or -1 when it is dropped.

  Per batch row the T·K choices are taken in (position, rank) order (row-major over [T, K]); choice (t, r)
  to expert e gets slot ``n`` = the number of choices to e before it in that order (plus ``counts_BE[b, e]``,
  the choices to e of earlier, already-processed positions of the row: the cached-decoding state), and is
  kept iff ``n < cap``. Choices of tokens with ``valid_BT`` False (padding) take no slot and are dropped.

  Returns ``(slot_BTK int32, counts_BE int32)``: the slots and the updated per-expert counts (all counted
  choices, kept or not; once an expert is full every later choice to it is dropped, so counting the dropped
  ones changes nothing).
  """
  b, t, k = experts_BTK.shape
  onehot_BAE = jax.nn.one_hot(experts_BTK.reshape(b, t * k), n_experts, dtype=jnp.int32)  # A = T·K, (t, r)
  if valid_BT is not None:
    onehot_BAE = onehot_BAE * jnp.repeat(valid_BT.astype(jnp.int32), k, axis=1)[:, :, None]
  prior_BE = jnp.zeros((b, n_experts), jnp.int32) if counts_BE is None else counts_BE.astype(jnp.int32)
  cum_BAE = jnp.cumsum(onehot_BAE, axis=1) + prior_BE[:, None, :]  # inclusive count per expert
  pos_BA = jnp.sum(cum_BAE * onehot_BAE, axis=-1) - 1  # 0-based slot of the choice; -1 for masked choices
  keep_BA = (pos_BA >= 0) & (pos_BA < cap)
  slot_BTK = jnp.where(keep_BA, pos_BA, -1).reshape(b, t, k)
  return slot_BTK.astype(jnp.int32), cum_BAE[:, -1, :]


def capacity_dispatch(x_BTD, experts_BTK, gates_BTK, w1_EDF, w3_EDF, w2_EFD, *, capacity_factor: float,
                      cap: int | None = None, counts_BE=None, valid_BT=None, return_counts: bool = False):
  """Capacity-factor MoE with one-hot einsum dispatch per sequence (group = one batch row).

  The capacity is ``cap`` when given, else :func:`capacity` of T tokens; which choices are kept is
  :func:`capacity_slots` (causal, (position, rank) priority; ``counts_BE`` / ``valid_BT`` as there).
  Returns ``(out_BTD, dropped_frac)`` (dropped assignments contribute nothing; the fraction is over the
  counted choices), and the updated counts as a third element with ``return_counts``.
  """
  b, t, d = x_BTD.shape
  e = w1_EDF.shape[0]
  k = experts_BTK.shape[-1]
  c = capacity(t, e, k, capacity_factor) if cap is None else int(cap)
  slot_BTK, new_counts_BE = capacity_slots(experts_BTK, e, c, counts_BE=counts_BE, valid_BT=valid_BT)
  # [B, T, K, E, C]: choice (t, r) goes to expert experts[t, r] at slot slot[t, r] (slot -1: all zeros).
  dispatch_BTKEC = (jax.nn.one_hot(experts_BTK, e, dtype=x_BTD.dtype)[..., None]
                    * jax.nn.one_hot(slot_BTK, c, dtype=x_BTD.dtype)[..., None, :])
  dispatch_BTEC = jnp.sum(dispatch_BTKEC, axis=2)
  combine_BTEC = jnp.einsum("btkec,btk->btec", dispatch_BTKEC.astype(jnp.float32), gates_BTK)
  xin_BECD = jnp.einsum("btec,btd->becd", dispatch_BTEC, x_BTD)
  h_BECF = jax.nn.silu(jnp.einsum("becd,edf->becf", xin_BECD, w1_EDF)) * jnp.einsum(
      "becd,edf->becf", xin_BECD, w3_EDF)
  y_BECD = jnp.einsum("becf,efd->becd", h_BECF, w2_EFD)
  out_BTD = jnp.einsum("btec,becd->btd", combine_BTEC, y_BECD.astype(jnp.float32)).astype(x_BTD.dtype)
  n_counted = b * t * k if valid_BT is None else k * jnp.sum(valid_BT.astype(jnp.float32))
  dropped = (n_counted - jnp.sum(slot_BTK >= 0).astype(jnp.float32)) / jnp.maximum(n_counted, 1.0)
  if return_counts:
    return out_BTD, dropped, new_counts_BE
  return out_BTD, dropped


def dense_reference(x_ND, experts_NK, gates_NK, w1_EDF, w3_EDF, w2_EFD):
  """Per-token loop reference: Σ_k gate_k · FFN_{expert_k}(x) (for tests; O(N·K) gathers of weights)."""
  def one(x_D, ex_K, g_K):
    w1, w3, w2 = w1_EDF[ex_K], w3_EDF[ex_K], w2_EFD[ex_K]
    h_KF = jax.nn.silu(jnp.einsum("d,kdf->kf", x_D, w1)) * jnp.einsum("d,kdf->kf", x_D, w3)
    return jnp.einsum("kf,kfd,k->d", h_KF, w2, g_K)
  return jax.vmap(one)(x_ND, experts_NK, gates_NK)


def _route_tokens(x_ND, router_DE, top_k, softmax, norm_topk_prob):
  """Router logits (float32) and :func:`route` of tokens x_ND: ``(logits_NE, experts_NK, gates_NK, probs_NE)``."""
  logits_NE = x_ND.astype(jnp.float32) @ router_DE
  return (logits_NE, *route(logits_NE, top_k, softmax=softmax, norm_topk_prob=norm_topk_prob))


# ---------------------------------------------------------------------------------------------------------------
# Module.


class MoE(nnx.Module):
  """Top-k routed SwiGLU experts. ``moe(x_BTD)`` returns ``(y_BTD, info)``.

  ``info`` holds scalars ``lb_loss``, ``z_loss``, the load-balancing factors ``lb_frac`` / ``lb_prob`` [E]
  (:func:`load_balancing_terms`, for combining layers) and the :func:`routing_stats`; with
  ``return_routing=True`` also ``experts`` [B, T, K], ``gates`` [B, T, K], ``router_logits`` [B, T, E], ``probs``
  [B, T, E] (their softmax) and ``kept`` [B, T, K] (bool: False for choices capacity dropped; all True dropless).

  Cached decoding in capacity mode (``capacity_factor > 0``): pass ``counts_BE`` (per row, the number of
  choices per expert of the positions already processed; zeros at the start), ``valid_BT`` (False for padding
  tokens, which then take no capacity) and ``capacity_len`` (the sequence length S the capacity is computed
  for, ``C = ceil(c·S·k/E)``: the cache length). ``info["capacity_counts"]`` is then the updated counts. With
  the same S this reproduces the full forward pass over S tokens position by position (:func:`capacity_slots`).
  Expert weights carry the logical axis ``expert`` (and ``embed``/``mlp``); the router is ``(embed, None)``.

  Expert parallelism (dropless; see :func:`expert_parallel_dispatch`) is used when the layer is traced under a
  mesh; ``batch_axes`` (the transformer's ``activation_batch_axes``) orders the token split so that it refines
  the batch split, and ``ep_buffer_factor`` sizes the all-to-all buffer (0: the worst case).
  """

  def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int, *, capacity_factor: float = 0.0,
               router_softmax: str = "before", norm_topk_prob: bool = False, lb_loss_norm: str = "assign_frac",
               dropless_impl: str = "ragged", dtype="float32", param_dtype="float32", init_std: float = 0.02,
               out_std: float | None = None, batch_axes: tuple[str, ...] | None = None,
               ep_buffer_factor: float = 0.0, rngs: nnx.Rngs):
    if router_softmax not in ROUTER_SOFTMAX:
      raise ValueError(f"router_softmax={router_softmax!r}; choose one of {ROUTER_SOFTMAX}")
    if lb_norm_error(lb_loss_norm):
      raise ValueError(lb_norm_error(lb_loss_norm))
    if not 1 <= top_k <= n_experts:
      raise ValueError(f"top_k={top_k} must be in [1, n_experts={n_experts}]")
    if dropless_impl not in DROPLESS_IMPLS:
      raise ValueError(f"dropless_impl={dropless_impl!r}; choose one of {DROPLESS_IMPLS}")
    self.dropless_impl = dropless_impl
    # Mesh axes activations are split over along B (the transformer passes its config's batch_axes); None: the
    # default rules' batch axes. They order the expert-parallel token split (expert_parallel_axes).
    self.batch_axes = tuple(batch_axes) if batch_axes else mesh_lib.batch_axes(mesh_lib.DEFAULT_AXIS_RULES)
    self.ep_buffer_factor = float(ep_buffer_factor)
    self.n_experts, self.top_k, self.capacity_factor = n_experts, top_k, capacity_factor
    self.router_softmax, self.norm_topk_prob, self.lb_loss_norm = router_softmax, norm_topk_prob, lb_loss_norm
    self.dtype = jnp.dtype(dtype)
    pd = jnp.dtype(param_dtype)
    out_std = init_std if out_std is None else out_std

    def p(shape, axes, std, dt=pd):
      return nnx.Param(std * jax.random.normal(rngs.params(), shape, dt), out_sharding=axes, eager_sharding=False)

    self.router = p((d_model, n_experts), ("embed", None), init_std, jnp.float32)
    self.w1 = p((n_experts, d_model, d_ff), ("expert", "embed", "mlp"), init_std)
    self.w3 = p((n_experts, d_model, d_ff), ("expert", "embed", "mlp"), init_std)
    self.w2 = p((n_experts, d_ff, d_model), ("expert", "mlp", "embed"), out_std)

  def __call__(self, x_BTD, *, return_routing: bool = False, counts_BE=None, valid_BT=None,
               capacity_len: int | None = None):
    if x_BTD.ndim != 3 or x_BTD.shape[-1] != self.w1.shape[1]:
      raise ValueError(f"MoE input must be [B, T, D={self.w1.shape[1]}], got {x_BTD.shape}")
    b, t, d = x_BTD.shape
    dt = self.dtype
    x = x_BTD.astype(dt)
    # Under a mesh (jax.set_mesh, read at trace time) tokens are split over every device (expert_parallel_axes):
    # routing is computed per shard and dropless dispatch exchanges tokens over ``expert``; else global.
    mesh = jax.sharding.get_abstract_mesh()
    axes = expert_parallel_axes(mesh, b * t, self.n_experts, self.batch_axes)
    route_fn = lambda x_ND, w_DE: _route_tokens(x_ND, w_DE, self.top_k, self.router_softmax,  # noqa: E731
                                                self.norm_topk_prob)
    if axes is not None:  # (XLA's TopK partitioner would all-gather the logits of batch-sharded tokens)
      tok = jax.sharding.PartitionSpec(axes)
      route_fn = jax.shard_map(route_fn, mesh=mesh, in_specs=(tok, jax.sharding.PartitionSpec()),
                               out_specs=(tok,) * 4)
    logits_NE, experts_NK, gates_NK, probs_NE = route_fn(x.reshape(b * t, d), self.router[...])
    w1, w3, w2 = (w[...].astype(dt) for w in (self.w1, self.w3, self.w2))
    new_counts_BE = None
    if self.capacity_factor > 0:
      cap = capacity(capacity_len or t, self.n_experts, self.top_k, self.capacity_factor)
      y_BTD, dropped, new_counts_BE = capacity_dispatch(
          x, experts_NK.reshape(b, t, -1), gates_NK.reshape(b, t, -1), w1, w3, w2,
          capacity_factor=self.capacity_factor, cap=cap, counts_BE=counts_BE, valid_BT=valid_BT,
          return_counts=True)
    else:
      if axes is None:
        y_ND = dropless_dispatch(x.reshape(b * t, d), experts_NK, gates_NK, w1, w3, w2, impl=self.dropless_impl)
      else:
        y_ND = expert_parallel_dispatch(x.reshape(b * t, d), experts_NK, gates_NK, w1, w3, w2, mesh=mesh,
                                        axes=axes, impl=self.dropless_impl, buffer_factor=self.ep_buffer_factor)
      y_BTD = y_ND.reshape(b, t, d)
      dropped = None
    info = routing_stats(jax.lax.stop_gradient(experts_NK), jax.lax.stop_gradient(probs_NE),
                         dropped_frac=dropped)
    info["lb_frac"], info["lb_prob"] = load_balancing_terms(probs_NE, experts_NK, norm=self.lb_loss_norm)
    info["lb_loss"] = self.n_experts * jnp.sum(info["lb_frac"] * info["lb_prob"])
    if counts_BE is not None:
      info["capacity_counts"] = new_counts_BE
    info["z_loss"] = router_z_loss(logits_NE)
    if return_routing:
      info["experts"] = experts_NK.reshape(b, t, -1)
      info["gates"] = gates_NK.reshape(b, t, -1)
      info["router_logits"] = logits_NE.reshape(b, t, -1)
      info["probs"] = probs_NE.reshape(b, t, -1)
      if self.capacity_factor > 0:  # the same causal slots capacity_dispatch used (a cheap [B, T·K, E] cumsum)
        slot_BTK, _ = capacity_slots(info["experts"], self.n_experts, cap, counts_BE=counts_BE, valid_BT=valid_BT)
        info["kept"] = slot_BTK >= 0
      else:
        info["kept"] = jnp.ones(info["experts"].shape, bool)
    return y_BTD, info
