"""Self-Lengthen's string-level pieces, as in the released code (QwenLM/Self-Lengthen @ 004e880a73f6).

All host-side, pure Python (no jit): word counting, the response filters, the acceptance rule of one extension
job, the length-biased drop of short samples, the line degradation of the Extender's SFT inputs, the
length-following score of ``eval/length_following_eval.py`` and the length-constraint sampler of
``eval/add_length_control.py``.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

# CJK ideographs, CJK symbols and punctuation, full-width forms: one word each (``utils.count_words``).
_CJK = r"[\u4e00-\u9fff\u3000-\u303f\uff00-\uffef]"
# ``llama/utils.py``: the response must end with one of these (after rstrip). '...' can never equal one character.
LLAMA_END = frozenset({".", "!", "?", ",", ";", ":", "-", "...", '"', "'", ")", "]", "}", ">", "`"})
# ``qwen/utils.py``: CJK sentence ends, ellipsis, closing quotes and brackets.
QWEN_END = frozenset({"。", "！", "？", "...", "”", ")", "]", "}", ">", "）", "】", "’", "…", "`"})
META_WORDS = ("revised", "revision", "response", "version", "paragraph")  # llama: meta-talk in the edge lines
NGRAM_N = {"llama": 10, "qwen": 13}
FLAVOURS = tuple(NGRAM_N)


def count_words(text: str) -> int:
  """Words as the released code counts them: each CJK character or CJK/full-width punctuation mark is one
  word; the rest (CJK replaced by spaces) is split on whitespace, each piece one word."""
  cjk = re.findall(_CJK, text)
  rest = re.sub(_CJK, " ", text).split()
  return len(cjk) + len(rest)


def ends_with_punctuation(text: str, flavour: str = "llama") -> bool:
  """Whether ``text.rstrip()`` is non-empty and its last character is in the flavour's terminal set."""
  marks = _flavour(flavour, LLAMA_END, QWEN_END)
  t = text.rstrip()
  return bool(t) and t[-1] in marks


def units(text: str, flavour: str = "llama") -> list[str]:
  """The n-gram units: whitespace words (llama); for qwen, each maximal run of ASCII characters (spaces
  included) is one unit and every non-ASCII character its own unit. The qwen rule starts from a sentinel
  non-ASCII "last character", so an ASCII first character opens a unit; a non-ASCII character always stands
  alone, and an ASCII character right after a non-ASCII one opens a new unit."""
  if _flavour(flavour, "llama", "qwen") == "llama":
    return text.split()
  out: list[str] = []
  last_ascii = False
  for ch in text:
    if ch.isascii() and last_ascii:
      out[-1] += ch
    else:
      out.append(ch)
    last_ascii = ch.isascii()
  return out


def repeated_ngram(text: str, flavour: str = "llama", n: int | None = None) -> tuple[str, ...] | None:
  """The first n-gram of :func:`units` that occurs a second time (``n`` defaults to the flavour's 10 / 13),
  or None. The released code scans left to right and fails at the first repeat; overlapping repeats count."""
  n = n or NGRAM_N[_flavour(flavour, "llama", "qwen")]
  u = units(text, flavour)
  seen = set()
  for i in range(n - 1, len(u)):
    g = tuple(u[i - n + 1:i + 1])
    if g in seen:
      return g
    seen.add(g)
  return None


def has_meta_talk(text: str) -> bool:
  """llama's check: one of :data:`META_WORDS` (substring, case-sensitive) in the first 2 or last 3 lines of
  ``text.rstrip()``."""
  lines = text.rstrip().split("\n")
  edge = "\n".join(lines[:2] + lines[-3:])
  return any(w in edge for w in META_WORDS)


