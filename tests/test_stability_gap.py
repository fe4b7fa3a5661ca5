"""Stability gap: the n-gram filter, the strategy streams (budget, mixture ratios, per-epoch resampling), the
relative weight update, the probe and the gap statistics against independent references; bad configs; a smaller
smoke run through launch/run.py with its stages and a SIGTERM resume."""
import collections
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.core.config import ConfigError
from lmx.datasets import text
from lmx.methods.stability_gap import data as sg_data
from lmx.methods.stability_gap import driver as sg_run
from lmx.methods.stability_gap import ngram, probe, report, weights
from tests import config_check, resume_check


def _config(variant):
  return config_check.config("stability_gap", variant)


# ------------------------------------------------------------------------------------------ n-gram


def test_ngram_bigram_hand_probabilities():
  lm = ngram.fit(["abab"], order=2, add_k=1.0, vocab=256)
  # padded: <s> a b a b  ->  bigrams (<s>,a)=1 (a,b)=2 (b,a)=1; contexts <s>=1 a=2 b=1
  lp = ngram.byte_logprobs(lm, "abx")
  expect = [math.log((1 + 1) / (1 + 256)), math.log((2 + 1) / (2 + 256)), math.log((0 + 1) / (1 + 256))]
  np.testing.assert_allclose(lp, expect, rtol=1e-12)
  np.testing.assert_allclose(ngram.perplexity(lm, "abx"), math.exp(-np.mean(expect)), rtol=1e-12)
  # an unseen context: add-k gives the uniform 1/V
  np.testing.assert_allclose(ngram.byte_logprobs(lm, "zz")[1], math.log(1 / 256), rtol=1e-12)


def _dict_ngram_logprobs(train, doc, n, k, v):
  """Independent reference: Python dicts over padded character tuples."""
  pad = ("<s>",) * (n - 1)
  grams, ctxs = collections.Counter(), collections.Counter()
  for t in train:
    x = pad + tuple(t.encode())
    for i in range(n - 1, len(x)):
      grams[x[i - n + 1: i + 1]] += 1
      ctxs[x[i - n + 1: i]] += 1
  x = pad + tuple(doc.encode())
  return [math.log((grams[x[i - n + 1: i + 1]] + k) / (ctxs[x[i - n + 1: i]] + k * v)) for i in range(n - 1, len(x))]


@pytest.mark.parametrize("order", [1, 3, 5])
def test_ngram_matches_dict_reference(order):
  rng = np.random.default_rng(order)
  train = ["".join(rng.choice(list("abcd "), size=200)) for _ in range(3)]
  doc = "".join(rng.choice(list("abcde "), size=60))
  lm = ngram.fit(train, order=order, add_k=0.5, vocab=256)
  np.testing.assert_allclose(ngram.byte_logprobs(lm, doc), _dict_ngram_logprobs(train, doc, order, 0.5, 256),
                             rtol=1e-10)


def test_ngram_ranks_general_like_text_lowest():
  general = ["the cat sat on the mat. the dog sat on the log."] * 5
  docs = ["zq xv jj kkq zzv qq", "the cat sat on the log.", "the dog ate the mat quickly", "QQQQ !!!! ####"]
  order, ppl = ngram.rank_by_perplexity(ngram.fit(general, order=3, add_k=0.1), docs)
  assert list(order[:2]) == [1, 2] and set(order[2:]) == {0, 3}
  assert ppl[1] < ppl[2] < min(ppl[0], ppl[3])


# ------------------------------------------------------------------------------------------ strategy streams


def _docs(n, length, seed):
  rng = np.random.default_rng(seed)
  return [(f"d{i}", "".join(rng.choice(list("abcdefgh "), size=length))) for i in range(n)]


