"""Self-Lengthen: word counting, the filters, the acceptance rule, drop_short, the length-following score and
the constraint sampler on hand-made cases with hand-computed values; the SFT schedule and batch order against
independent references; bad configs; the smoke config through launch/run.py (results, workdir layout, SIGTERM
→ resume equal to the uninterrupted run, NaN in an SFT stage and in the base pretraining); every stage with a
stub sampler and a rerun that reads them back; the paper-scale SFT step and sampler lowered for GPU (slow)."""
import importlib
import importlib.util
import json
import os

import numpy as np
import pytest

from lmx.core.config import ConfigError
from lmx.methods.self_lengthen import filters as F
from lmx.methods.self_lengthen import lm as sl_lm
from tests import config_check, resume_check

sl_run = importlib.import_module("lmx.methods.self_lengthen.driver")


def _config(variant):
  return config_check.config("self_lengthen", variant)


# ------------------------------------------------------------------------------------------ words and filters


def test_count_words_hand_cases():
  assert F.count_words("") == 0
  assert F.count_words("  one two\tthree\nfour  ") == 4
  assert F.count_words("don't stop-me now.") == 3  # punctuation sticks to its word
  assert F.count_words("你好世界") == 4  # each CJK character is a word
  assert F.count_words("我爱 Python 3。") == 2 + 2 + 1  # 我 爱 + 'Python' '3' + '。' (CJK punctuation)
  assert F.count_words("ＡＢ c") == 3  # full-width forms are one word each


def test_terminal_punctuation():
  assert F.ends_with_punctuation("It works.  \n")
  assert F.ends_with_punctuation('He said "yes"')
  assert not F.ends_with_punctuation("no end here")
  assert not F.ends_with_punctuation("   ")
  assert F.ends_with_punctuation("列表：", "llama") is False
  assert F.ends_with_punctuation("结束。", "qwen") and not F.ends_with_punctuation("end.", "qwen")
  with pytest.raises(ValueError, match="flavour"):
    F.ends_with_punctuation("x.", "gpt")


def test_repeated_ngram_llama_10_words():
  nine = "a b c d e f g h i"
  # the same 10 words twice: repeated; 9 words twice with a different 10th: every 10-gram distinct
  assert F.repeated_ngram(f"{nine} j x {nine} k.") is None  # 9 shared words are not a 10-gram
  text = "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 mid w1 w2 w3 w4 w5 w6 w7 w8 w9 w10"
  assert F.repeated_ngram(text) == tuple(f"w{i}" for i in range(1, 11))
  text9 = "w1 w2 w3 w4 w5 w6 w7 w8 w9 mid w1 w2 w3 w4 w5 w6 w7 w8 w9"
  assert F.repeated_ngram(text9) is None
  # overlapping repeats count: 11 copies of one word hold the 10-gram (x,)*10 twice
  assert F.repeated_ngram(" ".join(["x"] * 11)) == ("x",) * 10
  assert F.repeated_ngram(" ".join(["x"] * 10)) is None
  assert F.repeated_ngram("a b a b a b", n=2) == ("a", "b")


def test_qwen_units_and_13_gram():
  # ASCII runs (spaces included) are one unit, each non-ASCII character its own unit
  assert F.units("ab c中d", "qwen") == ["ab c", "中", "d"]
  assert F.units("中文ok", "qwen") == ["中", "文", "ok"]
  assert F.units("", "qwen") == []
  s = "一二三四五六七八九十百千万"  # 13 distinct units
  assert F.repeated_ngram(s + "x" + s, "qwen") == tuple(s)
  assert F.repeated_ngram(s[:12] + "x" + s[:12], "qwen") is None


def test_check_details_each_filter():
  good = "Return the value.\nIt is cached."
  assert F.check_details(good) == {"punctuation": True, "repetition": True, "meta": True, "ok": True}
  d = F.check_details("Return the value")
  assert not d["punctuation"] and d["repetition"] and not d["ok"]
  d = F.check_details("Here is the revised text.\nIt is fine.")
  assert d["punctuation"] and not d["meta"] and not d["ok"]
  assert F.check_response("Here is the revised text.\nIt is fine.", meta_talk=False)
  # meta words only count in the first 2 and last 3 lines
  mid = "\n".join(["a.", "b.", "the response.", "c.", "d.", "e."])
  assert F.check_response(mid)
  rep = " ".join(["spam"] * 12) + "."
  d = F.check_details(rep)
  assert d["punctuation"] and not d["repetition"]
  assert F.check_details("x.", "qwen")["meta"]  # no meta-talk check for qwen


