"""SEIF's miniature world: seed questions, a small constraint vocabulary the tiny Follower can satisfy, a random
constraint-set sampler, a rule-based solver that writes compliant answers (the Follower's SFT data) and the
held-out instruction set of fixed difficulty levels.

Everything is generated from the config's word lists with NumPy generators (``lmx.core.rng.np_stream``), so a
seed fixes the data. Prompts are byte strings (``lmx.datasets.text`` byte tokenizer).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from lmx.envs import instructions as I

TOPICS = ("sea", "forest", "city", "river", "mountain", "garden", "winter", "desert", "island", "market", "night",
          "school", "farm", "bridge", "storm", "library", "train", "castle", "lake", "kitchen", "village", "road",
          "harbor", "meadow", "cave", "festival", "museum", "valley", "beach", "tower", "park", "field")
ADJS = ("calm", "big", "old", "bright", "quiet", "cold", "warm", "green", "dark", "busy", "small", "wide")
VERBS = ("looks", "feels", "seems", "stays", "grows", "shines")
ADVS = ("bright", "still", "soft", "fine", "good", "nice")
FILLER = ("very", "much", "here", "now", "today", "indeed", "truly", "also", "just", "really", "quite", "too")
QUESTION_TEMPLATES = ("Describe the {t}.", "Tell me about the {t}.", "Write about the {t}.", "What is the {t} like?")


@dataclasses.dataclass(frozen=True)
class Vocab:
  """The constraint vocabulary of the miniature (what the Instructor may propose and the random sampler draws)."""
  keywords: tuple = ("sun", "sea", "tree", "bird", "cat", "rain", "moon", "star", "fish", "wind")
  end_phrases: tuple = ("bye", "the end", "ok", "thanks")
  start_phrases: tuple = ("yes", "well", "so")
  nochars: tuple = ("a", "e", "o", "s", "t")
  max_words_lt: tuple = (4, 12)  # words<N for N in [lo, hi]
  min_words_ge: tuple = (3, 10)  # words>=N
  kinds: tuple = ("lower", "upper", "nocomma", "quote", "incl", "excl", "nochar", "words_lt", "words_ge", "end",
                  "start")

  @classmethod
  def from_config(cls, c) -> "Vocab":
    return cls(**{f.name: tuple(c[f.name]) for f in dataclasses.fields(cls) if f.name in c})


def questions(split: str) -> list[tuple[str, str]]:
  """``(topic, question)`` pairs; ``split``: ``"train"`` (templates 0-2) or ``"heldout"`` (template 3)."""
  tmpl = QUESTION_TEMPLATES[:3] if split == "train" else QUESTION_TEMPLATES[3:]
  return [(t, q.format(t=t)) for t in TOPICS for q in tmpl]


def sample_constraint(vocab: Vocab, rng: np.random.Generator, kind: str | None = None) -> I.Constraint:
  """One random constraint of ``kind`` (random when None) with random parameters from the vocabulary."""
  kind = kind or vocab.kinds[rng.integers(len(vocab.kinds))]
  pick = lambda xs: xs[rng.integers(len(xs))]  # noqa: E731
  if kind in ("lower", "upper", "nocomma", "quote"):
    return I.parse(kind)[0]
  if kind == "incl":
    return I.Constraint.make("keywords:existence", keywords=(pick(vocab.keywords),))
  if kind == "excl":
    return I.Constraint.make("keywords:forbidden_words", forbidden_words=(pick(vocab.keywords + TOPICS[:4]),))
  if kind == "nochar":
    return I.Constraint.make("lmx:forbidden_chars", chars=pick(vocab.nochars))
  if kind == "words_lt":
    return I.Constraint.make("length_constraints:number_words", num_words=int(rng.integers(
        vocab.max_words_lt[0], vocab.max_words_lt[1] + 1)), relation=I.LESS)
  if kind == "words_ge":
    return I.Constraint.make("length_constraints:number_words", num_words=int(rng.integers(
        vocab.min_words_ge[0], vocab.min_words_ge[1] + 1)), relation=I.AT_LEAST)
  if kind == "end":
    return I.Constraint.make("startend:end_checker", end_phrase=pick(vocab.end_phrases))
  if kind == "start":
    return I.Constraint.make("lmx:start_checker", start_phrase=pick(vocab.start_phrases))
  raise ValueError(f"unknown constraint kind {kind!r}; valid: {vocab.kinds}")


def sample_set(vocab: Vocab, rng: np.random.Generator, n: int, *, valid: bool = True, max_chars: int | None = None,
               tries: int = 200) -> tuple[I.Constraint, ...]:
  """``n`` distinct random constraints; with ``valid`` redrawn until the Filter accepts the set."""
  for _ in range(tries):
    cs = []
    while len(cs) < n:
      c = sample_constraint(vocab, rng)
      if c not in cs:
        cs.append(c)
    if not valid or I.is_valid(cs, max_chars=max_chars):
      return tuple(cs)
  raise RuntimeError(f"no valid set of {n} constraints found in {tries} tries; widen the vocabulary")


def base_words(topic: str, rng: np.random.Generator) -> list[str]:
  """A plain answer about ``topic`` as tokens (words, ',' and '.')."""
  pick = lambda xs: xs[rng.integers(len(xs))]  # noqa: E731
  form = rng.integers(3)
  if form == 0:
    return ["The", topic, "is", pick(ADJS), ",", "and", "it", pick(VERBS), pick(ADVS), "."]
  if form == 1:
    return ["A", pick(ADJS), topic, pick(VERBS), pick(ADVS), "."]
  return ["I", "like", "the", topic, ",", "it", "is", pick(ADJS), "."]


def _join(tokens: Sequence[str]) -> str:
  out = ""
  for t in tokens:
    out += t if (t in (",", ".") or not out) else " " + t
  return out


def solve(topic: str, constraints: Sequence[I.Constraint], rng: np.random.Generator, *,
          max_chars: int) -> str:
  """A rule-written answer to the question about ``topic`` that follows ``constraints`` when it can (the
  Follower's SFT target; check it with :func:`lmx.envs.instructions.adherence`)."""
  kw = [c.kw for c in constraints]
  ids = [c.id for c in constraints]
  forbidden = {w.lower() for k, i in zip(kw, ids) if i == "keywords:forbidden_words" for w in k["forbidden_words"]}
  chars = "".join(k["chars"] for k, i in zip(kw, ids) if i == "lmx:forbidden_chars")
  ok = lambda w: w.lower() not in forbidden and not any(ch in w.lower() for ch in chars)  # noqa: E731
  toks = [t for t in base_words(topic, rng) if t in (",", ".") or ok(t)]
  required = [k["keywords"][0] for k, i in zip(kw, ids) if i == "keywords:existence"]
  body_req = [w for w in required if not any(w.lower() in t.lower() for t in toks)]
  toks = toks[:-1] + body_req + ["."] if toks and toks[-1] == "." else toks + body_req
  start = next((k["start_phrase"] for k, i in zip(kw, ids) if i == "lmx:start_checker"), None)
  end = next((k["end_phrase"] for k, i in zip(kw, ids) if i == "startend:end_checker"), None)
  lt = min([k["num_words"] for k, i in zip(kw, ids) if i == "length_constraints:number_words"
            and k["relation"] == I.LESS] or [10**6])
  ge = max([k["num_words"] for k, i in zip(kw, ids) if i == "length_constraints:number_words"
            and k["relation"] == I.AT_LEAST] or [0])
  if "punctuation:no_comma" in ids:
    toks = [t for t in toks if t != ","]
  extra = I.count_words(" ".join(p for p in (start, end) if p))
  protected = {w.lower() for w in required}

  def n_words():
    return I.count_words(_join(toks)) + extra

  while n_words() >= lt:  # drop unprotected words from the end
    idx = [j for j, t in enumerate(toks) if t not in (",", ".") and t.lower() not in protected]
    if not idx:
      break
    del toks[idx[-1]]
  fill = [w for w in FILLER if ok(w)]
  j = 0
  while n_words() < ge and fill:
    toks.insert(len(toks) - 1 if toks and toks[-1] == "." else len(toks), fill[j % len(fill)])
    j += 1
  toks = [t for k, t in enumerate(toks)  # no comma first, doubled, last, before '.' or before a removed clause
          if not (t == "," and (k == 0 or toks[k - 1] == "," or k + 1 == len(toks) or toks[k + 1] == "."
                                or k + 2 >= len(toks) - 1))]
  body = _join(toks).strip().lstrip(",").strip()
  if end:
    body = body.rstrip(".").rstrip(",").strip() + " " + end
  if start:
    body = start + " " + body
  if "change_case:english_lowercase" in ids:
    body = body.lower()
  elif "change_case:english_capital" in ids:
    body = body.upper()
  if "startend:quotation" in ids:
    body = f'"{body}"'
  return body[:max_chars]


def prompt_text(question: str, constraints: Sequence[I.Constraint], style: str = "spec") -> str:
  """The Follower's prompt: the question, the constraints, then ``A:``. ``style``: ``"spec"`` (the text form
  the Instructor writes, ``C: lower; incl sun``: the shortest, what the CPU miniature uses), ``"short"`` or
  ``"ifeval"`` (one rendered instruction sentence per line)."""
  if style == "spec":
    return f"{question}\nC: {I.to_text(constraints)}\nA:" if constraints else f"{question}\nA:"
  return I.render_instruction(question, constraints, style) + "\nA:"


def instructor_prompt(question: str) -> str:
  """The Instructor's prompt: the seed question; it answers with constraints in the text form."""
  return f"{question}\nC:"


def heldout_set(vocab: Vocab, levels: Sequence[int], per_level: int, seed: int, *, max_chars: int) -> list[dict]:
  """The fixed evaluation instructions: for each level (number of constraints) ``per_level`` valid random sets
  on held-out questions; one list of ``{"level", "topic", "question", "constraints"}``."""
  from lmx.core.rng import np_stream

  qs = questions("heldout")
  out = []
  for lv in levels:
    rng = np_stream(seed, "seif_heldout", int(lv))
    for i in range(per_level):
      topic, q = qs[(i * 7 + lv) % len(qs)]
      out.append({"level": int(lv), "topic": topic, "question": q,
                  "constraints": sample_set(vocab, rng, int(lv), max_chars=max_chars)})
  return out
