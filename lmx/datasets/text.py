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


DOC_SEP = "\n\n"  # between documents when a corpus is read as one text


@functools.lru_cache(maxsize=None)
def python_docs_documents() -> tuple[tuple[str, str], ...]:
  """The ``pydoc_data.topics`` texts as (topic, text) documents, in sorted topic order."""
  from pydoc_data import topics

  return tuple((k, topics.topics[k]) for k in sorted(topics.topics))


def python_docs() -> str:
  """The ``pydoc_data.topics`` texts joined in sorted topic order."""
  return DOC_SEP.join(t for _, t in python_docs_documents())


CORPORA = {
    "python_docs": python_docs,
}
DOCUMENTS = {  # corpus -> its (doc_id, text) documents
    "python_docs": python_docs_documents,
}
SPLITS = ("document", "tail")


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


def split_documents(docs: Sequence[tuple[str, str]], eval_fraction: float, seed: int):
  """Held-out documents drawn at random: ``(train_docs, eval_docs)``, each in corpus order.

  Documents are visited in a permutation fixed by ``seed``; one joins the validation set while that keeps the
  validation characters within twice the target ``eval_fraction`` of the corpus, until the target is reached.
  Whole documents on either side: no document is cut, so train and validation share no text, and both sample
  the corpus's mix of documents rather than its last few.
  """
  lengths = np.array([len(t) for _, t in docs], np.int64)
  target = eval_fraction * lengths.sum()
  chosen, total = set(), 0
  for i in np.random.default_rng(seed).permutation(len(docs)).tolist():
    if total >= target:
      break
    if total + lengths[i] <= 2 * target:
      chosen.add(i)
      total += int(lengths[i])
  if not chosen:
    raise ConfigError(f"data.eval_fraction={eval_fraction} is smaller than half of every document; "
                      f"raise it or use data.split='tail'")
  train = [d for i, d in enumerate(docs) if i not in chosen]
  held = [d for i, d in enumerate(docs) if i in chosen]
  return train, held


def train_eval_windows(corpus: str, seq_len: int, eval_fraction: float, *, split: str = "document",
                       seed: int = 0):
  """The corpus as train and validation window sources, and a description of the split (for results.json).

  ``split='document'``: whole documents held out at random (:func:`split_documents`, fixed by ``seed``), so the
  validation text comes from the same distribution as the training text. ``split='tail'``: the last
  ``eval_fraction`` of the corpus text (the corpus's last documents: for ``python_docs`` an ASCII table).
  """
  if split not in SPLITS:
    raise ConfigError(f"data.split={split!r} is unknown; valid: {list(SPLITS)}")
  check_corpus(corpus)
  if split == "tail":
    tokens = encode(load_corpus(corpus))
    n_eval = max(int(len(tokens) * eval_fraction), seq_len + 1)
    train_tok, eval_tok = tokens[:-n_eval], tokens[-n_eval:]
    info = {"split": "tail", "eval_fraction": eval_fraction}
  else:
    train_docs, eval_docs = split_documents(DOCUMENTS[corpus](), eval_fraction, seed)
    train_tok = encode(DOC_SEP.join(t for _, t in train_docs))
    eval_tok = encode(DOC_SEP.join(t for _, t in eval_docs))
    info = {"split": "document", "seed": seed, "eval_fraction": eval_fraction,
            "train_documents": len(train_docs), "eval_documents": len(eval_docs),
            "eval_document_ids": [k for k, _ in eval_docs]}
  info.update(train_tokens=int(len(train_tok)), eval_tokens=int(len(eval_tok)),
              eval_fraction_actual=float(len(eval_tok) / (len(train_tok) + len(eval_tok))))
  return TokenWindows(train_tok, seq_len), TokenWindows(eval_tok, seq_len), info