def test_acceptance_rule():
  init = "one two three four five."  # 5 words
  assert not F.accept_extension(init, "one two three four five six.")  # 6 = 1.2 x 5: not strictly more
  assert F.accept_extension(init, "one two three four five six seven.")  # 7 > 6
  assert not F.accept_extension(init, init)
  assert F.accept_extension(init, "a b c d e f g h i j k.", min_gain=2.0)  # 11 > 10
  assert not F.accept_extension(init, "a b c d e f g h i j.", min_gain=2.0)
  # a micro-iteration's candidate must pass the filters and be longer than the current best
  assert F.better_candidate("one two three four five six.", init)
  assert not F.better_candidate("one two three four five six", init)  # no terminal punctuation
  assert not F.better_candidate("one two three four.", init)  # shorter
  assert not F.better_candidate(" ".join(["na"] * 12) + ".", init)  # repeated 10-gram


def test_split_half_and_keep_two_thirds():
  assert F.first_half("p1\n\np2\n\np3\n\np4") == "p1\n\np2"
  assert F.first_half("p1\n\np2\n\np3") == "p1"  # 3 paragraphs: floor(3/2) = 1
  # at most 2 blank-line pieces: split on lines instead
  assert F.first_half("l1\nl2\n\nl3\nl4") == "l1\n\nl2"  # lines l1, l2, '', l3, l4 -> first 2
  assert F.first_half("only one line") == ""
  assert F.keep_two_thirds("a\n\nb\n\nc") == "a\n\nb"
  assert F.keep_two_thirds("a\n\nb\n\nc\n\nd\n\ne") == "a\n\nb\n\nc"  # 5*2//3 = 3
  assert F.keep_two_thirds("single paragraph") == ""


def test_degrade_lines_uses_one_draw_per_line():
  class Fixed:
    def random(self, n):
      return np.array([0.1, 0.9, 0.5, 0.79, 0.8][:n])

  assert F.degrade_lines("a\nb\nc\nd\ne", Fixed()) == "a\nc\nd"  # kept when u < 0.8
  assert F.degrade_lines("a\nb\nc\nd\ne", Fixed(), joiner="\n\n") == "a\n\nc\n\nd"


def test_drop_short_ranks_and_probabilities():
  lengths = [10, 40, 20, 30]
  # sorted 10 20 30 40: ranks 1, 0.25, 0.75, 0.5
  np.testing.assert_allclose(F.drop_short_ranks(lengths), [1.0, 0.25, 0.75, 0.5])
  np.testing.assert_allclose(F.drop_short_keep_prob(lengths),
                             [0.0, 1 - 2 * 0.25 ** 3, max(0, 1 - 2 * 0.75 ** 3), 1 - 2 * 0.5 ** 3])
  # ties share the rank of the first occurrence
  np.testing.assert_allclose(F.drop_short_ranks([5, 5, 7]), [1.0, 1.0, 1 / 3])

  class Fixed:
    def random(self, n):
      return np.array([0.99, 0.5, 0.99, 0.2])

  # keep when u > 2 rank^3: 2 rank^3 = 2, 0.03125, 0.84375, 0.25
  assert F.drop_short(lengths, Fixed()).tolist() == [1, 2]
  # the bottom ~20.6 % (rank^3 > 0.5) never survives
  rng = np.random.default_rng(0)
  kept = np.concatenate([F.drop_short(list(range(100)), rng) for _ in range(20)])
  assert kept.min() >= 20


# ------------------------------------------------------------------------------------------ length following


@pytest.mark.parametrize("length,kind,x,hi,expect", [
    (100, "about", 100, None, 1.0), (80, "about", 100, None, 1.0), (120, "about", 100, None, 1.0),
    (60, "about", 100, None, 2 * 60 / 80 - 1), (40, "about", 100, None, 0.0),
    (150, "about", 100, None, 3 - 2 * 150 / 120), (200, "about", 100, None, 0.0),
    (250, "range", 200, 300, 1.0), (150, "range", 200, 300, 0.5), (330, "range", 200, 300, 0.8),
    (140, "above", 100, None, 1.0), (90, "above", 100, None, 0.8), (165, "above", 100, None, 0.8),
    (50, "below", 100, None, 1.0), (45, "below", 100, None, 0.8), (110, "below", 100, None, 0.8),
    (0, "below", 100, None, 0.0),
])
def test_length_following_score_hand_values(length, kind, x, hi, expect):
  assert F.length_following_score(length, kind, x, hi) == pytest.approx(expect)


