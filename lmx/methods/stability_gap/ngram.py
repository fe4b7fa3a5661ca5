"""A byte-level n-gram LM with add-k smoothing: the KenLM stand-in that ranks domain documents by perplexity.

KenLM (the paper's quality filter) is a modified-Kneser-Ney word n-gram model; here a byte n-gram with add-k
(Lidstone) smoothing plays its part, fit on the *general* corpus, so "low perplexity" means "reads like the
general text" (the paper fit its KenLM on a high-quality medical reference corpus instead):

  P(x | h) = (c(h x) + k) / (c(h) + k · V),     h = the previous n-1 bytes, V = the vocabulary size (256)

Each document is framed by n-1 copies of a padding symbol (256, outside the byte range) so its first bytes are
scored against "start of document" contexts. n-grams are hashed to int64 (base 257: exact for n <= 7) and counted
with ``np.unique``; lookups are ``np.searchsorted``.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

PAD = 256  # the start-of-document symbol (bytes are 0..255)
_BASE = 257


@dataclasses.dataclass(frozen=True)
class NgramLM:
  """Sorted hashed n-gram and context counts of an order-``order`` byte model (see the module docstring)."""
  order: int
  add_k: float
  vocab: int
  gram_keys: np.ndarray  # int64, sorted
  gram_counts: np.ndarray
  ctx_keys: np.ndarray
  ctx_counts: np.ndarray


def _as_ids(text: str | bytes | np.ndarray) -> np.ndarray:
  if isinstance(text, str):
    text = text.encode("utf-8", errors="replace")
  if isinstance(text, (bytes, bytearray)):
    return np.frombuffer(bytes(text), np.uint8).astype(np.int64)
  return np.asarray(text, np.int64)


def _hashes(ids: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
  """``(gram, context)`` hashes of every position of the padded document ``ids`` (one per real byte)."""
  x = np.concatenate([np.full(order - 1, PAD, np.int64), ids])
  n = len(ids)
  ctx = np.zeros(n, np.int64)
  for j in range(order - 1):  # the context h = x[i : i+order-1] of byte x[i+order-1]
    ctx = ctx * _BASE + x[j: j + n]
  gram = ctx * _BASE + x[order - 1: order - 1 + n]
  return gram, ctx


def fit(docs: Sequence[str | bytes | np.ndarray], *, order: int = 5, add_k: float = 0.1, vocab: int = 256) -> NgramLM:
  """Counts the n-grams of ``docs`` (each framed as in the module docstring)."""
  if not 1 <= order <= 7:
    raise ValueError(f"n-gram order must be in [1, 7] (int64 hashing), got {order}")
  if add_k <= 0:
    raise ValueError(f"add_k must be > 0 (unseen n-grams would get probability 0), got {add_k}")
  grams, ctxs = [], []
  for d in docs:
    g, c = _hashes(_as_ids(d), order)
    grams.append(g)
    ctxs.append(c)
  if not grams or not sum(len(g) for g in grams):
    raise ValueError("cannot fit an n-gram model on an empty corpus")
  gk, gc = np.unique(np.concatenate(grams), return_counts=True)
  ck, cc = np.unique(np.concatenate(ctxs), return_counts=True)
  return NgramLM(order, float(add_k), int(vocab), gk, gc, ck, cc)


def _lookup(keys: np.ndarray, counts: np.ndarray, q: np.ndarray) -> np.ndarray:
  i = np.clip(np.searchsorted(keys, q), 0, len(keys) - 1)
  return np.where(keys[i] == q, counts[i], 0)


def byte_logprobs(lm: NgramLM, doc: str | bytes | np.ndarray) -> np.ndarray:
  """Natural-log probability of each byte of ``doc`` under ``lm``."""
  g, c = _hashes(_as_ids(doc), lm.order)
  num = _lookup(lm.gram_keys, lm.gram_counts, g) + lm.add_k
  den = _lookup(lm.ctx_keys, lm.ctx_counts, c) + lm.add_k * lm.vocab
  return np.log(num) - np.log(den)


def perplexity(lm: NgramLM, doc: str | bytes | np.ndarray) -> float:
  """Per-byte perplexity ``exp(-mean log p)`` of ``doc`` (inf for an empty document)."""
  lp = byte_logprobs(lm, doc)
  return float(np.exp(-lp.mean())) if len(lp) else float("inf")


def rank_by_perplexity(lm: NgramLM, docs: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """``(order, ppl)``: document indices from lowest to highest perplexity (ties by index), and each one's ppl."""
  ppl = np.array([perplexity(lm, d) for d in docs], np.float64)
  return np.lexsort((np.arange(len(docs)), ppl)), ppl
