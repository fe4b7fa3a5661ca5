"""Rollouts of language policies as fixed-shape training batches, and the PPO/GRPO loss on them.

A language-policy RL update needs, per token: the sequence (prompt + actions), which tokens are the policy's
actions (``loss_mask_BT``), their log-probs under the policy that sampled them (``old_logp_BT``), their advantages,
and the reference policy's log-probs for the KL term. This module builds that batch from

- one call of :func:`lmx.models.generate.generate` (single-turn: a prompt and one completion per row),
  :func:`completion_batch`; or
- multi-turn episodes given as lists of ``(observation_ids, action_ids)`` steps (text agents), concatenated into
  one sequence per episode, :func:`turns_batch`, which also marks the step boundaries: ``step_ids_BT`` (the env
  step a token belongs to) and ``step_end_BK`` (the index of each step's last action token, where a per-step head,
  e.g. SPA's progress estimator, reads the hidden state).

Alignment everywhere is that of :func:`lmx.models.generate.token_logprobs`: ``logp_BT[b, t]`` is
``log p(tokens[b, t] | tokens[b, <t])`` within the row's segment, 0 at padding and at a segment's first token.

:func:`policy_loss_fn` is the loss ``(params, frozen, batch, rng) -> (loss, metrics)`` of the shared loop
(:func:`lmx.core.loop.optax_step`). The reference policy enters as the frozen input ``frozen["ref_params"]``; its
log-probs are computed inside the step, so refreshing the reference (``Loop.set_frozen`` or passing new
arrays of the same shapes to the jitted step) does not recompile. Formulas: ``shared/methods/rl_losses.md``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmx.rl.losses import AGG_MODES, agg_loss, entropy_from_logits, kl_estimate, ppo_policy_loss_per_token

BATCH_KEYS = ("tokens_BT", "segment_ids_BT", "positions_BT", "loss_mask_BT", "old_logp_BT", "advantages_BT")


def positions_from_segments(segment_ids_BT):
  """RoPE positions counting from each row's first real token (0 at and before it; padding keeps its left
  neighbour's position, which no real token attends to). numpy or jnp int [B, T] -> same type."""
  xp = jnp if isinstance(segment_ids_BT, jax.Array) else np
  real = (segment_ids_BT != 0).astype(np.int32)
  return xp.maximum(xp.cumsum(real, axis=1) - 1, 0).astype(np.int32)


def completion_batch(gen_out: dict, advantages_B=None, advantages_BN=None) -> dict:
  """The training batch of one :func:`lmx.models.generate.generate` call (left-padded prompts [B, P], N new
  tokens).

  ``tokens_BT`` is ``gen_out["tokens"]`` (T = P + N); ``loss_mask_BT`` marks the generated tokens up to and
  including EOS; ``old_logp_BT`` holds their log-probs under the sampling model at temperature 1 (the PPO
  denominator; pass a re-scored batch through :func:`rescore` when sampling ran at another temperature or in
  another precision). Advantages: a scalar per row (``advantages_B``, GRPO/RLOO) broadcast over its tokens, or
  per generated token (``advantages_BN``); 0 outside the mask. With neither, ``advantages_BT`` is zeros.
  """
  tokens_BT = jnp.asarray(gen_out["tokens"], jnp.int32)
  B, T = tokens_BT.shape
  N = gen_out["new_tokens"].shape[1]
  P = T - N
  seg_BT = jnp.asarray(gen_out["sequence_mask"]).astype(jnp.int32)
  pad_BP = jnp.zeros((B, P), jnp.float32)
  mask_BN = jnp.asarray(gen_out["mask"], jnp.float32)
  loss_mask_BT = jnp.concatenate([pad_BP, mask_BN], axis=1)
  old_logp_BT = jnp.concatenate([pad_BP, jnp.asarray(gen_out["logprobs"], jnp.float32) * mask_BN], axis=1)
  if advantages_B is not None and advantages_BN is not None:
    raise ValueError("completion_batch: pass advantages_B (one per row) or advantages_BN (one per token), not both")
  if advantages_B is not None:
    adv_BN = jnp.broadcast_to(jnp.asarray(advantages_B, jnp.float32)[:, None], (B, N))
  elif advantages_BN is not None:
    adv_BN = jnp.asarray(advantages_BN, jnp.float32)
    if adv_BN.shape != (B, N):
      raise ValueError(f"completion_batch: advantages_BN has shape {adv_BN.shape}, expected {(B, N)}")
  else:
    adv_BN = jnp.zeros((B, N), jnp.float32)
  advantages_BT = jnp.concatenate([pad_BP, adv_BN * mask_BN], axis=1)
  return {"tokens_BT": tokens_BT, "segment_ids_BT": seg_BT, "positions_BT": positions_from_segments(seg_BT),
          "loss_mask_BT": loss_mask_BT, "old_logp_BT": old_logp_BT, "advantages_BT": advantages_BT}