def test_length_following_bad_kind():
  with pytest.raises(ValueError, match="constraint kind"):
    F.length_following_score(10, "exactly", 10)
  with pytest.raises(ValueError, match="hi"):
    F.target_interval("range", 10)


def test_num_round_released_rule():
  assert F.num_round(7) == (7, 7, 7)
  assert F.num_round(47) == (50, 40, 50)
  assert F.num_round(45) == (40, 40, 50)  # Python's round: ties to even (4.5 -> 4)
  assert F.num_round(100) == (100, 90, 100)
  assert F.num_round(349) == (300, 300, 400)
  assert F.num_round(1000) == (1000, 900, 1000)
  assert F.num_round(3499) == (3000, 3000, 4000)
  assert F.num_round(3499, 2000) == (4000, 2000, 4000)  # 1.7495 rounds to 2
  assert F.num_round(5000, 2000) == (4000, 4000, 6000)  # 2.5 -> 2 (ties to even)


def test_constraint_sampler_types_and_caps():
  class Seq:
    def __init__(self, u):
      self.u = list(u)

    def random(self):
      return self.u.pop(0)

  # first draw: unit (< 0.2 coarse); second: type
  c = F.sample_length_constraint(3499, Seq([0.5, 0.1]), lo=2000, hi=8000)
  assert c == {"kind": "about", "x": 3000, "hi": None, "text": "around 3000 words"}
  c = F.sample_length_constraint(3499, Seq([0.1, 0.5]), lo=2000, hi=8000)  # coarse 2000: 4000, 2000, 4000
  assert (c["kind"], c["x"], c["hi"], c["text"]) == ("range", 2000, 4000, "2000-4000 words")
  c = F.sample_length_constraint(7900, Seq([0.5, 0.7]), lo=2000, hi=8000)  # floor 7000
  assert (c["kind"], c["x"], c["text"]) == ("above", 7000, "more than 7000 words")
  c = F.sample_length_constraint(7900, Seq([0.5, 0.9]), lo=2000, hi=7500)  # ceil 8000 capped at hi
  assert (c["kind"], c["x"], c["text"]) == ("below", 7500, "less than 7500 words")
  c = F.sample_length_constraint(2100, Seq([0.1, 0.7]), lo=3000, hi=8000)  # coarse floor 2000 raised to lo
  assert (c["kind"], c["x"]) == ("above", 3000)
  c = F.sample_length_constraint(13, Seq([0.5, 0.5]), lo=6, hi=30)  # tens below 100 words
  assert (c["kind"], c["x"], c["hi"]) == ("range", 10, 20)
  # the type shares of the released code: 0.4 / 0.25 / 0.1 / 0.25
  rng = np.random.default_rng(0)
  kinds = [F.sample_length_constraint(3000, rng, lo=2000, hi=8000)["kind"] for _ in range(4000)]
  shares = {k: kinds.count(k) / len(kinds) for k in F.CONSTRAINT_TYPES}
  for k, p in zip(F.CONSTRAINT_TYPES, (0.4, 0.25, 0.1, 0.25)):
    assert abs(shares[k] - p) < 0.03


# ------------------------------------------------------------------------------------------ formats, configs


def test_sft_arrays_mask_covers_response_and_eos():
  tok, mask = sl_lm.sft_arrays([("ab", "xyz")], 10)
  # BOS a b | x y z EOS | pad pad pad
  assert tok[0].tolist() == [sl_lm.BOS, 97, 98, 120, 121, 122, sl_lm.EOS, sl_lm.PAD, sl_lm.PAD, sl_lm.PAD]
  assert mask[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]
  with pytest.raises(ValueError, match="exceeds"):
    sl_lm.sft_arrays([("ab", "xyz")], 6)


