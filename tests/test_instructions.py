"""The constraint library: every checker on hand-made texts (IFEval's semantics where the id is IFEval's), the text
form, IFEval rows, and every conflict rule of the Filter."""
import pytest

from lmx.envs import instructions as I

C = I.Constraint.make


# ------------------------------------------------------------------------------------------ checkers
CHECKS = [
    # (constraint, text, expected) -- IFEval semantics
    (C("keywords:existence", keywords=["sun", "sea"]), "The Sun over the SEA.", True),
    (C("keywords:existence", keywords=["sun", "sea"]), "The sun is up.", False),
    (C("keywords:existence", keywords=["sun"]), "sunny days", True),  # IFEval: a regex search, substrings count
    (C("keywords:frequency", keyword="cat", frequency=2, relation="at least"), "Cat and cat.", True),
    (C("keywords:frequency", keyword="cat", frequency=2, relation="at least"), "One cat.", False),
    (C("keywords:frequency", keyword="cat", frequency=2, relation="less than"), "One CAT.", True),
    (C("keywords:frequency", keyword="cat", frequency=2, relation="less than"), "cat cat", False),
    (C("keywords:forbidden_words", forbidden_words=["sun"]), "sunny days", True),  # whole words only
    (C("keywords:forbidden_words", forbidden_words=["sun"]), "The SUN.", False),
    (C("keywords:letter_frequency", letter="a", let_frequency=3, let_relation="at least"), "A banana", True),
    (C("keywords:letter_frequency", letter="a", let_frequency=3, let_relation="at least"), "A bat", False),
    (C("keywords:letter_frequency", letter="a", let_frequency=3, let_relation="less than"), "A bat", True),
    (C("change_case:english_lowercase"), "all lower, 123.", True),
    (C("change_case:english_lowercase"), "Not lower", False),
    (C("change_case:english_lowercase"), "123 !", False),  # str.islower needs a cased character
    (C("change_case:english_capital"), "ALL CAPS 1.", True),
    (C("change_case:english_capital"), "ALL CAPs", False),
    (C("change_case:capital_word_frequency", capital_frequency=2, capital_relation="at least"), "THE big CAT", True),
    (C("change_case:capital_word_frequency", capital_frequency=2, capital_relation="at least"), "THE big cat", False),
    (C("change_case:capital_word_frequency", capital_frequency=2, capital_relation="less than"), "THE big cat", True),
    (C("punctuation:no_comma"), "no commas here.", True),
    (C("punctuation:no_comma"), "one, two", False),
    (C("length_constraints:number_words", num_words=4, relation="less than"), "one two three", True),
    (C("length_constraints:number_words", num_words=3, relation="less than"), "one two three", False),
    (C("length_constraints:number_words", num_words=3, relation="at least"), "it's fine", True),  # \w+: it, s, fine
    (C("length_constraints:number_words", num_words=4, relation="at least"), "it's fine", False),
    (C("length_constraints:number_sentences", num_sentences=2, relation="at least"), "One. Two! Three?", True),
    (C("length_constraints:number_sentences", num_sentences=3, relation="less than"), "One. Two! Three?", False),
    (C("length_constraints:number_paragraphs", num_paragraphs=2), "first\n***\nsecond", True),
    (C("length_constraints:number_paragraphs", num_paragraphs=2), "***\nfirst\n***\nsecond\n***", True),
    (C("length_constraints:number_paragraphs", num_paragraphs=2), "first\n***\n\n***\nsecond", False),
    (C("detectable_format:number_bullet_lists", num_bullets=2), "Intro\n* one\n- two", True),
    (C("detectable_format:number_bullet_lists", num_bullets=2), "* one\n** bold\n", False),
    (C("detectable_format:json_format"), '```json\n{"a": 1}\n```', True),
    (C("detectable_format:json_format"), "{'a': 1}", False),
    (C("detectable_format:title"), "<<My Title>>\nbody", True),
    (C("detectable_format:title"), "<< >> body", False),
    (C("detectable_format:number_highlighted_sections", num_highlights=2), "*one* and **two**", True),
    (C("detectable_format:number_highlighted_sections", num_highlights=2), "*one* and * *", False),
    (C("detectable_format:multiple_sections", section_spliter="SECTION", num_sections=2),
     "SECTION 1\nfoo\nSECTION 2\nbar", True),
    (C("detectable_format:multiple_sections", section_spliter="SECTION", num_sections=3),
     "SECTION 1\nfoo\nSECTION 2\nbar", False),
    (C("detectable_format:constrained_response"), "I think... My answer is no.", True),
    (C("detectable_format:constrained_response"), "my answer is no.", False),
    (C("detectable_content:postscript", postscript_marker="P.S."), "Hi.\nP.S. see you", True),
    (C("detectable_content:postscript", postscript_marker="P.S."), "Hi. PS see you", False),
    (C("detectable_content:postscript", postscript_marker="P.P.S"), "Hi.\np. p. s more", True),
    (C("detectable_content:number_placeholders", num_placeholders=2), "[name] at [address]", True),
    (C("detectable_content:number_placeholders", num_placeholders=2), "[name] only", False),
    (C("startend:end_checker", end_phrase="Any other questions?"), '"ok. any other questions?"  ', True),
    (C("startend:end_checker", end_phrase="bye"), "bye now", False),
    (C("startend:quotation"), ' "quoted" ', True),
    (C("startend:quotation"), '"', False),
    (C("combination:repeat_prompt", prompt_to_repeat="Say hi."), "say hi. Hi!", True),
    (C("combination:repeat_prompt", prompt_to_repeat="Say hi."), "Hi! Say hi.", False),
    (C("combination:two_responses"), "first\n******\nsecond", True),
    (C("combination:two_responses"), "same\n******\nsame", False),
    (C("combination:two_responses"), "a\n******\n\n******\nb", False),
    # lmx's own types
    (C("lmx:start_checker", start_phrase="Well"), '"well, yes"', True),
    (C("lmx:start_checker", start_phrase="well"), "oh well", False),
    (C("lmx:forbidden_chars", chars="ez"), "A cat sat.", True),
    (C("lmx:forbidden_chars", chars="e"), "The cat", False),
    (C("lmx:forbidden_chars", chars="e"), "THE CAT", False),  # case-insensitive
]