def check_details(text: str, flavour: str = "llama", *, meta_talk: bool = True) -> dict[str, bool]:
  """Each filter of ``check_response`` separately: ``punctuation`` (ends with a terminal mark), ``repetition``
  (no repeated n-gram), ``meta`` (llama with ``meta_talk``: no meta words in the edge lines; always True for
  qwen) and ``ok`` (all of them)."""
  flavour = _flavour(flavour, "llama", "qwen")
  d = {"punctuation": ends_with_punctuation(text, flavour),
       "repetition": repeated_ngram(text.rstrip(), flavour) is None,
       "meta": not (flavour == "llama" and meta_talk and has_meta_talk(text))}
  d["ok"] = all(d.values())
  return d


def check_response(text: str, flavour: str = "llama", *, meta_talk: bool = True) -> bool:
  """The released ``check_response``: terminal punctuation, (llama) no meta-talk, no repeated n-gram."""
  return check_details(text, flavour, meta_talk=meta_talk)["ok"]


def accept_extension(initial: str, best: str, *, min_gain: float = 1.2) -> bool:
  """An extension job succeeds when its best text has strictly more than ``min_gain`` times the words of the
  initial response (``count_words(best) > 1.2 * count_words(initial)``). The filters are applied to every
  micro-iteration's candidate before it can become ``best`` (:func:`better_candidate`)."""
  return count_words(best) > min_gain * count_words(initial)


def better_candidate(candidate: str, best: str, flavour: str = "llama", *, meta_talk: bool = True) -> bool:
  """A micro-iteration's output replaces the current text when it passes the filters and has more words."""
  return check_response(candidate, flavour, meta_talk=meta_talk) and count_words(candidate) > count_words(best)


def split_pieces(text: str) -> list[str]:
  """Blank-line paragraphs; when that gives at most 2 pieces, lines instead."""
  pieces = text.split("\n\n")
  if len(pieces) <= 2:
    pieces = text.split("\n")
  return pieces