def _pools(epochs=4, seq_len=8):
  domain = _docs(20, 120, 0)
  general = _docs(30, 100, 1)
  dom = sg_data.windows(domain, seq_len)
  hq, taken = sg_data.take_documents(domain, list(range(19, -1, -1)), len(dom) // epochs, seq_len)
  return sg_data.Pools(domain=dom, general=sg_data.windows(general, seq_len), hq=hq, hq_docs=taken,
                       domain_docs=domain, seq_len=seq_len, epochs=epochs)


def _keys(ds):
  return [bytes(np.asarray(x, np.int32)) for x in ds]


def test_take_documents_takes_in_order_and_cuts_exactly():
  docs = _docs(10, 50, 2)
  win, taken = sg_data.take_documents(docs, [3, 1, 7, 0, 2, 4, 5, 6, 8, 9], 9, 8)
  assert len(win) == 9 and taken[:2] == [3, 1]
  joined = text.encode(text.DOC_SEP.join(docs[i][1] for i in taken))
  np.testing.assert_array_equal(np.concatenate([win[i][:-1] for i in range(9)]), joined[:72])


def test_strategies_spend_the_same_token_budget():
  pools = _pools()
  B = 4
  steps = sg_data.budget_steps(pools, B)
  assert steps == len(pools.domain) // B
  sizes = {}
  for name in sg_data.STRATEGIES:
    ds, info = sg_data.strategy_stream(name, pools, steps=steps, global_batch=B, seed=0, domain_ratio=0.75)
    batches = list(sg_data.batched(ds, B))
    sizes[name] = sum(np.asarray(b).size - np.asarray(b).shape[0] for b in batches)  # trained tokens (targets)
    assert len(batches) == steps and info["items"] == steps * B, name
    assert info["tokens"] == steps * B * pools.seq_len
  assert len(set(sizes.values())) == 1 and sizes["full"] == steps * B * pools.seq_len
  # the subsets are 1/epochs of the domain windows, seen ~epochs times
  for name in ("random", "hq", "hq_mix"):
    _, info = sg_data.strategy_stream(name, pools, steps=steps, global_batch=B, seed=0, domain_ratio=0.75)
    assert info["pool_windows"] == len(pools.domain) // pools.epochs
    assert abs(info["epochs"] - pools.epochs) < pools.epochs * 1.0 / info["pool_windows"] + 1e-9


def test_epochs_stream_is_a_new_permutation_each_epoch_and_reproducible():
  pool = [np.array([i], np.int32) for i in range(50)]
  a = [int(x[0]) for x in sg_data.epochs_stream(pool, 130, seed=3, name="t")]
  assert len(a) == 130
  assert sorted(a[:50]) == list(range(50)) and sorted(a[50:100]) == list(range(50))
  assert a[:50] != a[50:100]
  assert a == [int(x[0]) for x in sg_data.epochs_stream(pool, 130, seed=3, name="t")]
  assert a != [int(x[0]) for x in sg_data.epochs_stream(pool, 130, seed=4, name="t")]


def test_mixture_ratio_and_per_epoch_resampling():
  domain = [np.array([i], np.int32) for i in range(400)]
  general = [np.array([10_000 + i], np.int32) for i in range(1000)]
  L, r, E = 200, 0.8, 6
  ds = sg_data.mixture_stream(domain, general, L * E, domain_ratio=r, epoch_len=L, seed=1)
  xs = [int(x[0]) for x in ds]
  assert len(xs) == L * E
  dom_sets, gen_sets = [], []
  for e in range(E):
    ep = xs[e * L:(e + 1) * L]
    d = [x for x in ep if x < 10_000]
    g = [x for x in ep if x >= 10_000]
    assert abs(len(d) - r * L) <= 1, (e, len(d))  # the set ratio within one window per epoch
    assert len(set(d)) == len(d) and len(set(g)) == len(g)  # draws without replacement inside an epoch
    dom_sets.append(frozenset(d))
    gen_sets.append(frozenset(g))
  assert abs(sum(x < 10_000 for x in xs) / len(xs) - r) < 1 / L
  assert len(set(dom_sets)) == E and len(set(gen_sets)) == E  # redrawn every epoch
  # rerun: identical; another seed: another draw
  assert xs == [int(x[0]) for x in sg_data.mixture_stream(domain, general, L * E, domain_ratio=r, epoch_len=L, seed=1)]
  other = [int(x[0]) for x in sg_data.mixture_stream(domain, general, L * E, domain_ratio=r, epoch_len=L, seed=2)]
  assert frozenset(x for x in other[:L] if x < 10_000) != dom_sets[0]
  # data-fixed: the same draw every epoch (in a new order)
  fixed = [int(x[0]) for x in sg_data.mixture_stream(domain, general, L * 3, domain_ratio=r, epoch_len=L, seed=1,
                                                     resample=False)]
  assert len({frozenset(fixed[e * L:(e + 1) * L]) for e in range(3)}) == 1
  assert fixed[:L] != fixed[L:2 * L]


def test_random_subset_depends_on_seed_and_hq_does_not():
  pools = _pools()
  _, a = sg_data.random_subset(pools, 0)
  _, b = sg_data.random_subset(pools, 1)
  assert a != b and a == sg_data.random_subset(pools, 0)[1]
  s0 = _keys(sg_data.strategy_stream("hq", pools, steps=4, global_batch=4, seed=0, domain_ratio=0.5)[0])
  s1 = _keys(sg_data.strategy_stream("hq", pools, steps=4, global_batch=4, seed=1, domain_ratio=0.5)[0])
  hq = {bytes(np.asarray(pools.hq[i], np.int32)) for i in range(len(pools.hq))}
  assert set(s0) <= hq and set(s1) <= hq and s0 != s1  # same pool, another order


# ------------------------------------------------------------------------------------------ weights


def test_relative_update_against_numpy():
  rng = np.random.default_rng(0)
  shapes = {"blocks": {0: {"w": (3, 4), "b": (4,)}, 1: {"w": (3, 4), "b": (4,)}, 2: {"w": (5,)}}, "embed": (6, 3)}
  p0 = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes, is_leaf=lambda x: isinstance(x, tuple))
  pt = jax.tree.map(lambda a: a + rng.normal(size=a.shape).astype(np.float32) * 0.1, p0)
  rel = weights.relative_update(jax.tree.map(jnp.asarray, pt), jax.tree.map(jnp.asarray, p0))
  r = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)  # noqa: E731
  for i in (0, 1):
    blk_t, blk_0 = pt["blocks"][i], p0["blocks"][i]
    np.testing.assert_allclose(rel[f"block{i}"], np.mean([r(blk_t[k], blk_0[k]) for k in ("w", "b")]), rtol=1e-5)
  np.testing.assert_allclose(rel["block2"], r(pt["blocks"][2]["w"], p0["blocks"][2]["w"]), rtol=1e-5)
  np.testing.assert_allclose(rel["embed"], r(pt["embed"], p0["embed"]), rtol=1e-5)
  assert set(rel) == {"block0", "block1", "block2", "embed"}
  np.testing.assert_allclose(weights.bottom_top_ratio({"block0": 0.3, "block1": 0.2, "block2": 0.1, "embed": 9}, 1),
                             3.0)
  np.testing.assert_allclose(weights.bottom_top_ratio({"block0": 0.4, "block1": 0.2, "block2": 0.1, "block3": 0.1}, 2),
                             3.0)
  with pytest.raises(ValueError):
    weights.bottom_top_ratio({"block0": 1.0}, 1)


