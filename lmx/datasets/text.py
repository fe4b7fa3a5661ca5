"""Embedded text corpora (ship with every Python; no download) and a byte-level tokenizer.

Corpora (``data.corpus``):
  ``python_docs``  the Python documentation topics in ``pydoc_data.topics`` (~465k characters).
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from lmx.core.config import ConfigError

PAD, BOS, EOS, SEP = 256, 257, 258, 259
VOCAB_SIZE = 260


def encode(text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
  """UTF-8 bytes as int32 token ids (0..255), optionally framed by BOS/EOS."""
  ids = np.frombuffer(text.encode("utf-8", errors="replace"), np.uint8).astype(np.int32)
  parts = ([np.array([BOS], np.int32)] if bos else []) + [ids] + ([np.array([EOS], np.int32)] if eos else [])
  return np.concatenate(parts)


def decode(ids: Sequence[int]) -> str:
  """Inverse of :func:`encode`; special tokens are dropped, EOS ends the text."""
  out = bytearray()
  for t in np.asarray(ids).tolist():
    if t == EOS:
      break
    if 0 <= t < 256:
      out.append(t)
  return out.decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=None)
def python_docs() -> str:
  """The ``pydoc_data.topics`` texts joined in sorted topic order."""
  from pydoc_data import topics

  return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


CORPORA = {
    "python_docs": python_docs,
}


def check_corpus(name: str) -> None:
  """Raises ConfigError unless ``name`` is a key of :data:`CORPORA`."""
  if name not in CORPORA:
    raise ConfigError(f"data.corpus={name!r} is unknown; valid corpora: {sorted(CORPORA)}")


def load_corpus(name: str) -> str:
  """The text of corpus ``name`` (a key of :data:`CORPORA`); an unknown name raises ConfigError."""
  check_corpus(name)
  return CORPORA[name]()


class TokenWindows:
  """Random-access source of non-overlapping windows of ``seq_len + 1`` tokens (inputs and shifted targets)."""

  def __init__(self, tokens: np.ndarray, seq_len: int):
    self.tokens = np.asarray(tokens, np.int32)
    self.seq_len = seq_len
    self.n = (len(self.tokens) - 1) // seq_len
    if self.n <= 0:
      raise ConfigError(f"data.seq_len={seq_len} is longer than the corpus ({len(self.tokens)} tokens)")

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> np.ndarray:
    s = int(i) * self.seq_len
    return self.tokens[s: s + self.seq_len + 1]


def train_eval_windows(corpus: str, seq_len: int, eval_fraction: float):
  """Splits the encoded corpus (train first, eval tail) into two window sources."""
  tokens = encode(load_corpus(corpus))
  n_eval = max(int(len(tokens) * eval_fraction), seq_len + 1)
  return TokenWindows(tokens[:-n_eval], seq_len), TokenWindows(tokens[-n_eval:], seq_len)