def test_sft_schedule_is_warmup_then_cosine():
  c = _config("smoke")
  c.sft.optim.lr = 1.0
  # 20 steps, warmup ratio 0.1: 2 warmup steps from 0, then cosine over the remaining 18 to 0
  _, sched = sl_lm.sft_optimizer(c.sft.optim, 20, warmup_ratio=0.1)
  ref = lambda s: s / 2 if s < 2 else 0.5 * (1 + np.cos(np.pi * (s - 2) / 18))  # noqa: E731
  for s in (0, 1, 2, 5, 11, 19, 20):
    assert float(sched(s)) == pytest.approx(ref(s), abs=1e-6)
  assert float(sched(11)) == pytest.approx(0.5)
  # the bootstrap's own rate, no warmup when the ratio rounds to 0 steps
  _, sched = sl_lm.sft_optimizer(c.sft.optim, 4, warmup_ratio=0.1, lr=1e-3)
  assert float(sched(0)) == pytest.approx(1e-3)


@pytest.mark.parametrize("n,batch", [(3, 8), (10, 4), (8, 8)])
def test_sft_batches_walk_epochs_across_batch_boundaries(n, batch):
  from lmx.core.rng import np_stream

  ref = np.concatenate([np_stream(5, "s0/x", e).permutation(n) for e in range(20)])
  for k in range(6):
    rows = sl_lm.wrapped_epoch_rows(n, batch, k, seed=5, name="s0/x")
    assert rows.tolist() == ref[k * batch:(k + 1) * batch].tolist()
  assert sl_lm.sft_steps(3, 8, 4.0) == 2 and sl_lm.sft_steps(1, 8, 0.1) == 1 and sl_lm.sft_steps(16, 8, 1.0) == 2


@pytest.mark.parametrize("field,value,match", [
    ("loop.macro_iters", 0, "loop.macro_iters"),
    ("loop.min_gain", 0.9, "loop.min_gain"),
    ("loop.flavour", "gpt", "loop.flavour"),
    ("loop.line_keep", 0.0, "loop.line_keep"),
    ("data.draft_chars", 10_000, "data.draft_chars"),
    ("length_sft.eval_buckets", ((5, 3),), "length_sft.eval_buckets"),
    ("base.model.max_seq_len", 64, "base.model.max_seq_len"),
    ("seeds", (1, 1), "seeds"),
    ("sft.optim.lr", 0.0, "sft.optim.lr"),
    ("sft.warmup_ratio", 1.0, "sft.warmup_ratio"),
    ("bootstrap.gen_steps", 0, "bootstrap.gen_steps"),
])
def test_bad_config_names_the_field(field, value, match):
  config_check.refuses(sl_run.validate, _config("smoke"), field, value, match)


def test_unknown_field_is_refused():
  c = _config("smoke")
  c.loop.typo = 1
  with pytest.raises(ConfigError, match="loop"):
    sl_run.validate(c)


def test_schema_errors_name_the_field_and_safe_fields():
  """A typo'd field, an out-of-range value and an unknown choice each give a one-line ConfigError naming the
  field (every SFT's warmup comes from sft.warmup_ratio, so sft.optim has no warmup_steps); a resume may change
  the logging cadence, plotting, the mesh, the sharding rules and the attention kernel only."""
  from lmx.core import schema
  for field, value, match in [
      ("sampling.top_q", 0.5, r"sampling: unknown field\(s\) \['top_q'\]"),
      ("sft.optim.warmup_steps", 10, r"sft.optim: unknown field\(s\) \['warmup_steps'\]"),
      ("data.heldout_fraction", 1.5, "data.heldout_fraction: must be"),
      ("sampling.top_p", 0.0, "sampling.top_p: must be"),
      ("base.optim.b2", 1.0, "base.optim.b2: must be"),
      ("loop.flavour", "gpt", "loop.flavour: 'gpt' is not one of"),
      ("sft.optim.schedule", "linear", "sft.optim.schedule: 'linear' is not one of"),
  ]:
    config_check.refuses(sl_run.validate, _config("smoke"), field, value, match)
  assert set(schema.safe_fields("self_lengthen")) == {
      "train.log_every", "train.plot", "mesh.data", "mesh.fsdp", "mesh.model", "mesh.expert", "axis_rules",
      "base.model.attention_impl"}


def test_config_flavours_match_the_filters():
  """The config file imports no method code, so it states the filters' flavours again."""
  assert config_check.module("self_lengthen").FLAVOURS == F.FLAVOURS


# ------------------------------------------------------------------------------------------ the loop, stubbed