# ------------------------------------------------------------------------------------------ probe


def test_probe_scores_with_a_fake_logits_function():
  V = 8
  logp_tok = np.log(np.array([0.5, 0.2, 0.1, 0.1, 0.05, 0.03, 0.01, 0.01]))

  def logits_fn(params, x_NT):  # context-free: every position predicts the same distribution (times params)
    return jnp.broadcast_to(jnp.asarray(logp_tok) * params, x_NT.shape + (V,))

  ctx = 3
  tokens = np.array([[[7, 7, 7, 0, 0], [7, 7, 7, 1, 2]],  # item 0: candidate 0 most likely
                     [[5, 5, 5, 6, 6], [5, 5, 5, 0, 4]],  # item 1: candidate 1 most likely
                     [[1, 1, 1, 2, 3], [1, 1, 1, 3, 2]]])  # item 2: a tie
  got = np.asarray(probe.continuation_logprobs(logits_fn, 1.0, jnp.asarray(tokens.reshape(6, 5)), ctx)).reshape(3, 2)
  expect = np.array([[logp_tok[a] + logp_tok[b] for a, b in tokens[i, :, ctx:]] for i in range(3)])
  np.testing.assert_allclose(got, expect, rtol=1e-5)
  out = probe.score(expect, np.array([0, 0, 0]), cont_len=2)
  assert out["acc"] == pytest.approx(1 / 3)  # item 0 right, item 1 wrong, item 2 a tie (wrong)
  np.testing.assert_allclose(out["margin"], np.mean(expect[:, 0] - expect[:, 1]) / 2)
  assert probe.score(expect, np.array([0, 1, 1]), cont_len=2)["acc"] == pytest.approx(2 / 3)


