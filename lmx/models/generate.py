"""Jitted autoregressive sampling with a KV cache: greedy, temperature, top-k, top-p, EOS; fixed shapes.

Prompts are **left-padded**: a batch of prompts of different lengths is a [B, P] array whose row b holds its
``prompt_lens[b]`` real tokens in the last columns (:func:`left_pad` builds it from lists). All rows then share
one cache write position per step: the prompt fills cache slots [0, P) in one prefill call, and new token i goes
to slot P + i. RoPE positions are per row (the first real token of every row has position 0) and padded slots
are masked out of attention, so a row's result does not depend on how much padding it has.

The loop is a ``lax.while_loop`` over at most ``max_new_tokens`` steps that stops early once every row has
emitted ``eos_id``; outputs always have the fixed shape [B, max_new_tokens]. After a row's EOS its tokens are
``pad_id`` and its mask is False.

Returned dict (what RL needs):
  ``tokens``           [B, P + N]  the left-padded prompt followed by the generated tokens
  ``new_tokens``       [B, N]      generated tokens (EOS included; ``pad_id`` after it)
  ``mask``             [B, N]      True for generated tokens up to and including EOS
  ``sequence_mask``    [B, P + N]  True for real prompt tokens and generated tokens
  ``logprobs``         [B, N]      log p(token) under the model (temperature 1, no truncation); 0 where masked
  ``sample_logprobs``  [B, N]      log-prob under the distribution actually sampled (temperature, top-k, top-p)
  ``lengths``          [B]         number of generated tokens (EOS included)
  ``done``             [B]         whether the row emitted a stop token (``eos_id`` or one of ``stop_ids``)
  ``state``                        with ``return_state``: the KV cache to continue from (:func:`continue_generate`)

Per-row temperature: ``generate(..., temperature_B=[B] array)`` samples row b at its own temperature (0: greedy;
``top_k`` / ``top_p`` apply to all rows). Stop tokens: ``stop_ids`` (with ``eos_id``) end a row at its first stop
token, which is kept; later positions are ``pad_id`` and outside ``mask`` / ``lengths``.

Re-scoring: :func:`token_logprobs` gives log p(token_t | tokens_<t) of given (e.g. left-padded) sequences from
the training forward with segment ids, for RL's policy ratios; ``sequence_mask`` is the segment-id row (1 real,
0 padding) of a returned ``tokens``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static sampling settings (part of the jit cache key)."""

  max_new_tokens: int = 32
  temperature: float = 1.0  # 0: greedy
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1: off
  eos_id: int = -1  # -1: none
  pad_id: int = 0
  stop_ids: tuple = ()  # more stop tokens: a row stops at its first token in stop_ids (or eos_id), included
  cache_len: int = 0  # 0: P + max_new_tokens; larger leaves room for later turns (continue_generate)
  return_state: bool = False  # also return "state" (the KV cache and its bookkeeping) to continue from

  def validate(self) -> None:
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
    if self.cache_len < 0:
      raise ValueError(f"cache_len={self.cache_len} must be >= 0 (0 = prompt + max_new_tokens)")

  @property
  def stops(self) -> tuple[int, ...]:
    """All stop token ids: ``stop_ids`` and ``eos_id`` (when >= 0)."""
    return tuple(int(t) for t in self.stop_ids) + ((self.eos_id,) if self.eos_id >= 0 else ())


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, length: int | None = None):
  """Lists of token ids -> (left-padded int32 [B, P], lengths int32 [B]). ``length`` defaults to the longest."""
  lens = np.array([len(p) for p in prompts], np.int32)
  if (lens < 1).any():
    raise ValueError("every prompt needs at least one token")
  p = int(length or lens.max())
  if lens.max() > p:
    raise ValueError(f"prompt of length {lens.max()} does not fit length={p}")
  out = np.full((len(prompts), p), pad_id, np.int32)
  for i, toks in enumerate(prompts):
    out[i, p - len(toks):] = np.asarray(toks, np.int32)
  return out, lens