class StubSampler:
  """Stands in for the LM: stage-1 prompts (ending in 'Enriched:\\n') get three paragraphs, stage-2 prompts (the
  kept part F appended) a fixed continuation; records every decoded prompt."""

  def __init__(self):
    self.prompts = []

  def __call__(self, params, prompts, key, **kw):
    from lmx.datasets import text as text_lib
    out = []
    for p in prompts:
      t = text_lib.decode(p)
      self.prompts.append(t)
      out.append("P1 a.\n\nP2 b.\n\nP3 c." if t.endswith("Enriched:\n") else "\n\nTail words here.")
    return out, np.ones(len(prompts), bool)


def test_two_stage_extension_and_acceptance_with_a_stub_model():
  c = _config("smoke")
  c.loop.update(ext_jobs=1, micro_iters=3, ext_retries=0)
  stub = StubSampler()
  drafts = [("t.short", "Aa bb.\nCc dd."), ("t.long", "one two three four five six.")]
  acc, micro, stats = sl_run.extend(c, stub, None, drafts, key=__import__("jax").random.key(0))
  # candidate = F + L = "P1 a.\n\nP2 b." + "\n\nTail words here." = 7 words; the first micro-iteration replaces
  # both drafts (7 > 4, 7 > 6); later ones do not (7 is not > 7). Accepted: 7 > 1.2 x 4; rejected: 7 <= 1.2 x 6.
  assert acc == [("t.short", "Aa bb.\nCc dd.", "P1 a.\n\nP2 b.\n\nTail words here.")]
  assert stats == {"jobs": 2, "accepted": 1, "acceptance_rate": 0.5}
  assert [m["longer"] for m in micro] == [2, 0, 0]
  # stage 1 sees the first half (lines, as the draft has one paragraph); stage 2 the whole text, then F
  assert stub.prompts[0] == sl_lm.ext_prompt("t.short", "Aa bb.")
  assert stub.prompts[2] == sl_lm.ext_prompt("t.short", "Aa bb.\nCc dd.") + "P1 a.\n\nP2 b."
  # the second micro-iteration extends the replaced text
  assert stub.prompts[4] == sl_lm.ext_prompt("t.short", F.first_half("P1 a.\n\nP2 b.\n\nTail words here."))


def test_drafts_redraw_failures_then_drop_short():
  c = _config("smoke")
  c.loop.update(samples_per_prompt=1, draft_retries=1, drop_short=False)

  class Flaky:
    calls = 0

    def __call__(self, params, prompts, key, **kw):
      Flaky.calls += 1
      # first call: one good, one without terminal punctuation; the retry fixes it
      if Flaky.calls == 1:
        return ["Good one.", "no end"], np.array([True, True])
      return ["Fixed now."], np.array([True])

  pairs, st = sl_run.draft(c, Flaky(), None, ["a", "b"], __import__("jax").random.key(0), np.random.default_rng(0))
  assert pairs == [("a", "Good one."), ("b", "Fixed now.")]
  assert st["first_try_pass_rate"] == 0.5 and st["passed"] == 2


# ------------------------------------------------------------------------------------------ end to end


SMOKE = "configs/self_lengthen.py:smoke"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """One uninterrupted smoke run through launch/run.py, shared by the end-to-end, layout and resume tests."""
  return resume_check.reference_run(tmp_path_factory, "sl", SMOKE)[0]


def test_smoke_run_end_to_end(smoke_run):
  c = _config("smoke")
  saved = resume_check.results(smoke_run)
  assert saved["method"] == "self_lengthen" and len(saved["per_seed"]) == 1 and "wall_s" in saved
  r = saved["per_seed"][0]
  assert len(r["evals"]) == c.loop.macro_iters + 1 and len(r["iters"]) == c.loop.macro_iters
  for ev in r["evals"]:
    assert 0 <= ev["pass_repetition"] <= 1 and len(ev["words"]) == c.eval.n_topics * c.eval.n_samples
    assert ev["words_mean"] == pytest.approx(np.mean(ev["words"]))
  assert 0 <= r["length_sft"]["before"]["overall"] <= 1
  boot = r["bootstrap"]["gen"]
  assert boot["steps"] == c.bootstrap.gen_steps and boot["lr"] == c.bootstrap.lr
  assert np.isfinite(boot["first_ce"]) and np.isfinite(boot["last_ce"])
  # one seed: the sample std is undefined, n is stated
  assert saved["summary"]["iters"][0]["words_mean"]["n"] == 1
  assert saved["summary"]["iters"][0]["words_mean"]["std"] is None
  resume_check.check_layout(smoke_run)
  for name in ("s0", "s0/boot_gen", "s0/boot_ext", "s0/it0/eval", "s0/it1/draft", "s0/it1/extend",
               "s0/it1/filter", "s0/it1/eval", "s0/lf/before"):
    assert os.path.isfile(smoke_run / "stages" / name / "stage.json"), name
  rows = [json.loads(x) for x in open(smoke_run / "metrics.jsonl")]
  assert any("s0/boot_gen/loss" in x for x in rows) and any("s0/eval/words_mean" in x for x in rows)