def test_probe_items_come_from_the_right_documents():
  docs = [("a", "alpha beta gamma delta epsilon zeta eta theta"), ("b", "one two three four five six seven eight"),
          ("c", "red green blue cyan magenta yellow black white")]
  items = probe.make_items(docs, n_items=12, context_len=10, cont_len=6, n_distractors=2, seed=0)
  assert items.tokens_ICT.shape == (12, 3, 16)
  for i in range(12):
    cands = [text.decode(c) for c in items.tokens_ICT[i]]
    ctx = cands[0][:10]
    assert all(c[:10] == ctx for c in cands)
    src = [t for _, t in docs if ctx in t]
    true = cands[items.label_I[i]]
    assert any(true in t for t in src)  # the true continuation follows its context in the source
    for j, c in enumerate(cands):
      assert c[9] == " " or ctx[-1] == " "  # contexts end at a space
      if j != items.label_I[i]:
        assert not any(c[10:] in t for t in src)  # distractors come from other documents
  with pytest.raises(ConfigError):
    probe.make_items(docs[:1], n_items=2, context_len=10, cont_len=6, n_distractors=2, seed=0)


# ------------------------------------------------------------------------------------------ gap statistics


def test_gap_stats_by_hand():
  g = report.gap_stats([0, 10, 20, 30, 40], [2.0, 2.5, 2.3, 1.9, 1.8], higher_is_better=False)
  assert g == {"start": 2.0, "final": 1.8, "max_drop": 0.5, "worst_step": 10.0, "recover_step": 30.0}
  g = report.gap_stats([0, 10, 20], [2.0, 2.5, 2.4], higher_is_better=False)
  assert g["max_drop"] == 0.5 and g["recover_step"] is None
  g = report.gap_stats([0, 10, 20, 30], [0.5, 0.25, 0.5, 0.75], higher_is_better=True)
  assert g["max_drop"] == 0.25 and g["worst_step"] == 10.0 and g["recover_step"] == 20.0
  g = report.gap_stats([0, 10], [2.0, 1.0], higher_is_better=False)
  assert g["max_drop"] == 0.0 and g["recover_step"] == 0.0  # never worse: no gap
  per_seed = {0: {"full": {"x": 1.0}, "hq_mix": {"x": 0.6}}, 1: {"full": {"x": 2.0}, "hq_mix": {"x": 1.0}}}
  red = report.reduction(per_seed, "x", "hq_mix", "full")
  np.testing.assert_allclose(red["per_seed"], [0.4, 0.5])
  np.testing.assert_allclose(red["of_means"], 1 - 0.8 / 1.5)
  # the noise is the larger sample std (ddof 1) over seeds: full's {1, 2} → 0.707 > the 0.7 between the means
  assert red["noise_std"] == pytest.approx(2 ** -0.5) and red["beyond_noise"] is False
  row = report.summarize(per_seed, ["x"])["full"]["x"]
  assert row["mean"] == 1.5 and row["std"] == pytest.approx(2 ** -0.5) and row["n"] == 2
  one = report.reduction({0: per_seed[0]}, "x", "hq_mix", "full")
  assert one["noise_std"] is None and one["beyond_noise"] is False  # one seed: no noise estimate


# ------------------------------------------------------------------------------------------ config checks


@pytest.mark.parametrize("field,value,match", [
    ("strategies.names", ("full", "bogus"), "strategies.names"),
    ("data.domain", "klingon", "data.domain"),
    ("data.general", "nope", "data.general"),
    ("strategies.domain_ratio", 1.5, "strategies.domain_ratio"),
    ("strategies.domain_ratio", 0.0, "strategies.domain_ratio"),
    ("strategies.epochs", 0, "strategies.epochs"),
    ("base.source", "hub", "base.source"),
    ("ngram.order", 9, "ngram.order"),
    ("seeds", (0, 0), "seeds: must be distinct"),
    ("strategies.names", ("full", "full"), "strategies.names: lists a strategy twice"),
])
def test_bad_config_names_the_field(field, value, match):
  config_check.refuses(sg_run.validate, _config("smoke"), field, value, match)