def turns_batch(episodes: Sequence[Sequence[tuple]], *, length: int, max_steps: int | None = None,
                pad_id: int = 0, prefix_ids: Sequence[Sequence[int]] | None = None) -> dict:
  """Multi-turn episodes -> one right-padded row each, with step boundaries (numpy; fixed shapes).

  ``episodes[b]`` is a list of steps ``(observation_ids, action_ids)`` (lists of ints), optionally
  ``(observation_ids, action_ids, action_logp)`` with the sampling policy's per-token log-probs of the action.
  Row b is ``prefix_ids[b]`` (e.g. a task description; default empty) followed by obs_0, act_0, obs_1, act_1, ...
  ``length`` (T) and ``max_steps`` (K; default the longest episode) fix the shapes: an episode that does not fit
  raises (choose a larger ``length`` or fewer steps), so nothing is silently cut.

  Returns ``tokens_BT``, ``segment_ids_BT`` (1 real, 0 padding), ``positions_BT``, ``loss_mask_BT`` (action
  tokens), ``old_logp_BT`` (the given action log-probs, else 0: use :func:`rescore`), ``advantages_BT`` (zeros;
  see :func:`per_step_to_tokens`), ``step_ids_BT`` (the step index of each action token, -1 elsewhere),
  ``step_end_BK`` (index of step k's last action token; 0 where absent) and ``step_mask_BK`` (1 where step k
  exists).
  """
  B = len(episodes)
  K = max((len(e) for e in episodes), default=0) if max_steps is None else int(max_steps)
  T = int(length)
  tokens = np.full((B, T), pad_id, np.int32)
  seg = np.zeros((B, T), np.int32)
  loss_mask = np.zeros((B, T), np.float32)
  old_logp = np.zeros((B, T), np.float32)
  step_ids = np.full((B, T), -1, np.int32)
  step_end = np.zeros((B, max(K, 1)), np.int32)[:, :K]
  step_mask = np.zeros((B, max(K, 1)), np.float32)[:, :K]
  for b, ep in enumerate(episodes):
    if len(ep) > K:
      raise ValueError(f"turns_batch: episode {b} has {len(ep)} steps, more than max_steps={K}")
    t = 0
    prefix = list(prefix_ids[b]) if prefix_ids is not None else []
    pieces = [(prefix, None, None, -1)]
    for k, st in enumerate(ep):
      if len(st) not in (2, 3):
        raise ValueError(f"turns_batch: episode {b} step {k} must be (obs_ids, action_ids[, action_logp])")
      obs, act = list(st[0]), list(st[1])
      if not act:
        raise ValueError(f"turns_batch: episode {b} step {k} has an empty action")
      lp = None if len(st) == 2 else np.asarray(st[2], np.float32)
      if lp is not None and lp.shape != (len(act),):
        raise ValueError(f"turns_batch: episode {b} step {k}: {lp.shape[0]} log-probs for {len(act)} action tokens")
      pieces += [(obs, None, None, -1), (act, True, lp, k)]
    n = sum(len(p[0]) for p in pieces)
    if n > T:
      raise ValueError(f"turns_batch: episode {b} has {n} tokens, more than length={T}")
    for ids, is_act, lp, k in pieces:
      m = len(ids)
      tokens[b, t:t + m] = ids
      seg[b, t:t + m] = 1
      if is_act:
        loss_mask[b, t:t + m] = 1.0
        step_ids[b, t:t + m] = k
        if lp is not None:
          old_logp[b, t:t + m] = lp
        step_end[b, k] = t + m - 1
        step_mask[b, k] = 1.0
      t += m
  if loss_mask[:, 0].any():
    raise ValueError("turns_batch: an action starts a row; give an observation or prefix before it (the first "
                     "token of a row has no context and gets no log-prob)")
  return {"tokens_BT": tokens, "segment_ids_BT": seg, "positions_BT": positions_from_segments(seg),
          "loss_mask_BT": loss_mask, "old_logp_BT": old_logp, "advantages_BT": np.zeros((B, T), np.float32),
          "step_ids_BT": step_ids, "step_end_BK": step_end, "step_mask_BK": step_mask}