def first_half(text: str) -> str:
  """Stage 1's input: the first ⌊n/2⌋ pieces of :func:`split_pieces`, joined by blank lines."""
  pieces = split_pieces(text)
  return "\n\n".join(pieces[:len(pieces) // 2])


def keep_two_thirds(text: str) -> str:
  """Stage 1's output kept: its first ⌊2n/3⌋ blank-line paragraphs (``len * 2 // 3``), joined by blank lines."""
  paras = text.split("\n\n")
  return "\n\n".join(paras[:len(paras) * 2 // 3])


def degrade_lines(text: str, rng: np.random.Generator, p_keep: float = 0.8, joiner: str = "\n") -> str:
  """The Extender's SFT input: each line of ``text`` kept with probability ``p_keep`` (one uniform draw per
  line, kept when ``u < p_keep``), kept lines joined by ``joiner`` (llama "\\n", qwen "\\n\\n")."""
  lines = text.split("\n")
  u = rng.random(len(lines))
  return joiner.join(l for l, x in zip(lines, u) if x < p_keep)


def drop_short_ranks(lengths: Sequence[int]) -> np.ndarray:
  """``drop_short``'s rank per item: 1 − (index of the first occurrence of the item's length in the sorted
  lengths) / N; the shortest has rank 1, ties share the rank of their first occurrence."""
  lengths = list(lengths)
  srt = sorted(lengths)
  return np.array([1.0 - srt.index(x) / len(lengths) for x in lengths], np.float64)


def drop_short_keep_prob(lengths: Sequence[int]) -> np.ndarray:
  """The keep probability per item: max(0, 1 − 2·rank³) (:func:`drop_short_ranks`)."""
  return np.maximum(0.0, 1.0 - 2.0 * drop_short_ranks(lengths) ** 3)


def drop_short(lengths: Sequence[int], rng: np.random.Generator) -> np.ndarray:
  """Indices kept by ``drop_short``: item i is kept when its uniform draw ``u_i > 2·rank_i³`` (the released
  code's ``random.random() > 2 * rank ** 3``; one draw per item, in order)."""
  u = rng.random(len(lengths))
  return np.nonzero(u > 2.0 * drop_short_ranks(lengths) ** 3)[0]


# ------------------------------------------------------------------------------------------ length following

CONSTRAINT_TYPES = ("about", "range", "above", "below")


def target_interval(kind: str, x: float, hi: float | None = None) -> tuple[float, float]:
  """The accepted interval [a, b] of a constraint: about X → [0.8X, 1.2X]; range lo–hi → [lo, hi]; above X →
  [X, 1.5X]; below X → [0.5X, X]."""
  if kind == "about":
    return 0.8 * x, 1.2 * x
  if kind == "range":
    if hi is None:
      raise ValueError("a 'range' constraint needs hi")
    return float(x), float(hi)
  if kind == "above":
    return float(x), 1.5 * x
  if kind == "below":
    return 0.5 * x, float(x)
  raise ValueError(f"constraint kind {kind!r} is not one of {CONSTRAINT_TYPES}")


def length_following_score(length: float, kind: str, x: float, hi: float | None = None) -> float:
  """``length_following_eval.py``: 1 inside [a, b]; below, max(0, 2ℓ/a − 1); above, max(0, 3 − 2ℓ/b)."""
  a, b = target_interval(kind, x, hi)
  if a <= length <= b:
    return 1.0
  if length < a:
    return max(length / a * 2 - 1, 0.0)
  return max(3 - length / b * 2, 0.0)


def num_round(x: int, num: int = 1000) -> tuple[int, int, int]:
  """``add_length_control.num_round``: (nearest, floor, ceil) multiple of the unit: ``num`` for x > 1000, 100
  for 100 < x < 1000, 10 for 10 < x < 100; x ≤ 10 is returned as is (the released code returns a bare int there,
  here all three); exactly 100 → (100, 90, 100), 1000 → (1000, 900, 1000). Python's ``round`` (ties to even)."""
  if x <= 10:
    return x, x, x
  if x < 100:
    num = 10
  if x == 100:
    return 100, 90, 100
  if 100 < x < 1000:
    num = 100
  if x == 1000:
    return 1000, 900, 1000
  return round(x / num) * num, math.floor(x / num) * num, math.ceil(x / num) * num


CONSTRAINT_TEXT = {"about": "around {} words", "range": "{}-{} words", "above": "more than {} words",
                   "below": "less than {} words"}


def sample_length_constraint(length: int, rng: np.random.Generator, *, lo: int, hi: int,
                             coarse_unit: int = 2000, fine_unit: int = 1000, p_coarse: float = 0.2
                             ) -> dict:
  """``add_length_control.py`` for one response of ``length`` words in [lo, hi): the unit is ``coarse_unit``
  with probability ``p_coarse`` else ``fine_unit`` (it only matters above 1000 words, see :func:`num_round`);
  (round, floor, ceil) of the length, ceil capped at ``hi``, floor raised to ``lo``; then the type by one
  uniform r: about (r < 0.4, X = round), range (< 0.65, floor–ceil), above (< 0.75, "more than floor"), below
  (else, "less than ceil"). Returns ``{kind, x, hi, text}`` (``hi`` for range only)."""
  num = coarse_unit if rng.random() < p_coarse else fine_unit
  rnd, mn, mx = num_round(int(length), num)
  mx, mn = min(mx, hi), max(mn, lo)
  r = rng.random()
  if r < 0.4:
    c = {"kind": "about", "x": rnd, "hi": None}
  elif r < 0.65:
    c = {"kind": "range", "x": mn, "hi": mx}
  elif r < 0.75:
    c = {"kind": "above", "x": mn, "hi": None}
  else:
    c = {"kind": "below", "x": mx, "hi": None}
  c["text"] = render_constraint(c["kind"], c["x"], c["hi"])
  return c


def render_constraint(kind: str, x: int, hi: int | None = None) -> str:
  """The English constraint phrase of the released code (``around X words``, ``lo-hi words``, ...)."""
  if kind == "range":
    return CONSTRAINT_TEXT[kind].format(x, hi)
  return CONSTRAINT_TEXT[kind].format(x)


def _flavour(flavour, llama, qwen):
  if flavour == "llama":
    return llama
  if flavour == "qwen":
    return qwen
  raise ValueError(f"flavour {flavour!r} is not one of {FLAVOURS}")