def test_sigterm_resume_equals_uninterrupted(tmp_path, smoke_run):
  resume_check.check_sigterm_resume(tmp_path, SMOKE, reference=smoke_run)


def test_nan_in_the_bootstrap_sft_stops(tmp_path):
  line = resume_check.check_nan_stops(tmp_path, SMOKE, "s0/boot_gen", 1)
  assert "s0/boot_gen" in line or "checkpoint" in line


def test_nan_in_the_base_pretraining_stops(tmp_path):
  # the base LM trains in the shared lm pretraining stage, named "base" (its loop's log prefix is "base/")
  resume_check.check_nan_stops(tmp_path, SMOKE, "base", 1, "--config.base.steps=2")


class PassingSampler:
  """Stands in for the LM with outputs that pass the filters, so every stage runs: drafts of 2-4 words by
  topic, stage-1 enrichments of three paragraphs, a stage-2 tail; the words vary with the prompt so drop_short
  keeps some."""

  def __init__(self, *a, **kw):
    pass

  def __call__(self, params, prompts, key, bar=None):
    import zlib

    from lmx.datasets import text as text_lib
    out = []
    for p in prompts:
      t = text_lib.decode(p)
      n = 2 + zlib.crc32(t.encode()) % 5
      if t.endswith("Text:\n"):
        out.append(" ".join(["word"] * n) + ".")
      elif t.endswith("Enriched:\n"):
        out.append(" ".join(["P1"] * n) + ".\n\nP2 b.\n\nP3 c.")
      else:
        out.append("\n\nTail words here.")
    return out, np.ones(len(prompts), bool)


@pytest.mark.slow  # five SFT compilations
def test_every_stage_runs_and_a_rerun_reads_them_back(tmp_path, monkeypatch):
  from lmx.methods.self_lengthen.driver import run

  monkeypatch.setattr(sl_lm, "Sampler", PassingSampler)
  monkeypatch.setenv("LMX_NO_PROGRESS", "1")
  c = _config("smoke")
  c.loop.n_prompts = 8
  c.train.plot = False
  res = run(c, str(tmp_path))
  it = res["per_seed"][0]["iters"][0]
  kept = it["extension"]["kept"]
  assert 0 < kept < it["accepted_before_drop_short"]
  assert it["gen_sft"]["steps"] == sl_lm.sft_steps(kept, c.sft.batch, c.sft.epochs) == it["ext_sft"]["steps"]
  lf = res["per_seed"][0]["length_sft"]
  assert lf["pairs"] > 0 and lf["train"]["steps"] == sl_lm.sft_steps(lf["pairs"], c.sft.batch, c.length_sft.epochs)
  assert lf["after"] is not None
  saved = resume_check.checkpoints(tmp_path)
  for name in ("s0/it1/gen_sft", "s0/it1/ext_sft", "s0/lf/sft"):
    assert any(f"/checkpoints/{name}/" in d for d in saved), name
  # a rerun on the same workdir reads every stage back: same results, nothing trained again
  again = run(c, str(tmp_path))
  assert resume_check.without_timing(json.loads(json.dumps(again, default=float))) == \
      resume_check.without_timing(json.loads(json.dumps(res, default=float)))


@pytest.mark.slow
def test_paper_scale_sft_step_and_sampler_lower_for_cuda():
  from lmx.methods.self_lengthen import paper

  c = _config("qwen2_7b")
  # 'auto' picks cuDNN on a GPU, which cannot be traced on a CPU host; lower the Triton kernel instead
  out = paper.lower(c, "cuda", seq_len=16384, gen_batch=8, prompt_len=2048, new_tokens=16384,
                    attention_impl="pallas")
  assert 7.0e9 < out["params"] < 8.0e9  # Qwen2-7B: 7.6B parameters
  sft_hlo = out["sft"].as_text()
  assert "16384" in sft_hlo and "bf16" in sft_hlo
  gen_hlo = out["generate"].as_text()
  assert "while" in gen_hlo  # the cached sampling loop