def per_step_to_tokens(values_BK, step_ids_BT):
  """Spreads per-step values (advantages or rewards, [B, K]) over the action tokens of each step: ``out[b, t] =
  values[b, step_ids[b, t]]`` where ``step_ids >= 0``, else 0."""
  values_BK = jnp.asarray(values_BK, jnp.float32)
  step_ids_BT = jnp.asarray(step_ids_BT)
  gathered = jnp.take_along_axis(values_BK, jnp.maximum(step_ids_BT, 0), axis=1)
  return jnp.where(step_ids_BT >= 0, gathered, 0.0)


def _forward_logp(apply_fn: Callable, params, batch: dict, with_entropy: bool = False):
  """One forward: per-token log-probs (and entropies) in :func:`token_logprobs`'s alignment."""
  tokens_BT = jnp.asarray(batch["tokens_BT"], jnp.int32)
  seg_BT = jnp.asarray(batch["segment_ids_BT"], jnp.int32)
  kw = {"segment_ids_BT": seg_BT}
  if batch.get("positions_BT") is not None:
    kw["positions_BT"] = jnp.asarray(batch["positions_BT"], jnp.int32)
  logits_BTV = apply_fn(params, tokens_BT, **kw)
  logits_BTV = logits_BTV[:, :-1].astype(jnp.float32)  # position t predicts token t + 1
  lp_BT1 = jnp.take_along_axis(jax.nn.log_softmax(logits_BTV, axis=-1), tokens_BT[:, 1:, None], axis=-1)[..., 0]
  scored_BT1 = (seg_BT[:, 1:] == seg_BT[:, :-1]) & (seg_BT[:, 1:] != 0)
  zero = jnp.zeros_like(lp_BT1[:, :1])
  logp_BT = jnp.concatenate([zero, jnp.where(scored_BT1, lp_BT1, 0.0)], axis=1)
  if not with_entropy:
    return logp_BT, None
  ent_BT = jnp.concatenate([zero, jnp.where(scored_BT1, entropy_from_logits(logits_BTV), 0.0)], axis=1)
  return logp_BT, ent_BT


def score(apply_fn: Callable, params, batch: dict):
  """Per-token log-probs ``[B, T]`` of ``batch["tokens_BT"]`` under ``params`` (``apply_fn(params, tokens_BT,
  segment_ids_BT=..., positions_BT=...) -> logits_BTV``, e.g. :class:`lmx.models.registry.Model`'s ``apply``)."""
  return _forward_logp(apply_fn, params, batch)[0]


def rescore(apply_fn: Callable, params, batch: dict) -> dict:
  """The batch with ``old_logp_BT`` recomputed under ``params`` (the policy that sampled it) on the action
  tokens: the PPO denominator in the training forward's own numerics."""
  logp_BT = score(apply_fn, params, batch)
  return dict(batch, old_logp_BT=logp_BT * jnp.asarray(batch["loss_mask_BT"], jnp.float32))