@pytest.mark.parametrize("field,value,needle", [
    ("strategies.epoch", 2, r"strategies: unknown field\(s\) \['epoch'\]; valid: \[.*'epochs'"),
    ("optim.warmup_steps", 10, r"optim.warmup_steps: is set by train.warmup_ratio"),
    ("train.warmup_ratio", 1.0, r"train.warmup_ratio: must be >= 0 and < 1, got 1.0"),
    ("probe.cont_len", 0, r"probe.cont_len: must be a whole number and >= 1, got 0"),
    ("base.optim.b2", 1.0, r"base.optim.b2: must be >= 0 and < 1, got 1.0"),
    ("seeds", (0, -1), r"seeds\[1\]: must be a whole number and >= 0, got -1"),
    ("strategies.names", ("full", "bogus"), r"strategies.names\[1\]: 'bogus' is not one of"),
    ("base.source", "hub", r"base.source: 'hub' is not one of \['pretrain', 'run'\]"),
])
def test_schema_names_the_wrong_field_in_one_line(field, value, needle):
  config_check.refuses(sg_run.validate, _config("smoke"), field, value, needle, anchored=True)


def test_safe_fields_and_config_choices():
  from lmx.core import schema

  mod = config_check.module("stability_gap")
  mod.get_config("smoke")
  # not seeds or strategies.names (more seeds go to a new workdir), nor the eval cadence (it shapes the curves)
  assert set(schema.safe_fields("stability_gap")) == {
      "train.log_every", "train.ckpt_keep", "train.async_checkpointing", "train.plot",
      "mesh.data", "mesh.fsdp", "mesh.model", "mesh.expert", "axis_rules",
      "base.model.attention_impl", "base.model.remat", "base.model.moe_impl"}
  assert mod.STRATEGIES == sg_data.STRATEGIES


def test_missing_base_run_and_small_domain_are_clear(tmp_path):
  c = _config("smoke")
  c.base.source, c.base.workdir = "run", str(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="base.workdir"):
    sg_run.validate(c)
  c = _config("smoke")
  c.data.min_domain_chars = 10**9
  with pytest.raises(ConfigError, match="data.domain"):
    sg_run.load_corpora(c)


def test_corpora_are_present_and_recorded():
  for name in ("legal", "stdlib_docstrings"):
    info = text.corpus_info(name)
    assert info["chars"] > 100_000 and len(info["sha256"]) == 64 and info["documents"] > 10
  ids = [k for k, _ in text.stdlib_docstrings_documents()]
  assert not any("/test/" in f"/{k}" or k.startswith("test") for k in ids)
  legal = text.legal_documents()
  paras = [" ".join(p.split()) for _, t in legal for p in t.split(text.DOC_SEP) if p.strip()]
  assert len(paras) == len(set(paras))  # repeated paragraphs dropped


# ------------------------------------------------------------------------------------------ end to end


CONFIG = "configs/stability_gap.py:smoke"
# the smoke config, smaller: a 10-step base, a third of the smoke's domain text (one epoch = 21 steps), two strategies
SHORT = ("--config.base.steps=10", "--config.data.max_domain_chars=7000",
         "--config.strategies.names=('full','hq_mix')")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted run of the smaller smoke config through launch/run.py, shared by the tests below."""
  return resume_check.reference_run(tmp_path_factory, "sg", CONFIG, *SHORT)[0]


def test_smoke_stages_and_results(reference):
  w = str(reference)
  resume_check.check_layout(w)
  res = resume_check.results(w)
  assert res["strategies"] == ["full", "hq_mix"]
  assert len(set(res["budget"]["tokens_by_run"].values())) == 1
  for name in res["strategies"]:
    st = res["per_seed"]["0"][name]
    assert st["domain_ce_final"] < st["domain_ce_start"]  # the domain is learnt
    assert np.isfinite(st["general_ce_max_drop"])
    assert res["summary"][name]["general_ce_max_drop"]["n"] == 1  # one seed: no std
  for stage in ("base", "full/s0", "hq_mix/s0"):
    assert json.load(open(os.path.join(w, "stages", stage, "stage.json")))["status"] == "finished", stage
  assert os.path.exists(os.path.join(w, "plots", "general_ce.png")) and os.path.exists(os.path.join(w, "table.md"))
  assert res["corpora"]["domain"]["sha256"] and res["ngram"]["hq_documents"] > 0


def test_sigterm_inside_a_strategy_resumes_to_the_same_results(tmp_path, reference):
  # checkpoint saves: the base at 10 (1), full/s0 every 6 steps (2, 3, ...): the stop is inside full/s0
  resume_check.check_sigterm_resume(tmp_path, CONFIG, *SHORT, reference=reference, save=3)
