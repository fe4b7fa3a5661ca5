"""The embedded seed set: (topic, reference text) pairs from the docstrings of the CPython standard library.

Every class and function docstring of the stdlib sources (``ast``; test packages, ``site-packages``, ``idlelib``
and ``lib2to3`` skipped, as :mod:`lmx.datasets.text` does for its ``stdlib_docstrings`` corpus) whose leading
paragraphs are prose becomes one item: the topic is the dotted name (``json.decoder.JSONDecoder.decode``), the
text is the docstring's leading prose paragraphs (a paragraph is prose when none of its lines is indented, none
starts with ``>>>``, ``:``, ``-``, ``*`` or ``@`` and it has at least three words; the first non-prose paragraph
ends the text), each paragraph's lines kept as written. Items are in sorted (path, source) order; the split into
train / held-out topics is by module (a whole module's items on one side), from a hash of its path.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import os
import sysconfig

_SKIP_DIRS = ("test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "idlelib",
              "turtledemo", "ensurepip")
_BAD_START = (">>>", ":", "-", "*", "@", "+", "|", "=", "#", "..")


def _prose(paragraph: str) -> bool:
  lines = paragraph.split("\n")
  if any(not l.strip() or l[:1].isspace() or l.lstrip().startswith(_BAD_START) for l in lines):
    return False
  words = paragraph.split()
  return len(words) >= 3 and sum(w[:1].isalpha() for w in words) >= 0.6 * len(words) and paragraph.isascii()


def leading_prose(doc: str) -> str:
  """The docstring's leading prose paragraphs (see the module docstring), joined by blank lines; '' if none."""
  out = []
  for para in doc.strip().split("\n\n"):
    para = para.strip("\n")
    if not _prose(para):
      break
    out.append(para)
  return "\n\n".join(out)


@functools.lru_cache(maxsize=1)
def stdlib_items() -> tuple[tuple[str, str, str], ...]:
  """All ``(module path, topic, text)`` items of this Python's stdlib (cached; about 10k on CPython 3.11)."""
  root = sysconfig.get_paths()["stdlib"]
  paths = []
  for d, dirs, files in os.walk(root):
    dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS and not x.startswith("test"))
    paths += [os.path.join(d, f) for f in sorted(files) if f.endswith(".py") and not f.startswith("test")]
  items = []
  for path in sorted(paths):
    rel = os.path.relpath(path, root)
    module = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
    try:
      with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
      continue

    def visit(node, prefix):
      for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
          name = f"{prefix}.{child.name}"
          doc = ast.get_docstring(child)
          if doc and not child.name.startswith("_"):
            text = leading_prose(doc)
            if text:
              items.append((rel, name, text))
          visit(child, name)

    visit(tree, module)
  return tuple(items)


def heldout_module(path: str, fraction: float) -> bool:
  """Whether a module (by its relative path) is on the held-out side: the first 8 hex digits of its SHA-256
  as a fraction of 16⁸ below ``fraction``."""
  return int(hashlib.sha256(path.encode()).hexdigest()[:8], 16) / 16 ** 8 < fraction


def seed_sets(*, max_topic_chars: int, heldout_fraction: float):
  """``(train, heldout)`` lists of ``(topic, text)``: items whose topic has at most ``max_topic_chars``
  characters, split by module (:func:`heldout_module`)."""
  train, held = [], []
  for path, topic, body in stdlib_items():
    if len(topic) > max_topic_chars:
      continue
    (held if heldout_module(path, heldout_fraction) else train).append((topic, body))
  return train, held