def policy_loss_fn(apply_fn: Callable, *, clip_low: float = 0.2, clip_high: float | None = None,
                   dual_clip: float | None = 3.0, kl_coef: float = 0.0, kl_kind: str = "k3",
                   entropy_coef: float = 0.0, agg: str = "token-mean", norm: float | None = None) -> Callable:
  """``loss_fn(params, frozen, batch, rng) -> (loss, metrics)``: clipped PPO on the action tokens plus
  ``kl_coef``·KL(π_θ‖π_ref) (the ``kl_kind`` estimator on sampled tokens) minus ``entropy_coef``·entropy, each
  aggregated by ``agg`` (:data:`lmx.rl.losses.AGG_MODES`).

  ``frozen`` is ``{"ref_params": ...}`` (a pytree of the policy's structure) when ``kl_coef > 0``; None
  otherwise. With GRPO advantages (one per sequence, :func:`completion_batch`) and ``agg="seq-mean-token-mean"``
  this is GRPO's loss; with per-token GAE advantages it is PPO's policy term.
  """
  if agg not in AGG_MODES:
    raise ValueError(f"policy_loss_fn: unknown agg {agg!r}; choose one of {AGG_MODES}")
  if kl_coef < 0 or entropy_coef < 0:
    raise ValueError(f"policy_loss_fn: kl_coef and entropy_coef must be >= 0, got {kl_coef}, {entropy_coef}")

  def loss_fn(params, frozen, batch, rng):
    del rng
    mask_BT = jnp.asarray(batch["loss_mask_BT"], jnp.float32)
    logp_BT, ent_BT = _forward_logp(apply_fn, params, batch, with_entropy=entropy_coef > 0)
    per_tok, metrics = ppo_policy_loss_per_token(logp_BT, batch["old_logp_BT"], batch["advantages_BT"], mask_BT,
                                                 clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)
    pg = agg_loss(per_tok, mask_BT, agg, norm)
    loss = pg
    metrics = {**metrics, "pg_loss": pg}
    if kl_coef > 0:
      if frozen is None or "ref_params" not in frozen:
        raise ValueError("policy_loss_fn: kl_coef > 0 needs frozen={'ref_params': ...}")
      ref_logp_BT = jax.lax.stop_gradient(score(apply_fn, frozen["ref_params"], batch))
      kl = agg_loss(kl_estimate(logp_BT, ref_logp_BT, kl_kind, mask_BT), mask_BT, agg, norm)
      loss = loss + kl_coef * kl
      metrics["kl_ref"] = kl
    if entropy_coef > 0:
      ent = agg_loss(ent_BT, mask_BT, agg, norm)
      loss = loss - entropy_coef * ent
      metrics["entropy"] = ent
    return loss, metrics

  return loss_fn


def sampler(model, **sampling_kwargs) -> Callable:
  """Jitted ``fn(params, prompt_BP, prompt_lens_B, key, temperature_B=None) -> dict`` (the output of
  :func:`lmx.models.generate.generate`) for a registry :class:`lmx.models.registry.Model` and its pure-dict
  ``params`` (what training updates), with a :class:`lmx.models.generate.SamplingConfig` from the kwargs."""
  from lmx.models.generate import SamplingConfig, make_generate_fn
  if model.graphdef is None:
    raise ValueError(f"sampler: model {model.name!r} has no NNX graph to generate with")
  fn = make_generate_fn(model.graphdef, SamplingConfig(**sampling_kwargs))

  def sample(params, prompt_BP, prompt_lens_B, key, temperature_B=None):
    return fn(params, jnp.asarray(prompt_BP, jnp.int32), jnp.asarray(prompt_lens_B, jnp.int32), key,
              temperature_B, None)

  return sample