def filter_logits(logits_BV, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """The logits of the sampling distribution (float32): divided by ``temperature`` (> 0), then tokens outside
  the ``top_k`` largest and outside the smallest set whose probability mass reaches ``top_p`` set to -inf.

  The top-p set is taken after top-k, in decreasing order of probability, and always holds the most likely
  token; tied logits at the boundary are all kept.
  """
  l_BV = logits_BV.astype(jnp.float32) / temperature
  if top_k and top_k < l_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(l_BV, top_k)[0][:, -1:]
    l_BV = jnp.where(l_BV < kth_B1, -jnp.inf, l_BV)
  if top_p < 1.0:
    sorted_BV = jnp.sort(l_BV, axis=-1)[:, ::-1]
    p_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(p_BV, axis=-1) - p_BV  # mass of strictly better tokens
    keep_BV = before_BV < top_p  # the smallest prefix whose mass reaches top_p (always >= 1 token)
    thresh_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    l_BV = jnp.where(l_BV < thresh_B1, -jnp.inf, l_BV)
  return l_BV


def sample_logits(logits_BV, key, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """Samples one token per row. Returns ``(tokens_B int32, logprobs_B)`` where the log-probs are under the
  sampling distribution (:func:`filter_logits`; 0 for greedy, ``temperature=0``)."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32), jnp.zeros(logits_BV.shape[:1], jnp.float32)
  l_BV = filter_logits(logits_BV, temperature=temperature, top_k=top_k, top_p=top_p)
  tok_B = jax.random.categorical(key, l_BV, axis=-1).astype(jnp.int32)
  logp_B = jnp.take_along_axis(jax.nn.log_softmax(l_BV, axis=-1), tok_B[:, None], axis=-1)[:, 0]
  return tok_B, logp_B


def token_logprobs(apply_fn, params, tokens_BT, segment_ids_BT=None, *, positions_BT=None, **kw):
  """Per-token log-probs ``logp_BT[b, t] = log p(tokens[b, t] | the earlier tokens of its segment)`` (float32).

  ``apply_fn(params, tokens_BT, **kw) -> logits_BTV`` is a model's forward (``Model.apply`` of
  :mod:`lmx.models.registry`); an NNX module may be passed instead, with ``params=None``. ``segment_ids_BT``
  (int [B, T], 0 = padding; None: every row one sequence) goes to the forward, so a left-padded row scores as it
  would alone, and packed sequences do not see each other; RoPE positions count from each segment's first token
  unless ``positions_BT`` is given. ``logp_BT`` is 0 at padding and at the first token of each segment (it has
  no context to be predicted from); ``kw`` goes to the forward (its output must be the logits alone).
  """
  fwd_kw = dict(kw)
  if segment_ids_BT is not None:
    fwd_kw["segment_ids_BT"] = segment_ids_BT
  if positions_BT is not None:
    fwd_kw["positions_BT"] = positions_BT
  if isinstance(apply_fn, nnx.Module):
    if params is not None:
      raise ValueError("token_logprobs: pass params=None with a module (its own parameters are used)")
    logits_BTV = apply_fn(tokens_BT, **fwd_kw)
  else:
    logits_BTV = apply_fn(params, tokens_BT, **fwd_kw)
  logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)  # predicts tokens 1..T-1
  lp_BT1 = jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
  if segment_ids_BT is None:
    scored_BT1 = jnp.ones(lp_BT1.shape, bool)
  else:  # the token and its predecessor are real tokens of one segment
    scored_BT1 = (segment_ids_BT[:, 1:] == segment_ids_BT[:, :-1]) & (segment_ids_BT[:, 1:] != 0)
  lp_BT1 = jnp.where(scored_BT1, lp_BT1, 0.0)
  return jnp.concatenate([jnp.zeros_like(lp_BT1[:, :1]), lp_BT1], axis=1)


def _sample_per_row(logits_BV, key, temperature_B, sampling: SamplingConfig):
  """Like :func:`sample_logits` with one temperature per row (float [B]); rows with temperature 0 are greedy
  (argmax, sample log-prob 0), the others sample from :func:`filter_logits` at their temperature."""
  greedy_B = temperature_B <= 0
  t_B1 = jnp.where(greedy_B, 1.0, temperature_B).astype(jnp.float32)[:, None]
  l_BV = filter_logits(logits_BV.astype(jnp.float32) / t_B1, temperature=1.0, top_k=sampling.top_k,
                       top_p=sampling.top_p)
  sampled_B = jax.random.categorical(key, l_BV, axis=-1).astype(jnp.int32)
  tok_B = jnp.where(greedy_B, jnp.argmax(logits_BV, axis=-1).astype(jnp.int32), sampled_B)
  logp_B = jnp.take_along_axis(jax.nn.log_softmax(l_BV, axis=-1), tok_B[:, None], axis=-1)[:, 0]
  return tok_B, jnp.where(greedy_B, 0.0, logp_B)


def _generate(graphdef, sampling: SamplingConfig, params, prompt_BP, prompt_lens_B, key, temperature_B=None,
              state=None):
  model = nnx.merge(graphdef, params)
  b, p = prompt_BP.shape
  n = sampling.max_new_tokens
  pad_B = p - prompt_lens_B
  prompt_valid_BP = jnp.arange(p)[None, :] >= pad_B[:, None]
  positions_BP = jnp.maximum(jnp.arange(p)[None, :] - pad_B[:, None], 0)
  if state is None:  # a fresh cache; the prompt at slots [0, P), new tokens at [P, P + N)
    start, pos0_B = 0, None
    s = sampling.cache_len or p + n
    cache = model.init_cache(b, s)
    kv_valid_BS = jnp.concatenate([prompt_valid_BP, jnp.ones((b, n), bool)], axis=1)
    if s > p + n:
      kv_valid_BS = jnp.concatenate([kv_valid_BS, jnp.zeros((b, s - p - n), bool)], axis=1)
  else:  # continue: this prompt at [length, length + P); RoPE positions after each row's earlier tokens
    start, pos0_B, cache = state["length"], state["next_pos_B"], state["cache"]
    kv_valid_BS = jax.lax.dynamic_update_slice(
        state["kv_valid_BS"], jnp.concatenate([prompt_valid_BP, jnp.ones((b, n), bool)], axis=1), (0, start))
    positions_BP = positions_BP + pos0_B[:, None]
  logits_BPV, cache = model.decode(prompt_BP, cache, start=start, positions_BT=positions_BP,
                                   kv_valid_BS=kv_valid_BS)
  stops = sampling.stops

  def cond(carry):
    i, done_B = carry[0], carry[3]
    return (i < n) & ~jnp.all(done_B)

  def body(carry):
    i, cache, logits_BV, done_B, toks_BN, lp_BN, slp_BN, key, kv_valid_BS = carry
    key, sub = jax.random.split(key)
    if temperature_B is None:
      tok_B, slp_B = sample_logits(logits_BV, sub, temperature=sampling.temperature, top_k=sampling.top_k,
                                   top_p=sampling.top_p)
    else:
      tok_B, slp_B = _sample_per_row(logits_BV, sub, temperature_B, sampling)
    lp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV, axis=-1), tok_B[:, None], axis=-1)[:, 0]
    live_B = ~done_B
    tok_B = jnp.where(live_B, tok_B, sampling.pad_id)
    toks_BN = toks_BN.at[:, i].set(tok_B)
    lp_BN = lp_BN.at[:, i].set(jnp.where(live_B, lp_B, 0.0))
    slp_BN = slp_BN.at[:, i].set(jnp.where(live_B, slp_B, 0.0))
    if stops:
      done_B = done_B | jnp.isin(tok_B, jnp.asarray(stops, jnp.int32))
    # A finished row's padding goes into the cache as invalid slots (no attention, no MoE capacity), so that a
    # continuation sees only its real tokens; live rows are unaffected.
    kv_valid_BS = jax.lax.dynamic_update_slice(kv_valid_BS, live_B[:, None], (0, start + p + i))
    pos_B1 = (prompt_lens_B + i)[:, None] if pos0_B is None else (pos0_B + prompt_lens_B + i)[:, None]
    logits_B1V, cache = model.decode(tok_B[:, None], cache, start=start + p + i, positions_BT=pos_B1,
                                     kv_valid_BS=kv_valid_BS)
    return i + 1, cache, logits_B1V[:, 0], done_B, toks_BN, lp_BN, slp_BN, key, kv_valid_BS

  init = (jnp.int32(0), cache, logits_BPV[:, -1], jnp.zeros((b,), bool),
          jnp.full((b, n), sampling.pad_id, jnp.int32), jnp.zeros((b, n), jnp.float32),
          jnp.zeros((b, n), jnp.float32), key, kv_valid_BS)
  steps, cache, _, done_B, toks_BN, lp_BN, slp_BN, _, kv_valid_BS = jax.lax.while_loop(cond, body, init)
  # Mask: generated tokens up to and including the first stop token (and only the steps actually run).
  idx_N = jnp.arange(n)
  if stops:
    is_stop_BN = jnp.isin(toks_BN, jnp.asarray(stops, jnp.int32))
    first_stop_B = jnp.where(jnp.any(is_stop_BN, axis=1), jnp.argmax(is_stop_BN, axis=1), n)
    lengths_B = jnp.minimum(first_stop_B + 1, steps)
  else:
    lengths_B = jnp.full((b,), steps)
  mask_BN = idx_N[None, :] < lengths_B[:, None]
  toks_BN = jnp.where(mask_BN, toks_BN, sampling.pad_id)
  out = {
      "tokens": jnp.concatenate([prompt_BP, toks_BN], axis=1),
      "new_tokens": toks_BN,
      "mask": mask_BN,
      "sequence_mask": jnp.concatenate([prompt_valid_BP, mask_BN], axis=1),
      "logprobs": jnp.where(mask_BN, lp_BN, 0.0),
      "sample_logprobs": jnp.where(mask_BN, slp_BN, 0.0),
      "lengths": lengths_B.astype(jnp.int32),
      "done": done_B,
  }
  if sampling.return_state:
    next_pos_B = prompt_lens_B + lengths_B if pos0_B is None else pos0_B + prompt_lens_B + lengths_B
    out["state"] = {
        "cache": cache,
        # Slots past a row's length (unrun steps, padding after its stop) hold no real token.
        "kv_valid_BS": jax.lax.dynamic_update_slice(kv_valid_BS, mask_BN, (0, start + p)),
        "length": jnp.asarray(start + p + n, jnp.int32),
        "next_pos_B": next_pos_B.astype(jnp.int32),
    }
  return out


@functools.lru_cache(maxsize=64)
def make_generate_fn(graphdef, sampling: SamplingConfig):
  """Jitted ``fn(params, prompt_BP, prompt_lens_B, key, temperature_B=None, state=None) -> dict`` (see the module
  docstring; ``temperature_B`` and ``state`` as in :func:`generate`).

  ``params`` is the state from ``nnx.split(model)`` (or ``nnx.split(model, nnx.Param)`` when the graphdef was
  split the same way); one compilation per (graphdef, sampling, shapes).
  """
  sampling.validate()
  return jax.jit(functools.partial(_generate, graphdef, sampling))


def generate(model: nnx.Module, prompt_BP, prompt_lens_B, key, *, temperature_B=None, state=None,
             **sampling_kwargs):
  """Convenience wrapper: splits ``model``, builds :class:`SamplingConfig` from kwargs and runs the jitted
  sampler. Prompts are left-padded (see :func:`left_pad`).

  ``temperature_B`` (float [B], optional): one temperature per row instead of ``temperature`` (0 = greedy row).
  ``state`` (the ``"state"`` of an earlier call with ``return_state=True``): continue that conversation; see
  :func:`continue_generate`.
  """
  graphdef, params = nnx.split(model)
  prompt_BP = jnp.asarray(prompt_BP, jnp.int32)
  prompt_lens_B = jnp.asarray(prompt_lens_B, jnp.int32)
  if prompt_BP.ndim != 2 or prompt_lens_B.shape != prompt_BP.shape[:1]:
    raise ValueError(f"prompt must be [B, P] with lengths [B], got {prompt_BP.shape} and {prompt_lens_B.shape}")
  if temperature_B is not None:
    temperature_B = jnp.asarray(temperature_B, jnp.float32)
    if temperature_B.shape != prompt_BP.shape[:1]:
      raise ValueError(f"temperature_B must be [B]={prompt_BP.shape[:1]}, got {temperature_B.shape}")
    if bool(jnp.any(temperature_B < 0)):
      raise ValueError("temperature_B must be >= 0 (0 = greedy)")
  sampling = SamplingConfig(**sampling_kwargs)
  if state is not None:
    s = state["kv_valid_BS"].shape[1]
    need = int(state["length"]) + prompt_BP.shape[1] + sampling.max_new_tokens
    if need > s or state["kv_valid_BS"].shape[0] != prompt_BP.shape[0]:
      raise ValueError(f"the continuation needs {need} cache slots for batch {prompt_BP.shape[0]}; the state has "
                       f"{s} for batch {state['kv_valid_BS'].shape[0]} (raise cache_len in the first call)")
  fn = make_generate_fn(graphdef, sampling)
  return fn(params, prompt_BP, prompt_lens_B, key, temperature_B, state)


def continue_generate(model: nnx.Module, state, prompt_BP, prompt_lens_B, key, **kwargs):
  """Multi-turn generation: appends the (left-padded) ``prompt_BP`` to the conversation held in ``state`` (the
  ``"state"`` output of :func:`generate` with ``return_state=True``) and generates after it, without recomputing
  the prefix. The new tokens go to cache slots [length, length + P + N); RoPE positions continue from each row's
  last real token, and earlier padding (left padding, tokens after a stop) stays masked, so the result equals
  generating from the concatenated real tokens of each row. ``kwargs`` as for :func:`generate` (pass
  ``return_state=True`` to continue again); the first call's ``cache_len`` must leave room.
  """
  return generate(model, prompt_BP, prompt_lens_B, key, state=state, **kwargs)