@pytest.mark.parametrize("c,text,expected", CHECKS, ids=[f"{c.id}-{i}" for i, (c, _, _) in enumerate(CHECKS)])
def test_checker(c, text, expected):
  assert c.check(text) is expected


def test_every_type_has_checks_for_both_outcomes():
  seen = {}
  for c, _, e in CHECKS:
    seen.setdefault(c.id, set()).add(e)
  assert set(seen) == set(I.TYPES)
  assert all(v == {True, False} for v in seen.values()), {k: v for k, v in seen.items() if v != {True, False}}


def test_counts_by_hand():
  assert I.count_words("Hello, world! It's 3 o'clock.") == 7  # Hello world It s 3 o clock
  assert I.count_sentences("Hi there. How are you? Fine!") == 3
  assert I.count_sentences("No terminal punctuation") == 1


def test_adherence_and_check_all():
  cs = I.parse("lower; incl sun; words<4; end bye")
  assert I.check_all("the sun bye", cs) == [True, True, True, True]
  assert I.check_all("The Sun is here bye", cs) == [False, True, False, True]
  assert I.adherence("The Sun is here bye", cs) == 0.5
  assert I.adherence("anything", ()) == 0.0


# ------------------------------------------------------------------------------------------ IFEval rows


def test_ifeval_row():
  ids = ["punctuation:no_comma", "length_constraints:number_words", "startend:end_checker"]
  kwargs = [{}, {"num_words": 6, "relation": "less than", "keyword": None}, {"end_phrase": "Is there anything else?"}]
  cs = I.ifeval_checkers(ids, kwargs)
  assert [c.id for c in cs] == ids
  assert I.check_all("Yes. Is there anything else?", cs) == [True, True, True]
  assert I.check_all("Yes, sure, fine. Is there anything else?", cs) == [False, False, True]


