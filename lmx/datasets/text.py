"""Embedded text corpora (ship with every Python; no download) and a byte-level tokenizer.

Corpora (``data.corpus``):
  ``python_docs``        the Python documentation topics in ``pydoc_data.topics`` (~465k characters).
  ``stdlib_docstrings``  every docstring of the CPython standard library's sources (an ``ast`` walk; test
                         packages, ``site-packages`` and ``idlelib`` excluded), one document per module
                         (~1.8M characters on CPython 3.11).
  ``legal``              licence texts found on this machine: the LICENSE*/LICENCE*/COPYING*/NOTICE* files of the
                         installed distributions (``importlib.metadata``) and ``/usr/share/common-licenses/*``
                         (Debian base-files) when present, with repeated paragraphs dropped (first copy kept), one
                         document per file. Its size depends on what is installed: :func:`corpus_info` gives size
                         and a content hash to record.
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


def _stdlib_dir() -> str:
  import sysconfig

  return sysconfig.get_paths()["stdlib"]


# Parts of the stdlib tree that are not the library proper: test suites, third-party installs, IDLE's own tests.
_STDLIB_SKIP_DIRS = ("test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3",
                     "turtledemo")


@functools.lru_cache(maxsize=None)
def stdlib_docstrings_documents() -> tuple[tuple[str, str], ...]:
  """The docstrings of every stdlib module (module, class and function docstrings in source order, cleaned by
  ``ast.get_docstring``) as (relative path, text) documents, in sorted path order; modules without docstrings
  and files that do not parse are skipped."""
  import ast
  import os

  root = _stdlib_dir()
  paths = []
  for d, dirs, files in os.walk(root):
    dirs[:] = sorted(x for x in dirs if x not in _STDLIB_SKIP_DIRS and not x.startswith("test"))
    paths += [os.path.join(d, f) for f in files if f.endswith(".py") and not f.startswith("test_")]
  docs = []
  for path in sorted(paths):
    try:
      with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
      continue
    parts = [ast.get_docstring(n) for n in ast.walk(tree)
             if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    parts = [p.strip() for p in parts if p and p.strip()]
    if parts:
      docs.append((os.path.relpath(path, root), DOC_SEP.join(parts)))
  return tuple(docs)


def stdlib_docstrings() -> str:
  """The stdlib docstrings (:func:`stdlib_docstrings_documents`) joined in path order."""
  return DOC_SEP.join(t for _, t in stdlib_docstrings_documents())


_LICENSE_NAME = ("LICENSE", "LICENCE", "COPYING", "NOTICE")
_NOT_TEXT = (".py", ".pyc", ".pyi", ".so", ".pyd", ".dll", ".json", ".html", ".h", ".c", ".cc", ".cpp", ".js")
COMMON_LICENSES = "/usr/share/common-licenses"


def _license_files() -> list[tuple[str, str]]:
  """(doc_id, text) of every licence file on this machine, sorted by doc_id (see :func:`legal_documents`)."""
  import importlib.metadata
  import os

  out = {}
  for dist in importlib.metadata.distributions():
    name = dist.metadata.get("Name") or "?"
    for f in dist.files or ():
      base = f.name.upper()
      if not base.startswith(_LICENSE_NAME) or f.suffix.lower() in _NOT_TEXT:
        continue
      try:
        t = f.read_text(encoding="utf-8")
      except (OSError, UnicodeDecodeError, ValueError):
        continue
      if t and t.strip():
        out[f"{name}:{f}"] = t
  if os.path.isdir(COMMON_LICENSES):
    for f in sorted(os.listdir(COMMON_LICENSES)):
      path = os.path.join(COMMON_LICENSES, f)
      if os.path.isfile(path) and not os.path.islink(path):  # GPL -> GPL-3 etc. are links: read the target once
        try:
          with open(path, encoding="utf-8") as fh:
            out[f"common-licenses:{f}"] = fh.read()
        except (OSError, UnicodeDecodeError):
          continue
  return sorted(out.items())


@functools.lru_cache(maxsize=None)
def legal_documents() -> tuple[tuple[str, str], ...]:
  """Licence texts on this machine as (source:path, text) documents in sorted id order. A paragraph (text between
  blank lines, compared with whitespace collapsed) already seen in an earlier document is dropped, so the many
  copies of the Apache, MIT and BSD texts count once; documents left empty are dropped."""
  seen, docs = set(), []
  for doc_id, t in _license_files():
    keep = []
    for para in t.replace("\r\n", "\n").split("\n\n"):
      key = " ".join(para.split())
      if key and key not in seen:
        seen.add(key)
        keep.append(para.strip("\n"))
    if keep:
      docs.append((doc_id, DOC_SEP.join(keep)))
  return tuple(docs)


def legal() -> str:
  """The licence texts (:func:`legal_documents`) joined in id order."""
  return DOC_SEP.join(t for _, t in legal_documents())


CORPORA = {
    "python_docs": python_docs,
    "stdlib_docstrings": stdlib_docstrings,
    "legal": legal,
}
DOCUMENTS = {  # corpus -> its (doc_id, text) documents
    "python_docs": python_docs_documents,
    "stdlib_docstrings": stdlib_docstrings_documents,
    "legal": legal_documents,
}
SPLITS = ("document", "tail")


def check_corpus(name: str) -> None:
  """Raises ConfigError unless ``name`` is a key of :data:`CORPORA`."""
  if name not in CORPORA:
    raise ConfigError(f"data.corpus={name!r} is unknown; valid corpora: {sorted(CORPORA)}")


def corpus_info(name: str) -> dict:
  """Size and content hash of corpus ``name`` (for results.json: the machine-dependent corpora differ by host)."""
  import hashlib

  check_corpus(name)
  t = load_corpus(name)
  return {"corpus": name, "documents": len(DOCUMENTS[name]()), "chars": len(t), "bytes": len(t.encode("utf-8")),
          "sha256": hashlib.sha256(t.encode("utf-8")).hexdigest()}


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


def file_documents(path: str) -> tuple[tuple[str, str], ...]:
  """A UTF-8 text file as documents: its paragraphs (text between blank lines), ids ``<file>:<paragraph>``.
  ConfigError (naming ``data.text_file``) for a missing, unreadable, non-UTF-8 or empty file."""
  import os
  import re

  full = os.path.expanduser(path)
  try:
    with open(full, encoding="utf-8") as f:
      content = f.read()
  except FileNotFoundError:
    raise ConfigError(f"data.text_file={path!r}: no such file") from None
  except UnicodeDecodeError as e:
    raise ConfigError(f"data.text_file={path!r}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  except OSError as e:
    raise ConfigError(f"data.text_file={path!r}: cannot be read ({e.strerror})") from None
  paragraphs = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", content) if p.strip()]
  if not paragraphs:
    raise ConfigError(f"data.text_file={path!r}: the file has no text")
  name = os.path.basename(full)
  return tuple((f"{name}:{i}", p) for i, p in enumerate(paragraphs))


def train_eval_windows(corpus: str, seq_len: int, eval_fraction: float, *, split: str = "document",
                       seed: int = 0, encode_fn=None, text_file: str = ""):
  """The corpus as train and validation window sources, and a description of the split (for results.json).

  ``split='document'``: whole documents held out at random (:func:`split_documents`, fixed by ``seed``), so the
  validation text comes from the same distribution as the training text. ``split='tail'``: the last
  ``eval_fraction`` of the corpus text (the corpus's last documents: for ``python_docs`` an ASCII table).
  ``encode_fn(text) -> ids`` tokenizes (default: bytes, :func:`encode`); ``text_file`` (a path) replaces the
  embedded corpus by a file's paragraphs (:func:`file_documents`). The info says how many bytes of text the
  validation tokens hold (``eval_bytes``), so a CE per token converts to bits per byte.
  """
  if split not in SPLITS:
    raise ConfigError(f"data.split={split!r} is unknown; valid: {list(SPLITS)}")
  enc = encode_fn or (lambda t: encode(t))
  if text_file:
    docs = file_documents(text_file)
  else:
    check_corpus(corpus)
    docs = DOCUMENTS[corpus]()
  if split == "tail":
    whole = DOC_SEP.join(t for _, t in docs)
    if encode_fn is None:
      tokens = encode(whole)
      n_eval = max(int(len(tokens) * eval_fraction), seq_len + 1)
      train_tok, eval_tok = tokens[:-n_eval], tokens[-n_eval:]
      eval_text_bytes = int(len(eval_tok))
    else:  # cut at a character: the tokenizer sees whole characters on each side
      n_chars = max(int(len(whole) * eval_fraction), 1)
      train_tok = np.asarray(enc(whole[:-n_chars]), np.int32)
      eval_tok = np.asarray(enc(whole[-n_chars:]), np.int32)
      eval_text_bytes = len(whole[-n_chars:].encode("utf-8"))
    info = {"split": "tail", "eval_fraction": eval_fraction}
  else:
    train_docs, eval_docs = split_documents(docs, eval_fraction, seed)
    eval_text = DOC_SEP.join(t for _, t in eval_docs)
    train_tok = np.asarray(enc(DOC_SEP.join(t for _, t in train_docs)), np.int32)
    eval_tok = np.asarray(enc(eval_text), np.int32)
    eval_text_bytes = len(eval_text.encode("utf-8"))
    info = {"split": "document", "seed": seed, "eval_fraction": eval_fraction,
            "train_documents": len(train_docs), "eval_documents": len(eval_docs),
            "eval_document_ids": [k for k, _ in eval_docs]}
  info.update(train_tokens=int(len(train_tok)), eval_tokens=int(len(eval_tok)),
              eval_fraction_actual=float(len(eval_tok) / (len(train_tok) + len(eval_tok))),
              eval_bytes=int(eval_text_bytes))
  return TokenWindows(train_tok, seq_len), TokenWindows(eval_tok, seq_len), info
