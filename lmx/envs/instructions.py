r"""Verifiable instructions: constraint types with parameters, rule-based checkers (SEIF's Judger), renderers to
instruction text, a compact text form the Instructor writes (parsed back, unparsable -> None), IFEval
compatibility and the Filter (a conflict table that rejects contradictory or impossible constraint sets).

A :class:`Constraint` is ``(id, kwargs)``. Where a type is one of IFEval's (google-research
``instruction_following_eval``), the id, the kwargs names and the checker's semantics are IFEval's, so
:func:`ifeval_checkers` scores IFEval prompts (``instruction_id_list`` + ``kwargs``) with these checkers:

  keywords:existence            every keyword occurs (regex search, case-insensitive; substrings count)
  keywords:frequency            ``keyword`` occurs (case-insensitive findall) ``relation`` ("less than" /
                                "at least") ``frequency`` times
  keywords:forbidden_words      no forbidden word as a whole word (``\bword\b``, case-insensitive)
  keywords:letter_frequency     ``letter`` in the lowercased text ``let_relation`` ``let_frequency`` times
  change_case:english_lowercase ``str.islower()`` (IFEval also runs langdetect for English; not here)
  change_case:english_capital   ``str.isupper()`` (same remark)
  change_case:capital_word_frequency  all-caps words (``\w+`` tokens that are ``isupper``) vs the count
  punctuation:no_comma          no ","
  length_constraints:number_words      ``\w+`` tokens ``relation`` ``num_words``
  length_constraints:number_sentences  sentences (split after . ! ? followed by space/end) ``relation`` N
  length_constraints:number_paragraphs paragraphs split by ``***`` == N (empty first/last ones ignored,
                                       an empty inner one fails)
  detectable_format:number_bullet_lists  lines ``* x`` or ``- x`` == N
  detectable_format:json_format  the text (```json fences stripped) is ``json.loads``-able
  detectable_format:title        a ``<<title>>`` with non-blank content
  detectable_format:number_highlighted_sections  ``*x*`` / ``**x**`` spans with non-blank content >= N
  detectable_format:multiple_sections  ``len(re.split(r"\s?SPLITTER\s?\d+\s?", text)) - 1 >= N``
  detectable_format:constrained_response  contains "My answer is yes." / "no." / "maybe."
  detectable_content:postscript  a line-level match of the marker (P.S. / P.P.S / other)
  detectable_content:number_placeholders  ``[...]`` spans >= N
  startend:end_checker           ``text.strip().strip('"').lower().endswith(end_phrase.strip().lower())``
  startend:quotation             stripped text starts and ends with '"' (length > 1)
  combination:repeat_prompt      ``text.strip().lower().startswith(prompt_to_repeat.strip().lower())``
  combination:two_responses      exactly two non-empty, different responses separated by ``******``

lmx's own types (not in IFEval): ``lmx:start_checker`` (starts with a phrase, the mirror of end_checker: quotes
stripped, case-insensitive) and ``lmx:forbidden_chars`` (none of the characters, case-insensitive). IFEval's
``language:response_language`` needs langdetect and is not supported (a clear error; ``strict=False`` skips it).
Differences to IFEval in detail: no langdetect; ``\w+`` instead of nltk's ``word_tokenize`` for capital words;
a regex sentence splitter instead of IFEval's abbreviation-aware one.

Text form (what the Instructor writes): constraints joined by ``"; "``, each one of

  lower | upper | nocomma | json | quote | title | answer | ps
  incl WORD | excl WORD | nochar CHARS | end PHRASE | start PHRASE
  words<N | words>=N | sents<N | sents>=N | caps<N | caps>=N | freq WORD<N | freq WORD>=N
  letter X<N | letter X>=N | paras=N | bullets=N | highlights>=N | sections>=N | placeholders>=N

:func:`parse` returns a tuple of constraints or None (unknown code, bad number, empty phrase, duplicate).
:func:`to_text` is its inverse. :func:`render` gives the instruction text (``style="ifeval"``: IFEval's
wording; ``"short"``: a terse form for tiny models).

The Filter (:func:`conflicts`, :func:`is_valid`): pairwise rules (contradictions such as include and forbid one
word, lowercase with a case-sensitive capitalised literal or with all caps, count ranges that cannot overlap,
two end phrases neither of which ends the other, a required phrase with a forbidden character or a comma under
no-comma) and the paper's template incompatibilities (JSON with bullets, sections, paragraphs, two responses, or
a prompt to repeat that cannot start a JSON text); per-constraint impossibilities (counts < 1 where at least one
is needed, e.g. fewer than 1 word; with ``max_chars`` a length no answer of that budget can reach). Length,
tightness or difficulty alone is not a conflict. Note: IFEval's keyword checks ignore case, so a capitalised
keyword does *not* conflict with lowercase.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

LESS, AT_LEAST = "less than", "at least"
RELATIONS = (LESS, AT_LEAST)


@dataclasses.dataclass(frozen=True)
class Constraint:
  """One verifiable constraint: an instruction id (IFEval's where it exists) and its keyword arguments, stored
  as sorted ``(name, value)`` pairs (lists as tuples) so constraints hash and compare."""
  id: str
  params: tuple = ()

  @classmethod
  def make(cls, id: str, **kw) -> "Constraint":
    if id not in TYPES:
      raise KeyError(f"unknown constraint id {id!r}; known: {sorted(TYPES)}")
    norm = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items() if v is not None}
    return cls(id, tuple(sorted(norm.items())))

  @property
  def kw(self) -> dict:
    return dict(self.params)

  def check(self, text: str) -> bool:
    """Whether ``text`` follows this constraint (the rule-based Judger)."""
    return bool(TYPES[self.id].check(text, **self.kw))

  def render(self, style: str = "ifeval") -> str:
    return render(self, style)

  @property
  def category(self) -> str:
    return TYPES[self.id].category


@dataclasses.dataclass(frozen=True)
class ConstraintType:
  """A constraint type: its id, SEIF category (A lexical, B structural, C formatting, D language/style,
  E special), checker ``check(text, **kwargs) -> bool`` and renderers."""
  id: str
  category: str
  check: Callable[..., bool]
  ifeval: Callable[..., str]
  short: Callable[..., str]


# ------------------------------------------------------------------------------------------ checkers


def _rel(count: int, relation: str, n: int) -> bool:
  if relation == LESS:
    return count < n
  if relation == AT_LEAST:
    return count >= n
  raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")


def count_words(text: str) -> int:
  """IFEval's word count: ``\\w+`` tokens (nltk ``RegexpTokenizer(r"\\w+")``)."""
  return len(re.findall(r"\w+", text))


def count_sentences(text: str) -> int:
  """Sentences: non-blank pieces after splitting at ``.``, ``!`` or ``?`` followed by whitespace or the end."""
  return len([s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if re.search(r"\w", s)])


def _existence(text, keywords):
  return all(re.search(k, text, flags=re.IGNORECASE) for k in keywords)


def _frequency(text, keyword, frequency, relation):
  return _rel(len(re.findall(keyword, text, flags=re.IGNORECASE)), relation, frequency)


def _forbidden(text, forbidden_words):
  return not any(re.search(r"\b" + w + r"\b", text, flags=re.IGNORECASE) for w in forbidden_words)


def _letter_frequency(text, letter, let_frequency, let_relation):
  return _rel(collections.Counter(text.lower())[letter.lower()], let_relation, let_frequency)


def _lowercase(text):
  return text.islower()


def _uppercase(text):
  return text.isupper()


def _capital_words(text, capital_frequency, capital_relation):
  return _rel(len([w for w in re.findall(r"\w+", text) if w.isupper()]), capital_relation, capital_frequency)


def _no_comma(text):
  return not re.search(r"\,", text)


def _number_words(text, num_words, relation):
  return _rel(count_words(text), relation, num_words)


def _number_sentences(text, num_sentences, relation):
  return _rel(count_sentences(text), relation, num_sentences)


def _number_paragraphs(text, num_paragraphs):
  paragraphs = re.split(r"\s?\*\*\*\s?", text)
  n = len(paragraphs)
  for i, p in enumerate(paragraphs):
    if not p.strip():
      if i == 0 or i == len(paragraphs) - 1:
        n -= 1
      else:
        return False
  return n == num_paragraphs


def _bullets(text, num_bullets):
  star = re.findall(r"^\s*\*[^\*].*$", text, flags=re.MULTILINE)
  dash = re.findall(r"^\s*-.*$", text, flags=re.MULTILINE)
  return len(star) + len(dash) == num_bullets


def _json(text):
  v = text.strip()
  for p in ("```json", "```Json", "```JSON", "```"):
    v = v.removeprefix(p)
  v = v.removesuffix("```").strip()
  try:
    json.loads(v)
  except ValueError:
    return False
  return True


def _title(text):
  return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", text))


def _highlights(text, num_highlights):
  n = sum(1 for h in re.findall(r"\*[^\n\*]*\*", text) if h.strip("*").strip())
  n += sum(1 for h in re.findall(r"\*\*[^\n\*]*\*\*", text) if h.removeprefix("**").removesuffix("**").strip())
  return n >= num_highlights


def _sections(text, section_spliter, num_sections):
  return len(re.split(r"\s?" + section_spliter + r"\s?\d+\s?", text)) - 1 >= num_sections


CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def _constrained(text):
  return any(o in text.strip() for o in CONSTRAINED_OPTIONS)


def _postscript(text, postscript_marker):
  v = text.lower()
  if postscript_marker == "P.P.S":
    pattern = r"\s*p\.\s?p\.\s?s.*$"
  elif postscript_marker == "P.S.":
    pattern = r"\s*p\.\s?s\..*$"
  else:
    pattern = r"\s*" + postscript_marker.lower() + r".*$"
  return bool(re.findall(pattern, v, flags=re.MULTILINE))


def _placeholders(text, num_placeholders):
  return len(re.findall(r"\[.*?\]", text)) >= num_placeholders


def _end(text, end_phrase):
  return text.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def _start(text, start_phrase):
  return text.strip().strip('"').lower().startswith(start_phrase.strip().lower())


def _quotation(text):
  v = text.strip()
  return len(v) > 1 and v[0] == '"' and v[-1] == '"'


def _repeat(text, prompt_to_repeat):
  return text.strip().lower().startswith(prompt_to_repeat.strip().lower())


def _two_responses(text):
  valid = []
  parts = text.split("******")
  for i, r in enumerate(parts):
    if not r.strip():
      if i != 0 and i != len(parts) - 1:
        return False
    else:
      valid.append(r)
  return len(valid) == 2 and valid[0].strip() != valid[1].strip()


def _forbidden_chars(text, chars):
  low = text.lower()
  return not any(c.lower() in low for c in chars)


# ------------------------------------------------------------------------------------------ the registry


def _q(s):
  return f'"{s}"'


TYPES: dict[str, ConstraintType] = {t.id: t for t in [
    ConstraintType("keywords:existence", "A", _existence,
                   lambda keywords: f"Include keywords {', '.join(keywords)} in the response.",
                   lambda keywords: " ".join(f"Use the word {_q(k)}." for k in keywords)),
    ConstraintType("keywords:frequency", "A", _frequency,
                   lambda keyword, frequency, relation:
                   f"In your response, the word {keyword} should appear {relation} {frequency} times.",
                   lambda keyword, frequency, relation: f"Use {_q(keyword)} {relation} {frequency} times."),
    ConstraintType("keywords:forbidden_words", "A", _forbidden,
                   lambda forbidden_words: f"Do not include keywords {', '.join(forbidden_words)} in the response.",
                   lambda forbidden_words: " ".join(f"Do not use the word {_q(w)}." for w in forbidden_words)),
    ConstraintType("keywords:letter_frequency", "A", _letter_frequency,
                   lambda letter, let_frequency, let_relation:
                   f"In your response, the letter {letter} should appear {let_relation} {let_frequency} times.",
                   lambda letter, let_frequency, let_relation:
                   f"Use the letter {letter} {let_relation} {let_frequency} times."),
    ConstraintType("change_case:english_lowercase", "D", _lowercase,
                   lambda: "Your entire response should be in English, and in all lowercase letters. No capital "
                           "letters are allowed.",
                   lambda: "Write in lowercase only."),
    ConstraintType("change_case:english_capital", "D", _uppercase,
                   lambda: "Your entire response should be in English, and in all capital letters.",
                   lambda: "Write in capital letters only."),
    ConstraintType("change_case:capital_word_frequency", "A", _capital_words,
                   lambda capital_frequency, capital_relation:
                   f"In your response, words with all capital letters should appear {capital_relation} "
                   f"{capital_frequency} times.",
                   lambda capital_frequency, capital_relation:
                   f"Use {capital_relation} {capital_frequency} all-caps words."),
    ConstraintType("punctuation:no_comma", "D", _no_comma,
                   lambda: "In your entire response, refrain from the use of any commas.",
                   lambda: "Do not use commas."),
    ConstraintType("length_constraints:number_words", "B", _number_words,
                   lambda num_words, relation: f"Answer with {relation} {num_words} words.",
                   lambda num_words, relation: f"Use {relation} {num_words} words."),
    ConstraintType("length_constraints:number_sentences", "B", _number_sentences,
                   lambda num_sentences, relation: f"Your response should contain {relation} {num_sentences} "
                                                   "sentences.",
                   lambda num_sentences, relation: f"Write {relation} {num_sentences} sentences."),
    ConstraintType("length_constraints:number_paragraphs", "B", _number_paragraphs,
                   lambda num_paragraphs: f"There should be {num_paragraphs} paragraphs. Paragraphs are separated "
                                          "with the markdown divider: ***",
                   lambda num_paragraphs: f"Write {num_paragraphs} paragraphs split by ***."),
    ConstraintType("detectable_format:number_bullet_lists", "B", _bullets,
                   lambda num_bullets: f"Your answer must contain exactly {num_bullets} bullet points. Use the "
                                       "markdown bullet points such as:\n* This is point 1.",
                   lambda num_bullets: f"Write exactly {num_bullets} bullet points."),
    ConstraintType("detectable_format:json_format", "C", _json,
                   lambda: "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```.",
                   lambda: "Answer in JSON."),
    ConstraintType("detectable_format:title", "C", _title,
                   lambda: "Your answer must contain a title, wrapped in double angular brackets, such as "
                           "<<poem of joy>>.",
                   lambda: "Add a title in <<>>."),
    ConstraintType("detectable_format:number_highlighted_sections", "C", _highlights,
                   lambda num_highlights: f"Highlight at least {num_highlights} sections in your answer with "
                                          "markdown, i.e. *highlighted section*.",
                   lambda num_highlights: f"Highlight at least {num_highlights} parts with *stars*."),
    ConstraintType("detectable_format:multiple_sections", "B", _sections,
                   lambda section_spliter, num_sections:
                   f"Your response must have {num_sections} sections. Mark the beginning of each section with "
                   f"{section_spliter} X, such as:\n{section_spliter} 1",
                   lambda section_spliter, num_sections: f"Write {num_sections} sections, {section_spliter} 1 ..."),
    ConstraintType("detectable_format:constrained_response", "E", _constrained,
                   lambda: "Answer with one of the following options: My answer is yes., My answer is no., My "
                           "answer is maybe.",
                   lambda: "Say My answer is yes./no./maybe."),
    ConstraintType("detectable_content:postscript", "E", _postscript,
                   lambda postscript_marker: f"At the end of your response, please explicitly add a postscript "
                                             f"starting with {postscript_marker}",
                   lambda postscript_marker: f"Add a postscript starting with {postscript_marker}"),
    ConstraintType("detectable_content:number_placeholders", "E", _placeholders,
                   lambda num_placeholders: f"The response must contain at least {num_placeholders} placeholders "
                                            "represented by square brackets, such as [address].",
                   lambda num_placeholders: f"Use at least {num_placeholders} [placeholders]."),
    ConstraintType("startend:end_checker", "E", _end,
                   lambda end_phrase: f"Finish your response with this exact phrase {end_phrase}. No other words "
                                      "should follow this phrase.",
                   lambda end_phrase: f"End with {_q(end_phrase)}."),
    ConstraintType("startend:quotation", "C", _quotation,
                   lambda: "Wrap your entire response with double quotation marks.",
                   lambda: "Wrap the answer in double quotes."),
    ConstraintType("combination:repeat_prompt", "E", _repeat,
                   lambda prompt_to_repeat: "First repeat the request word for word without change, then give "
                                            f"your answer (1. do not say any words or characters before repeating "
                                            f"the request; 2. the request you need to repeat does not include this "
                                            f"sentence) {prompt_to_repeat}",
                   lambda prompt_to_repeat: f"First repeat {_q(prompt_to_repeat)}."),
    ConstraintType("combination:two_responses", "E", _two_responses,
                   lambda: "Give two different responses. Responses and only responses should be separated by 6 "
                           "asterisk symbols: ******.",
                   lambda: "Give two answers split by ******."),
    ConstraintType("lmx:start_checker", "E", _start,
                   lambda start_phrase: f"Start your response with this exact phrase {start_phrase}.",
                   lambda start_phrase: f"Start with {_q(start_phrase)}."),
    ConstraintType("lmx:forbidden_chars", "A", _forbidden_chars,
                   lambda chars: f"Do not use the character(s) {', '.join(chars)} anywhere in the response.",
                   lambda chars: f"Do not use the letter {' or '.join(chars)}."),
]}

UNSUPPORTED_IFEVAL = ("language:response_language",)


def render(c: Constraint, style: str = "ifeval") -> str:
  """The instruction text of one constraint (``style``: ``"ifeval"`` wording or ``"short"``)."""
  t = TYPES[c.id]
  if style not in ("ifeval", "short"):
    raise ValueError(f"render style must be 'ifeval' or 'short', got {style!r}")
  return (t.ifeval if style == "ifeval" else t.short)(**c.kw)


def render_instruction(question: str, constraints: Sequence[Constraint], style: str = "ifeval") -> str:
  """Seed question + constraints, newline-joined (SEIF's final instruction)."""
  return "\n".join([question] + [render(c, style) for c in constraints])


def check_all(text: str, constraints: Sequence[Constraint]) -> list[bool]:
  """The Judger: one bool per constraint."""
  return [c.check(text) for c in constraints]


def adherence(text: str, constraints: Sequence[Constraint]) -> float:
  """Fraction of constraints ``text`` follows (SEIF's Follower reward); 0 for an empty set."""
  if not constraints:
    return 0.0
  return sum(check_all(text, constraints)) / len(constraints)


# ------------------------------------------------------------------------------------------ IFEval compatibility


def ifeval_constraint(instruction_id: str, kwargs: Mapping[str, Any] | None) -> Constraint:
  """The :class:`Constraint` of one IFEval instruction (id + its kwargs dict; ``None`` values are dropped, as
  IFEval's ``build_description(**kwargs)`` ignores them). Raises KeyError for an unknown or unsupported id."""
  if instruction_id in UNSUPPORTED_IFEVAL:
    raise KeyError(f"IFEval instruction {instruction_id!r} is not supported (it needs langdetect)")
  if instruction_id not in TYPES or instruction_id.startswith("lmx:"):
    raise KeyError(f"unknown IFEval instruction id {instruction_id!r}")
  import inspect

  allowed = list(inspect.signature(TYPES[instruction_id].check).parameters)[1:]
  kw = {k: v for k, v in dict(kwargs or {}).items() if v is not None and k in allowed}
  if instruction_id == "combination:repeat_prompt" and "prompt_to_repeat" not in kw:
    raise KeyError("combination:repeat_prompt needs kwargs['prompt_to_repeat'] (IFEval passes the prompt)")
  missing = [a for a in allowed if a not in kw]
  if missing:
    raise KeyError(f"IFEval instruction {instruction_id!r}: kwargs lack {missing}")
  return Constraint.make(instruction_id, **kw)


def ifeval_checkers(instruction_id_list: Sequence[str], kwargs: Sequence[Mapping[str, Any] | None], *,
                    strict: bool = True) -> list[Constraint]:
  """The constraints of one IFEval row (its ``instruction_id_list`` and parallel ``kwargs`` list); call
  ``c.check(response)`` on each (IFEval's strict accuracy). ``strict=False`` skips unsupported ids."""
  if len(instruction_id_list) != len(kwargs):
    raise ValueError(f"instruction_id_list has {len(instruction_id_list)} ids but kwargs has {len(kwargs)} entries")
  out = []
  for iid, kw in zip(instruction_id_list, kwargs):
    if not strict and iid in UNSUPPORTED_IFEVAL:
      continue
    out.append(ifeval_constraint(iid, kw))
  return out


# ------------------------------------------------------------------------------------------ the text form

_FLAGS = {"lower": "change_case:english_lowercase", "upper": "change_case:english_capital",
          "nocomma": "punctuation:no_comma", "json": "detectable_format:json_format",
          "quote": "startend:quotation", "title": "detectable_format:title",
          "answer": "detectable_format:constrained_response", "two": "combination:two_responses"}
_FLAG_OF = {v: k for k, v in _FLAGS.items()}
_REL_OPS = {"<": LESS, ">=": AT_LEAST}
_OP_OF = {LESS: "<", AT_LEAST: ">="}
_COUNTS = {"words": ("length_constraints:number_words", "num_words", "relation"),
           "sents": ("length_constraints:number_sentences", "num_sentences", "relation"),
           "caps": ("change_case:capital_word_frequency", "capital_frequency", "capital_relation")}
_EXACT = {"paras": ("length_constraints:number_paragraphs", "num_paragraphs", "="),
          "bullets": ("detectable_format:number_bullet_lists", "num_bullets", "="),
          "highlights": ("detectable_format:number_highlighted_sections", "num_highlights", ">="),
          "placeholders": ("detectable_content:number_placeholders", "num_placeholders", ">=")}
_WORD = r"[A-Za-z][A-Za-z']*"
_MAX_COUNT = 10_000


def _parse_one(part: str) -> Constraint | None:
  p = part.strip()
  if p in _FLAGS:
    return Constraint.make(_FLAGS[p])
  if p == "ps":
    return Constraint.make("detectable_content:postscript", postscript_marker="P.S.")
  m = re.fullmatch(r"(words|sents|caps)(<|>=)(\d{1,5})", p)
  if m:
    iid, n_name, r_name = _COUNTS[m.group(1)]
    return Constraint.make(iid, **{n_name: int(m.group(3)), r_name: _REL_OPS[m.group(2)]})
  m = re.fullmatch(r"(paras|bullets)=(\d{1,5})|(highlights|placeholders)>=(\d{1,5})", p)
  if m:
    key, n = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    iid, n_name, _ = _EXACT[key]
    return Constraint.make(iid, **{n_name: int(n)})
  m = re.fullmatch(r"sections>=(\d{1,5})", p)
  if m:
    return Constraint.make("detectable_format:multiple_sections", section_spliter="SECTION",
                           num_sections=int(m.group(1)))
  m = re.fullmatch(rf"(incl|excl) ({_WORD})", p)
  if m:
    if m.group(1) == "incl":
      return Constraint.make("keywords:existence", keywords=(m.group(2),))
    return Constraint.make("keywords:forbidden_words", forbidden_words=(m.group(2),))
  m = re.fullmatch(rf"freq ({_WORD})(<|>=)(\d{{1,5}})", p)
  if m:
    return Constraint.make("keywords:frequency", keyword=m.group(1), frequency=int(m.group(3)),
                           relation=_REL_OPS[m.group(2)])
  m = re.fullmatch(r"letter ([a-z])(<|>=)(\d{1,5})", p)
  if m:
    return Constraint.make("keywords:letter_frequency", letter=m.group(1), let_frequency=int(m.group(3)),
                           let_relation=_REL_OPS[m.group(2)])
  m = re.fullmatch(r"nochar ([a-z]{1,4})", p)
  if m and len(set(m.group(1))) == len(m.group(1)):
    return Constraint.make("lmx:forbidden_chars", chars=m.group(1))
  m = re.fullmatch(r"(end|start) ([^;\"\n]*\S)", p)
  if m:
    phrase = m.group(2).strip()
    if m.group(1) == "end":
      return Constraint.make("startend:end_checker", end_phrase=phrase)
    return Constraint.make("lmx:start_checker", start_phrase=phrase)
  return None


def parse(text: str | None) -> tuple[Constraint, ...] | None:
  """The constraint set written in the text form (see the module docstring), or None when any part is not a
  constraint, the set is empty, or a constraint repeats."""
  if text is None:
    return None
  parts = [p for p in text.strip().split(";")]
  if not parts or any(not p.strip() for p in parts):
    return None
  out = []
  for part in parts:
    c = _parse_one(part)
    if c is None or c in out:
      return None
    out.append(c)
  return tuple(out)


def to_text(constraints: Iterable[Constraint]) -> str:
  """The text form of a constraint set (``parse(to_text(cs)) == tuple(cs)`` for every type the form covers)."""
  parts = []
  for c in constraints:
    k = c.kw
    if c.id in _FLAG_OF:
      parts.append(_FLAG_OF[c.id])
    elif c.id == "detectable_content:postscript" and k["postscript_marker"] == "P.S.":
      parts.append("ps")
    elif c.id in (v[0] for v in _COUNTS.values()):
      code, (_, n_name, r_name) = next((a, b) for a, b in _COUNTS.items() if b[0] == c.id)
      parts.append(f"{code}{_OP_OF[k[r_name]]}{k[n_name]}")
    elif c.id in (v[0] for v in _EXACT.values()):
      code, (_, n_name, op) = next((a, b) for a, b in _EXACT.items() if b[0] == c.id)
      parts.append(f"{code}{op}{k[n_name]}")
    elif c.id == "detectable_format:multiple_sections" and k["section_spliter"] == "SECTION":
      parts.append(f"sections>={k['num_sections']}")
    elif c.id == "keywords:existence" and len(k["keywords"]) == 1:
      parts.append(f"incl {k['keywords'][0]}")
    elif c.id == "keywords:forbidden_words" and len(k["forbidden_words"]) == 1:
      parts.append(f"excl {k['forbidden_words'][0]}")
    elif c.id == "keywords:frequency":
      parts.append(f"freq {k['keyword']}{_OP_OF[k['relation']]}{k['frequency']}")
    elif c.id == "keywords:letter_frequency":
      parts.append(f"letter {k['letter']}{_OP_OF[k['let_relation']]}{k['let_frequency']}")
    elif c.id == "lmx:forbidden_chars":
      parts.append(f"nochar {k['chars']}")
    elif c.id == "startend:end_checker":
      parts.append(f"end {k['end_phrase']}")
    elif c.id == "lmx:start_checker":
      parts.append(f"start {k['start_phrase']}")
    else:
      raise ValueError(f"constraint {c} has no text form")
  return "; ".join(parts)


THINK_ANSWER = re.compile(r"<think>.*?</think>\s*<answer>(.*?)</answer>", re.DOTALL)


def format_gate(text: str) -> str | None:
  """SEIF's format gate: the ``<answer>`` part of ``<think>…</think><answer>…</answer>`` (a full match), or None."""
  m = THINK_ANSWER.fullmatch(text.strip())
  return m.group(1) if m else None


# ------------------------------------------------------------------------------------------ the Filter


def _literals(c: Constraint) -> list[tuple[str, str]]:
  """Text a compliant response must contain verbatim (up to case), with where: ``(text, kind)``."""
  k = c.kw
  if c.id == "keywords:existence":
    return [(w, "keyword") for w in k["keywords"]]
  if c.id == "startend:end_checker":
    return [(k["end_phrase"], "end")]
  if c.id == "lmx:start_checker":
    return [(k["start_phrase"], "start")]
  if c.id == "combination:repeat_prompt":
    return [(k["prompt_to_repeat"], "start")]
  if c.id == "keywords:frequency" and _rel(0, k["relation"], k["frequency"]) is False:
    return [(k["keyword"], "keyword")]
  return []


def _case_sensitive_literals(c: Constraint) -> list[str]:
  """Literals matched with case (so a lowercase/uppercase rule can contradict them)."""
  if c.id == "detectable_format:constrained_response":
    return list(CONSTRAINED_OPTIONS)  # any one of them: all contain 'M' and lowercase letters
  return []


def _count_bounds(c: Constraint) -> tuple[str, int, float] | None:
  """``(quantity, lo, hi)``: the constraint allows ``lo <= count <= hi`` of ``quantity``."""
  k = c.kw
  rel_pairs = {"length_constraints:number_words": ("words", "num_words", "relation"),
               "length_constraints:number_sentences": ("sentences", "num_sentences", "relation"),
               "change_case:capital_word_frequency": ("capital_words", "capital_frequency", "capital_relation")}
  if c.id in rel_pairs:
    q, n, r = rel_pairs[c.id]
    return (q, 0, k[n] - 1) if k[r] == LESS else (q, k[n], float("inf"))
  if c.id == "keywords:frequency":
    q = f"keyword:{k['keyword'].lower()}"
    return (q, 0, k["frequency"] - 1) if k["relation"] == LESS else (q, k["frequency"], float("inf"))
  if c.id == "keywords:letter_frequency":
    q = f"letter:{k['letter'].lower()}"
    return (q, 0, k["let_frequency"] - 1) if k["let_relation"] == LESS else (q, k["let_frequency"], float("inf"))
  if c.id == "length_constraints:number_paragraphs":
    return ("paragraphs", k["num_paragraphs"], k["num_paragraphs"])
  if c.id == "detectable_format:number_bullet_lists":
    return ("bullets", k["num_bullets"], k["num_bullets"])
  return None


def _min_words(c: Constraint) -> int:
  """A lower bound on the words a response following ``c`` has."""
  b = _count_bounds(c)
  lo = 0
  if b and b[0] in ("words", "sentences", "paragraphs", "bullets", "capital_words"):
    lo = int(b[1])
  for lit, _ in _literals(c):
    lo = max(lo, count_words(lit))
  if c.id == "detectable_format:constrained_response":
    lo = max(lo, 4)
  if c.id == "detectable_format:multiple_sections":
    lo = max(lo, 2 * c.kw["num_sections"])
  return lo


def impossible(c: Constraint, *, max_chars: int | None = None) -> str | None:
  """Why ``c`` alone cannot be followed (a count that no non-empty response meets, or, with ``max_chars``, a
  length no response of that many characters reaches), or None."""
  k = c.kw
  b = _count_bounds(c)
  if b is not None:
    q, lo, hi = b
    if hi < lo or lo < 0:
      return f"{c.id}: the count range [{lo}, {hi}] is empty"
    if q in ("words", "sentences") and hi < 1:
      return f"{c.id}: fewer than 1 {q} leaves no answer"
    if q in ("paragraphs",) and lo < 1:
      return f"{c.id}: a response has at least one paragraph"
  for name in ("num_highlights", "num_placeholders", "num_sections"):
    if name in k and k[name] < 0:
      return f"{c.id}: {name} must be >= 0"
  if c.id == "keywords:existence" and any(not w.strip() for w in k["keywords"]):
    return f"{c.id}: an empty keyword"
  if max_chars is not None:
    need = 2 * _min_words(c) - 1
    if b is not None and b[0].startswith("letter:"):
      need = max(need, int(b[1]))
    for lit, _ in _literals(c):
      need = max(need, len(lit))
    if need > max_chars:
      return f"{c.id}: needs at least {need} characters, more than the budget of {max_chars}"
  return None


def _word_in(word: str, text: str) -> bool:
  return bool(re.search(r"\b" + re.escape(word) + r"\b", text, flags=re.IGNORECASE))


def pair_conflict(a: Constraint, b: Constraint) -> str | None:
  """The name of the conflict rule ``a`` and ``b`` break together (either order), or None."""
  for x, y in ((a, b), (b, a)):
    r = _directed_conflict(x, y)
    if r:
      return r
  return None


_JSON_STARTS = '{["-0123456789tfn'


def _directed_conflict(a: Constraint, b: Constraint) -> str | None:
  ka, kb = a.kw, b.kw
  lits_b = _literals(b)
  # contradictions --------------------------------------------------------------------------------------
  if a.id == "change_case:english_lowercase" and b.id == "change_case:english_capital":
    return "lowercase_vs_uppercase"
  if a.id == "change_case:english_lowercase" and _case_sensitive_literals(b):
    return "lowercase_vs_capitalised_literal"
  if a.id == "change_case:english_capital" and _case_sensitive_literals(b):
    return "uppercase_vs_lowercase_literal"
  if a.id == "change_case:english_lowercase" and b.id == "change_case:capital_word_frequency":
    if kb["capital_relation"] == AT_LEAST and kb["capital_frequency"] >= 1:
      return "lowercase_vs_capital_words"
  if a.id == "change_case:english_capital" and b.id == "change_case:capital_word_frequency":
    if kb["capital_relation"] == LESS and kb["capital_frequency"] <= 1:
      return "uppercase_vs_no_capital_words"
  if a.id == "keywords:forbidden_words":
    for w in ka["forbidden_words"]:
      for lit, _ in lits_b:
        if _word_in(w, lit):
          return "include_vs_forbid_word"
  if a.id == "lmx:forbidden_chars":
    for lit, _ in lits_b:
      if any(ch.lower() in lit.lower() for ch in ka["chars"]):
        return "required_text_vs_forbidden_char"
    if b.id == "keywords:letter_frequency" and kb["letter"].lower() in ka["chars"].lower():
      if _rel(0, kb["let_relation"], kb["let_frequency"]) is False:
        return "letter_frequency_vs_forbidden_char"
    if b.id == "startend:quotation" and '"' in ka["chars"]:
      return "quotation_vs_forbidden_char"
    if b.id == "detectable_format:constrained_response" and all(
        any(ch.lower() in o.lower() for ch in ka["chars"]) for o in CONSTRAINED_OPTIONS):
      return "required_text_vs_forbidden_char"
  if a.id == "punctuation:no_comma":
    if any("," in lit for lit, _ in lits_b):
      return "no_comma_vs_comma_literal"
    if b.id == "keywords:frequency" and "," in kb["keyword"] and kb["relation"] == AT_LEAST:
      return "no_comma_vs_comma_literal"
  if a.id == "keywords:letter_frequency" and ka["let_relation"] == LESS:
    for lit, _ in lits_b:
      if lit.lower().count(ka["letter"].lower()) >= ka["let_frequency"]:
        return "letter_limit_vs_required_text"
  if a.id == "keywords:frequency" and ka["relation"] == LESS:
    for lit, _ in lits_b:
      if len(re.findall(ka["keyword"], lit, flags=re.IGNORECASE)) >= ka["frequency"]:
        return "keyword_limit_vs_required_text"
  ba, bb = _count_bounds(a), _count_bounds(b)
  if ba and bb and ba[0] == bb[0] and max(ba[1], bb[1]) > min(ba[2], bb[2]):
    return "count_ranges_disjoint"
  if ba and ba[0] == "words" and _min_words(b) > ba[2]:
    return "word_limit_vs_required_length"
  if a.id == "startend:end_checker" and b.id == "startend:end_checker":
    x, y = ka["end_phrase"].strip().lower(), kb["end_phrase"].strip().lower()
    if not (x.endswith(y) or y.endswith(x)):
      return "two_different_endings"
  if a.id in ("lmx:start_checker", "combination:repeat_prompt") and b.id in ("lmx:start_checker",
                                                                              "combination:repeat_prompt"):
    x = (ka.get("start_phrase") or ka.get("prompt_to_repeat")).strip().lower()
    y = (kb.get("start_phrase") or kb.get("prompt_to_repeat")).strip().lower()
    if not (x.startswith(y) or y.startswith(x)):
      return "two_different_starts"
  if a.id == "combination:repeat_prompt" and b.id == "startend:quotation" and \
      not ka["prompt_to_repeat"].strip().startswith('"'):
    return "repeat_prompt_vs_quotation"
  # the paper's template incompatibilities ------------------------------------------------------------------
  if a.id == "detectable_format:json_format":
    if b.id in ("detectable_format:number_bullet_lists", "detectable_format:multiple_sections",
                "length_constraints:number_paragraphs", "combination:two_responses"):
      if not (b.id == "detectable_format:number_bullet_lists" and kb["num_bullets"] == 0) and not (
          b.id == "length_constraints:number_paragraphs" and kb["num_paragraphs"] == 1):
        return "json_vs_structure"
    # (an end or lmx start phrase is no conflict: those checkers strip quotes, so a JSON string literal
    # '"... bye"' follows both; repeat_prompt does not strip, so the prompt must start a JSON text)
    if b.id == "combination:repeat_prompt" and kb["prompt_to_repeat"].strip()[:1] not in _JSON_STARTS:
      return "json_vs_repeat_prompt"
  if a.id == "combination:two_responses" and b.id == "combination:repeat_prompt":
    return "two_responses_vs_repeat_prompt"
  return None


def conflicts(constraints: Sequence[Constraint], *, max_chars: int | None = None) -> list[tuple[int, int, str]]:
  """Every conflict of a constraint set: ``(i, j, rule)`` for pairs (i < j) and ``(i, i, reason)`` for a
  constraint impossible alone (see :func:`impossible`; ``max_chars`` adds the answer-length budget)."""
  out = []
  for i, c in enumerate(constraints):
    why = impossible(c, max_chars=max_chars)
    if why:
      out.append((i, i, why))
  for i in range(len(constraints)):
    for j in range(i + 1, len(constraints)):
      r = pair_conflict(constraints[i], constraints[j])
      if r:
        out.append((i, j, r))
  return out


def is_valid(constraints: Sequence[Constraint] | None, *, max_chars: int | None = None) -> bool:
  """The Filter: a non-empty, parsed constraint set with no conflict."""
  return bool(constraints) and not conflicts(constraints, max_chars=max_chars)