def test_ifeval_errors():
  with pytest.raises(KeyError, match="langdetect"):
    I.ifeval_checkers(["language:response_language"], [{"language": "de"}])
  assert I.ifeval_checkers(["language:response_language", "punctuation:no_comma"], [{"language": "de"}, {}],
                           strict=False)[0].id == "punctuation:no_comma"
  with pytest.raises(KeyError, match="unknown IFEval"):
    I.ifeval_checkers(["lmx:start_checker"], [{"start_phrase": "x"}])
  with pytest.raises(KeyError, match="lack"):
    I.ifeval_checkers(["keywords:existence"], [{}])
  with pytest.raises(ValueError, match="kwargs has 0"):
    I.ifeval_checkers(["punctuation:no_comma"], [])


def test_render_styles():
  c = C("length_constraints:number_words", num_words=10, relation="at least")
  assert I.render(c) == "Answer with at least 10 words."
  assert I.render(c, "short") == "Use at least 10 words."
  text = I.render_instruction("Describe a cat.", [c, C("punctuation:no_comma")])
  assert text.splitlines() == ["Describe a cat.", "Answer with at least 10 words.",
                               "In your entire response, refrain from the use of any commas."]
  for t in I.TYPES.values():  # every type renders with representative kwargs
    assert t.id in I.TYPES
  with pytest.raises(ValueError, match="style"):
    I.render(c, "fancy")


# ------------------------------------------------------------------------------------------ text form


def test_parse_text_form():
  cs = I.parse("lower; incl sun; words<8; sents>=2; freq cat>=2; letter a<3; nochar ez; end the end; start well; "
               "paras=2; bullets=3; highlights>=1; placeholders>=2; sections>=2; caps<2; json; quote; title; answer;"
               " ps; two; excl moon; upper; nocomma")
  assert cs is not None and len(cs) == 24
  k = {c.id: c.kw for c in cs}
  assert k["length_constraints:number_words"] == {"num_words": 8, "relation": "less than"}
  assert k["keywords:frequency"] == {"keyword": "cat", "frequency": 2, "relation": "at least"}
  assert k["startend:end_checker"] == {"end_phrase": "the end"}
  assert k["keywords:letter_frequency"] == {"letter": "a", "let_frequency": 3, "let_relation": "less than"}
  assert I.parse(I.to_text(cs)) == cs


@pytest.mark.parametrize("bad", ["", "   ", "lower;", "lower;; upper", "lowercase", "words<x", "words<", "incl",
                                 "incl two words", "lower; lower", "nochar aa", "end ", "freq cat=2", None])
def test_parse_rejects(bad):
  assert I.parse(bad) is None


def test_format_gate():
  assert I.format_gate("<think>plan</think> <answer>lower; incl sun</answer>") == "lower; incl sun"
  assert I.format_gate("lower; incl sun") is None
  assert I.format_gate("<think>x</think><answer>a</answer> trailing") is None


# ------------------------------------------------------------------------------------------ the Filter
P = I.parse
CONFLICTS = [
    ("lower; upper", "lowercase_vs_uppercase"),
    ("lower; answer", "lowercase_vs_capitalised_literal"),
    ("upper; answer", "uppercase_vs_lowercase_literal"),
    ("lower; caps>=1", "lowercase_vs_capital_words"),
    ("upper; caps<1", "uppercase_vs_no_capital_words"),
    ("incl cat; excl cat", "include_vs_forbid_word"),
    ("end the cat; excl cat", "include_vs_forbid_word"),
    ("start so; excl so", "include_vs_forbid_word"),
    ("freq cat>=2; excl cat", "include_vs_forbid_word"),
    ("incl sun; nochar u", "required_text_vs_forbidden_char"),
    ("end bye; nochar y", "required_text_vs_forbidden_char"),
    ("letter a>=2; nochar a", "letter_frequency_vs_forbidden_char"),
    ("letter a<2; incl banana", "letter_limit_vs_required_text"),
    ("freq cat<1; incl cat", "keyword_limit_vs_required_text"),
    ("words<5; words>=7", "count_ranges_disjoint"),
    ("sents<2; sents>=2", "count_ranges_disjoint"),
    ("freq cat<2; freq cat>=3", "count_ranges_disjoint"),
    ("letter e<1; letter e>=1", "count_ranges_disjoint"),
    ("paras=2; paras=3", "count_ranges_disjoint"),
    ("words<3; sents>=3", "word_limit_vs_required_length"),
    ("words<3; end the very end", "word_limit_vs_required_length"),
    ("words<4; bullets=5", "word_limit_vs_required_length"),
    ("end bye; end the end", "two_different_endings"),
    ("start well; start so", "two_different_starts"),
    ("json; bullets=2", "json_vs_structure"),
    ("json; sections>=2", "json_vs_structure"),
    ("json; paras=2", "json_vs_structure"),
    ("json; two", "json_vs_structure"),
]


