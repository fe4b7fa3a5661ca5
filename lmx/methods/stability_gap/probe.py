"""A multiple-choice log-likelihood probe (an lm-eval-harness stand-in): which continuation follows the context?

An item is a context of ``context_len`` bytes ending at a space in a held-out document, its true continuation
(the next ``cont_len`` bytes) and ``n_distractors`` continuations of the same length that start after a space in
*other* held-out documents. The model scores each candidate by the summed log-likelihood of its bytes given the
context (all candidates have the same length, so sum and mean rank alike); the item is right when the true one
scores highest (ties count as wrong). Also reported: the margin, the true candidate's mean per-byte log-likelihood
minus the distractors' (nats per byte), a smoother signal than the accuracy of a few dozen items.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmx.core.config import ConfigError
from lmx.core.rng import np_stream
from lmx.datasets import text


@dataclasses.dataclass(frozen=True)
class ProbeItems:
  tokens_ICT: np.ndarray  # int32 [items, candidates, context_len + cont_len]
  label_I: np.ndarray  # index of the true candidate
  context_len: int


def _starts(ids: np.ndarray, context_len: int, cont_len: int) -> np.ndarray:
  """Positions just after a space with ``context_len`` bytes before and ``cont_len`` after."""
  p = np.nonzero(ids == ord(" "))[0] + 1
  return p[(p >= context_len) & (p + cont_len <= len(ids))]


def make_items(docs: Sequence[tuple[str, str]], *, n_items: int, context_len: int, cont_len: int,
               n_distractors: int, seed: int, name: str = "probe") -> ProbeItems:
  """``n_items`` items from the held-out ``docs`` (a seeded draw; the true candidate's slot is random too)."""
  ids = [text.encode(t) for _, t in docs]
  starts = [_starts(x, context_len, cont_len) for x in ids]
  usable = [i for i, s in enumerate(starts) if len(s)]
  if len(usable) < 2:
    raise ConfigError(f"probe: the held-out documents have {len(usable)} document(s) long enough for a "
                      f"{context_len}+{cont_len}-byte item; need at least 2 (distractors come from other documents)")
  # every usable split point is equally likely: documents weighted by their number of split points
  weights = np.array([len(starts[i]) for i in usable], np.float64)
  rng = np_stream(seed, name)
  c = n_distractors + 1
  tokens = np.zeros((n_items, c, context_len + cont_len), np.int32)
  labels = rng.integers(c, size=n_items)
  for k in range(n_items):
    d = usable[rng.choice(len(usable), p=weights / weights.sum())]
    p = int(rng.choice(starts[d]))
    ctx, true = ids[d][p - context_len: p], ids[d][p: p + cont_len]
    others = [i for i in usable if i != d]
    w = np.array([len(starts[i]) for i in others], np.float64)
    conts = []
    for _ in range(n_distractors):
      o = others[rng.choice(len(others), p=w / w.sum())]
      q = int(rng.choice(starts[o]))
      conts.append(ids[o][q: q + cont_len])
    conts.insert(int(labels[k]), true)
    for j, cont in enumerate(conts):
      tokens[k, j] = np.concatenate([ctx, cont])
  return ProbeItems(tokens, labels.astype(np.int32), context_len)


def continuation_logprobs(logits_fn: Callable, params, tokens_NT, context_len: int):
  """``[N]`` summed log p(token_t | tokens_<t) over the continuation positions ``t >= context_len``, where
  ``logits_fn(params, x_NT) -> logits [N, T, V]`` is the causal LM (``x = tokens[:, :-1]``)."""
  logits = logits_fn(params, tokens_NT[:, :-1]).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  tgt = tokens_NT[:, 1:]
  lp_NT = jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
  mask = jnp.arange(tgt.shape[1]) >= context_len - 1  # target index t-1 predicts token t
  return jnp.sum(jnp.where(mask[None], lp_NT, 0.0), axis=1)


def score(scores_IC, label_I, cont_len: int) -> dict:
  """Accuracy (argmax is the label; a tie with a distractor counts as wrong) and the per-byte margin."""
  s = np.asarray(scores_IC, np.float64)
  lab = np.asarray(label_I)
  true = s[np.arange(len(s)), lab]
  others = s.copy()
  others[np.arange(len(s)), lab] = -np.inf
  correct = true > others.max(axis=1)
  n_other = s.shape[1] - 1
  other_mean = (s.sum(axis=1) - true) / n_other
  return {"acc": float(correct.mean()), "margin": float(np.mean(true - other_mean) / cont_len)}


def make_probe(logits_fn: Callable, items: ProbeItems) -> Callable:
  """``probe(params) -> {"acc", "margin"}`` for fixed ``items`` (one jitted forward over all candidates)."""
  i, c, t = items.tokens_ICT.shape
  flat = jnp.asarray(items.tokens_ICT.reshape(i * c, t))
  cont_len = t - items.context_len
  f = jax.jit(lambda params, tok: continuation_logprobs(logits_fn, params, tok, items.context_len))

  def probe(params):
    return score(np.asarray(jax.device_get(f(params, flat))).reshape(i, c), items.label_I, cont_len)

  return probe