@pytest.mark.parametrize("text,rule", CONFLICTS, ids=[r for _, r in CONFLICTS])
def test_conflict_rule(text, rule):
  cs = P(text)
  assert cs is not None, text
  found = I.conflicts(cs)
  assert [(0, 1, rule)] == found or any(r == rule for _, _, r in found), found
  assert I.pair_conflict(cs[1], cs[0]) == I.pair_conflict(cs[0], cs[1])  # symmetric
  assert not I.is_valid(cs)


def test_comma_and_quotation_conflicts():
  cs = (I.parse("nocomma")[0], C("keywords:existence", keywords=["yes, sir"]))
  assert I.conflicts(cs) == [(0, 1, "no_comma_vs_comma_literal")]
  cs = (C("combination:repeat_prompt", prompt_to_repeat="Say hi."), I.parse("quote")[0])
  assert I.conflicts(cs) == [(0, 1, "repeat_prompt_vs_quotation")]
  cs = (C("combination:two_responses"), C("combination:repeat_prompt", prompt_to_repeat="Say hi."))
  assert I.conflicts(cs) == [(0, 1, "two_responses_vs_repeat_prompt")]
  cs = (I.parse("json")[0], C("combination:repeat_prompt", prompt_to_repeat="Say hi."))
  assert I.conflicts(cs) == [(0, 1, "json_vs_repeat_prompt")]
  assert I.conflicts((cs[0], C("combination:repeat_prompt", prompt_to_repeat='{"a": 1}'))) == []
  cs = (I.parse("nochar q")[0], I.parse("quote")[0])
  assert I.conflicts(cs) == []  # 'q' is a letter, not the quotation mark
  cs = (C("lmx:forbidden_chars", chars='"'), I.parse("quote")[0])
  assert I.conflicts(cs) == [(0, 1, "quotation_vs_forbidden_char")]


@pytest.mark.parametrize("text", [
    "lower; incl Sun",  # IFEval's keyword check ignores case: no conflict
    "upper; end bye",  # the end checker ignores case
    "words<5; words>=3", "words<9; incl sun; end the end", "end the end; end end", "start so; start so what",
    "json; incl sun; excl moon", "json; quote", "json; end bye", "json; start well", "json; end ok}", "incl sun; excl moon; nochar z", "json; bullets=0",
    "lower; upper caps", ])
def test_compatible_sets(text):
  cs = P(text)
  if cs is None:  # "upper caps" is not a constraint: the parser says so
    assert text.endswith("upper caps")
    return
  assert I.conflicts(cs) == [], text
  assert I.is_valid(cs)


def test_compatible_sets_are_satisfiable_by_hand():
  assert I.check_all('"hello bye"', P("json; end bye; start hello; quote")) == [True, True, True, True]
  assert I.check_all("the sun is fine", P("lower; incl Sun")) == [True, True]


def test_impossible_alone_and_budget():
  assert I.conflicts(P("words<1")) == [(0, 0, "length_constraints:number_words: fewer than 1 words leaves no answer")]
  assert not I.is_valid(P("sents<1"))
  assert not I.is_valid(P("paras=0"))
  assert not I.is_valid(())
  assert not I.is_valid(None)
  assert I.is_valid(P("words>=30"))
  assert not I.is_valid(P("words>=30"), max_chars=48)  # 30 words need >= 59 characters
  assert I.is_valid(P("words>=24"), max_chars=48)  # 47 characters
  assert not I.is_valid(P("letter e>=60"), max_chars=48)
  assert not I.is_valid(P("end " + "x" * 50), max_chars=48)
  # tight is not impossible: "hard, tight or long alone do not count as conflicts"
  assert I.is_valid(P("words<2; incl sun; lower; nocomma; quote"), max_chars=48)
