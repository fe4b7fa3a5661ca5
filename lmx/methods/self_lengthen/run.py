"""Self-Lengthen driver (Quan et al. 2024, arXiv 2410.23933; QwenLM/Self-Lengthen) in miniature.

Stages (see ``configs/self_lengthen.py``):
  1. the base: a byte-level ``lm`` run pretrained on the stdlib docstrings (``<workdir>/base``, reused when
     finished), or the random initialisation with ``base.steps=0``;
  2. the seed set (:mod:`.seeds`): (topic, docstring) pairs, split by module into train and held-out topics;
  3. the two roles from the shared base (two parameter sets, full fine-tuning at this scale): the Generator
     SFT'd on (topic → the docstring's first paragraph: short "instruct" answers), the Extender on
     (topic + line-dropped text → text), the released ``ext_sft`` construction;
  4. per seed, ``loop.macro_iters`` macro-iterations: ``loop.n_prompts`` train topics; the Generator drafts
     ``samples_per_prompt`` responses each (failed filters redrawn up to ``draft_retries`` times), then
     ``drop_short``; each draft gets ``ext_jobs`` extension jobs of up to ``micro_iters`` two-stage
     micro-iterations (the Extender enriches the first half, keeps ⌊2/3⌋ of its paragraphs as F, then continues
     from F given the whole text; a candidate that passes the filters and has more words replaces the text);
     a job is accepted when its final text has more than ``min_gain`` × the words of the draft (failed jobs
     rerun up to ``ext_retries`` times), then ``drop_short``; the Generator is trained on (topic → extended), the
     Extender on (topic + degraded draft → extended), each continuing from its previous parameters;
     after every macro-iteration the Generator answers the held-out topics (lengths, filter pass rates);
  5. the length-following fine-tune: every (topic, draft) and (topic, extended) of all macro-iterations with
     ``length_sft.min_words <= words < max_words`` gets a sampled constraint (:func:`.filters.sample_length_
     constraint`) in its prompt; the final Generator is fine-tuned on them; the length-following score on a grid
     of held-out (topic, constraint) before (final Generator) and after;
  6. mean ± std over seeds, plots, results.json.
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np

from lmx.core import mesh as mesh_lib, plots
from lmx.core.config import check_keys, require
from lmx.core.metrics import Writer
from lmx.core.results import plot_path, summary_line, write_results
from lmx.core.rng import np_stream, rng_stream
from lmx.datasets import text as text_lib
from lmx.methods.self_lengthen import filters as F
from lmx.methods.self_lengthen import lm as sl_lm
from lmx.methods.self_lengthen import seeds as seeds_lib
from lmx.train.lm import load_base as load_lm, stage_config
from lmx.models.registry import build_model
from lmx.models.transformer import num_params

CONFIG_FIELDS = ("method", "variant", "seed", "seeds", "mesh", "axis_rules", "base", "data", "bootstrap", "loop",
                 "sft", "sampling", "length_sft", "eval", "train")
BASE_FIELDS = ("steps", "corpus", "seq_len", "global_batch", "model", "optim")
DATA_FIELDS = ("max_topic_chars", "heldout_fraction", "max_chars", "draft_chars")
BOOT_FIELDS = ("gen_steps", "ext_steps", "max_examples", "lr")
LOOP_FIELDS = ("macro_iters", "n_prompts", "samples_per_prompt", "draft_retries", "ext_jobs", "ext_retries",
               "micro_iters", "min_gain", "line_keep", "drop_short", "flavour", "meta_talk")
SFT_FIELDS = ("batch", "epochs", "warmup_ratio", "optim")
SAMPLING_FIELDS = ("batch", "temperature", "top_k", "top_p", "prompt_buckets")
LSFT_FIELDS = ("min_words", "max_words", "epochs", "p_coarse", "coarse_unit", "fine_unit", "eval_buckets",
               "eval_topics")
EVAL_FIELDS = ("n_topics", "n_samples")
TRAIN_FIELDS = ("log_every", "eval_batches", "plot")
STEPS_FIELD = None
SAFE_TO_CHANGE = ("train.log_every", "train.plot", "mesh.*", "axis_rules", "base.model.attention_impl")


def validate(config):
  """Checks every field before anything is built; returns the built model (no parameters)."""
  check_keys(config, "config", CONFIG_FIELDS)
  for name, fields in (("base", BASE_FIELDS), ("data", DATA_FIELDS), ("bootstrap", BOOT_FIELDS),
                       ("loop", LOOP_FIELDS), ("sft", SFT_FIELDS), ("sampling", SAMPLING_FIELDS),
                       ("length_sft", LSFT_FIELDS), ("eval", EVAL_FIELDS), ("train", TRAIN_FIELDS)):
    check_keys(config[name], name, fields)
  b, d, lp, s, lf = config.base, config.data, config.loop, config.sampling, config.length_sft
  require(isinstance(b.steps, int) and b.steps >= 0, "base.steps", f"must be an integer >= 0, got {b.steps!r}")
  text_lib.check_corpus(b.corpus)
  for f in ("max_topic_chars", "max_chars", "draft_chars"):
    require(isinstance(d[f], int) and d[f] > 0, f"data.{f}", f"must be a positive integer, got {d[f]!r}")
  require(d.draft_chars <= d.max_chars, "data.draft_chars", f"must be <= data.max_chars={d.max_chars}")
  require(0 < d.heldout_fraction < 1, "data.heldout_fraction", f"must be in (0, 1), got {d.heldout_fraction!r}")
  require(isinstance(lp.macro_iters, int) and lp.macro_iters >= 1, "loop.macro_iters",
          f"must be an integer >= 1, got {lp.macro_iters!r}")
  for f in ("n_prompts", "samples_per_prompt", "ext_jobs", "micro_iters"):
    require(isinstance(lp[f], int) and lp[f] >= 1, f"loop.{f}", f"must be an integer >= 1, got {lp[f]!r}")
  for f in ("draft_retries", "ext_retries"):
    require(isinstance(lp[f], int) and lp[f] >= 0, f"loop.{f}", f"must be an integer >= 0, got {lp[f]!r}")
  require(lp.min_gain >= 1.0, "loop.min_gain", f"must be >= 1 (the paper: 1.2), got {lp.min_gain!r}")
  require(0 < lp.line_keep <= 1, "loop.line_keep", f"must be in (0, 1] (the paper: 0.8), got {lp.line_keep!r}")
  require(lp.flavour in F.FLAVOURS, "loop.flavour", f"must be one of {list(F.FLAVOURS)}, got {lp.flavour!r}")
  require(s.temperature > 0, "sampling.temperature", f"must be > 0, got {s.temperature!r}")
  require(0 < s.top_p <= 1, "sampling.top_p", f"must be in (0, 1], got {s.top_p!r}")
  require(len(s.prompt_buckets) >= 1, "sampling.prompt_buckets", "must list at least one prompt length")
  require(0 <= lf.min_words < lf.max_words, "length_sft.min_words", f"needs 0 <= min_words < max_words, got "
          f"{lf.min_words!r}, {lf.max_words!r}")
  require(all(len(bk) == 2 and 0 < bk[0] < bk[1] for bk in lf.eval_buckets), "length_sft.eval_buckets",
          f"must be (lo, hi) pairs with 0 < lo < hi, got {lf.eval_buckets!r}")
  seeds = list(config.seeds)
  require(len(seeds) > 0 and all(isinstance(x, int) and x >= 0 for x in seeds) and len(set(seeds)) == len(seeds),
          "seeds", f"must be distinct integers >= 0, got {seeds}")
  model = build_model(b.model, axis_rules=config.axis_rules)
  need = max(int(x) for x in s.prompt_buckets) + d.max_chars
  require(need <= model.cfg.max_seq_len, "base.model.max_seq_len",
          f"{model.cfg.max_seq_len} is shorter than the largest prompt bucket + data.max_chars = {need}")
  need = lengths_for(d, s.prompt_buckets)["ext"] - 1
  require(need <= model.cfg.max_seq_len, "base.model.max_seq_len",
          f"{model.cfg.max_seq_len} is shorter than the Extender's SFT input (smallest bucket + 2 x max_chars = "
          f"{need})")
  require(model.cfg.vocab_size >= text_lib.VOCAB_SIZE, "base.model.vocab_size",
          f"must be >= {text_lib.VOCAB_SIZE} (byte tokenizer)")
  return model


def lengths_for(d, buckets) -> dict:
  """The fixed SFT sequence lengths: Generator (the smallest prompt bucket + ``max_chars`` + EOS) and Extender
  (the smallest bucket + an outline and a response of ``max_chars`` each + EOS)."""
  b0 = int(sorted(buckets)[0])
  return {"gen": b0 + d.max_chars + 1, "ext": b0 + 2 * d.max_chars + 1}


# ------------------------------------------------------------------------------------------ data


def bootstrap_pairs(items, config, rng):
  """The roles' starting SFT sets from the seed items: Generator (topic → first paragraph, when it has at most
  ``data.draft_chars`` characters and passes the filters); Extender (topic + degraded text → text, the text cut
  to at most ``data.max_chars`` at a line boundary, at least two lines)."""
  d, lp = config.data, config.loop
  gen, ext = [], []
  for topic, body in items:
    first = body.split("\n\n")[0]
    if len(first) <= d.draft_chars and F.check_response(first, lp.flavour, meta_talk=lp.meta_talk):
      gen.append((sl_lm.gen_prompt(topic), first))
    lines, kept = body.split("\n"), []
    for ln in lines:
      if len("\n".join(kept + [ln])) > d.max_chars:
        break
      kept.append(ln)
    while kept and not kept[-1].strip():
      kept.pop()
    full = "\n".join(kept)
    if len(kept) >= 2 and F.check_response(full, lp.flavour, meta_talk=lp.meta_talk):
      ext.append((sl_lm.ext_prompt(topic, F.degrade_lines(full, rng, lp.line_keep)), full))
  m = config.bootstrap.max_examples
  return gen[:m], ext[:m]


def fits(s: str, n: int) -> bool:
  return len(text_lib.encode(s)) <= n


# ------------------------------------------------------------------------------------------ one seed


class Roles:
  """The Generator and Extender parameters with the shared sampler and SFT step."""

  def __init__(self, gen, ext):
    self.gen, self.ext = gen, ext


def draft(config, sampler, params, topics, key, rng) -> tuple[list, dict]:
  """Step 1: ``samples_per_prompt`` drafts per topic, those failing the filters (or not ending within
  ``max_chars``) redrawn up to ``draft_retries`` times; then ``drop_short``. Returns ([(topic, draft)], stats)."""
  lp = config.loop
  jobs = [t for t in topics for _ in range(lp.samples_per_prompt)]
  out: list = [None] * len(jobs)
  todo = list(range(len(jobs)))
  first_pass = None
  for attempt in range(lp.draft_retries + 1):
    if not todo:
      break
    texts, done = sampler(params, [sl_lm.encode_prompt(sl_lm.gen_prompt(jobs[i])) for i in todo],
                          jax.random.fold_in(key, attempt))
    ok = [bool(dn) and F.check_response(t, lp.flavour, meta_talk=lp.meta_talk) for t, dn in zip(texts, done)]
    if first_pass is None:
      first_pass = float(np.mean(ok))
    for i, t, k in zip(todo, texts, ok):
      if k:
        out[i] = t
    todo = [i for i, k in zip(todo, ok) if not k]
  pairs = [(jobs[i], out[i]) for i in range(len(jobs)) if out[i] is not None]
  n_ok = len(pairs)
  if lp.drop_short and pairs:
    pairs = [pairs[i] for i in F.drop_short([len(p[1]) for p in pairs], rng)]
  return pairs, {"jobs": len(jobs), "passed": n_ok, "first_try_pass_rate": first_pass, "kept": len(pairs),
                 "words_mean": float(np.mean([F.count_words(t) for _, t in pairs])) if pairs else 0.0}


def extend(config, sampler, params, drafts, key) -> tuple[list, list, dict]:
  """Step 2, batched over all jobs: ``ext_jobs`` per draft, each up to ``micro_iters`` two-stage
  micro-iterations; accepted when longer than ``min_gain``× the draft's words. Returns
  (accepted [(topic, draft, extended)], per-micro candidate stats, stats)."""
  lp, d = config.loop, config.data
  jobs = [(tp, dr) for tp, dr in drafts for _ in range(lp.ext_jobs)]
  result: list = [None] * len(jobs)
  todo = list(range(len(jobs)))
  micro_stats = []
  for attempt in range(lp.ext_retries + 1):
    if not todo:
      break
    cur = {i: jobs[i][1] for i in todo}
    for it in range(lp.micro_iters):
      k = jax.random.fold_in(jax.random.fold_in(key, attempt), it)
      # stage 1: enrich the first half
      p1 = [sl_lm.encode_prompt(sl_lm.ext_prompt(jobs[i][0], F.first_half(cur[i]))) for i in todo]
      out1, _ = sampler(params, p1, jax.random.fold_in(k, 1))
      kept = [F.keep_two_thirds(o) for o in out1]
      # stage 2: continue from the kept part, given the whole current text
      p2 = [sl_lm.encode_prompt(sl_lm.ext_prompt(jobs[i][0], cur[i])) + text_lib.encode(f).tolist()
            for i, f in zip(todo, kept)]
      out2, done2 = sampler(params, p2, jax.random.fold_in(k, 2))
      n_better = n_pass = n_fit = 0
      for i, f, l, dn in zip(todo, kept, out2, done2):
        cand = f + l
        fit = bool(dn) and fits(cand, d.max_chars)
        n_fit += fit
        passed = fit and F.check_response(cand, lp.flavour, meta_talk=lp.meta_talk)
        n_pass += passed
        if passed and F.count_words(cand) > F.count_words(cur[i]):
          cur[i] = cand
          n_better += 1
      micro_stats.append({"attempt": attempt, "micro": it, "candidates": len(todo), "fit": n_fit,
                          "passed_filters": n_pass, "longer": n_better})
    for i in todo:
      if cur[i] != jobs[i][1] and F.accept_extension(jobs[i][1], cur[i], min_gain=lp.min_gain):
        result[i] = cur[i]
    todo = [i for i in todo if result[i] is None]
  acc = [(jobs[i][0], jobs[i][1], result[i]) for i in range(len(jobs)) if result[i] is not None]
  n_acc = len(acc)
  return acc, micro_stats, {"jobs": len(jobs), "accepted": n_acc,
                            "acceptance_rate": n_acc / max(1, len(jobs))}


def drop_short_ext(config, acc, rng):
  if config.loop.drop_short and acc:
    acc = [acc[i] for i in F.drop_short([len(a[2]) for a in acc], rng)]
  return acc


def evaluate_lengths(config, sampler, params, topics, key) -> dict:
  """The Generator on held-out topics (``eval.n_samples`` each, one fixed key): word lengths and filter pass
  rates (punctuation, repetition, meta, all), the share that ended within ``max_chars`` (EOS), examples."""
  lp = config.loop
  jobs = [t for t in topics for _ in range(config.eval.n_samples)]
  texts, done = sampler(params, [sl_lm.encode_prompt(sl_lm.gen_prompt(t)) for t in jobs], key)
  det = [F.check_details(t, lp.flavour, meta_talk=lp.meta_talk) for t in texts]
  words = np.array([F.count_words(t) for t in texts], np.float64)
  fin = np.array([bool(dn) and x["ok"] for dn, x in zip(done, det)])  # ended (EOS) and passed every filter
  return {"words_mean": float(words.mean()), "words_median": float(np.median(words)),
          "finished_rate": float(fin.mean()),
          "words_mean_finished": float(words[fin].mean()) if fin.any() else float("nan"),
          "words_p90": float(np.quantile(words, 0.9)), "words": words.astype(int).tolist(),
          "chars_mean": float(np.mean([len(t) for t in texts])), "eos_rate": float(done.mean()),
          **{f"pass_{k}": float(np.mean([x[k] for x in det])) for k in ("punctuation", "repetition", "meta", "ok")},
          "examples": [{"topic": jobs[i], "text": texts[i]} for i in range(min(3, len(jobs)))]}


def length_eval_grid(config, topics):
  """Held-out (topic, constraint) cases: for every bucket (lo, hi): about (lo+hi)/2, range lo–hi, above lo,
  below hi, each on ``length_sft.eval_topics`` topics."""
  cases = []
  for lo, hi in config.length_sft.eval_buckets:
    for kind, x, h in (("about", (lo + hi) // 2, None), ("range", lo, hi), ("above", lo, None),
                       ("below", hi, None)):
      for t in topics[:config.length_sft.eval_topics]:
        cases.append({"topic": t, "kind": kind, "x": int(x), "hi": h, "text": F.render_constraint(kind, x, h),
                      "bucket": f"{lo}-{hi}"})
  return cases


def length_following(config, sampler, params, cases, key) -> dict:
  """The length-following score (:func:`.filters.length_following_score`) of ``params`` on ``cases``: overall,
  per constraint type and per bucket, with the mean generated words."""
  texts, _ = sampler(params, [sl_lm.encode_prompt(sl_lm.gen_prompt(c["topic"], c["text"])) for c in cases], key)
  scores = np.array([F.length_following_score(F.count_words(t), c["kind"], c["x"], c["hi"])
                     for t, c in zip(texts, cases)])
  words = np.array([F.count_words(t) for t in texts])
  out = {"overall": float(scores.mean()), "words_mean": float(words.mean())}
  for kind in F.CONSTRAINT_TYPES:
    sel = [i for i, c in enumerate(cases) if c["kind"] == kind]
    if sel:
      out[kind] = float(scores[sel].mean())
  for bk in sorted({c["bucket"] for c in cases}):
    sel = [i for i, c in enumerate(cases) if c["bucket"] == bk]
    out[f"bucket_{bk}"] = float(scores[sel].mean())
    out[f"words_{bk}"] = float(words[sel].mean())
  out["examples"] = [{"constraint": cases[i]["text"], "topic": cases[i]["topic"], "text": texts[i],
                      "words": int(words[i]), "score": float(scores[i])} for i in range(0, len(cases),
                                                                                  max(1, len(cases) // 4))][:4]
  return out


def run_seed(config, seed: int, *, model, base_params, train_items, held_topics, sampler, sft, lens, writer,
             log) -> dict:
  """One seed's whole pipeline (bootstrap, macro-iterations, length-following fine-tune)."""
  lp, sc = config.loop, config.sft
  t0 = time.time()
  rng = np_stream(seed, "self_lengthen_data")
  gen_boot, ext_boot = bootstrap_pairs(train_items, config, np_stream(seed, "bootstrap"))
  require(len(gen_boot) > 0 and len(ext_boot) > 0, "data.max_chars",
          f"leaves {len(gen_boot)} Generator / {len(ext_boot)} Extender bootstrap pairs; raise data.max_chars or "
          "data.draft_chars")
  bc = config.bootstrap
  gen, gi = sft.train(base_params, gen_boot, length=lens["gen"], epochs=bc.gen_steps * sc.batch / len(gen_boot),
                      rng=np_stream(seed, "sft", 0, 0), warmup_ratio=sc.warmup_ratio, lr=bc.lr)
  ext, ei = sft.train(base_params, ext_boot, length=lens["ext"], epochs=bc.ext_steps * sc.batch / len(ext_boot),
                      rng=np_stream(seed, "sft", 0, 1), warmup_ratio=sc.warmup_ratio, lr=bc.lr)
  log(f"seed {seed}: bootstrap Generator {gi['steps']} steps,  {gi['examples']} pairs, CE {gi['first_ce']:.3f}->{gi['last_ce']:.3f}; "
      f"Extender {ei['examples']} pairs, CE {ei['first_ce']:.3f}->{ei['last_ce']:.3f} ({time.time() - t0:.0f}s)")
  eval_topics = held_topics[:config.eval.n_topics]
  ekey = rng_stream(seed, "eval")
  evals = [evaluate_lengths(config, sampler, gen, eval_topics, ekey)]
  writer.scalars(0, {k: v for k, v in evals[0].items() if isinstance(v, float)}, prefix=f"s{seed}/eval/")
  log(f"seed {seed} iter 0: held-out words {evals[0]['words_mean']:.1f} (finished {evals[0]['finished_rate']:.2f}: "
      f"{evals[0]['words_mean_finished']:.1f}), repetition pass "
      f"{evals[0]['pass_repetition']:.2f}, all filters {evals[0]['pass_ok']:.2f}")
  iters, collected = [], []
  train_topics = [t for t, _ in train_items]
  for it in range(1, lp.macro_iters + 1):
    ti = time.time()
    topics = [train_topics[i] for i in np_stream(seed, "prompts", it).choice(len(train_topics), lp.n_prompts,
                                                                             replace=False)]
    drafts, dstat = draft(config, sampler, gen, topics, rng_stream(seed, "draft", it), rng)
    acc, micro, xstat = extend(config, sampler, ext, drafts, rng_stream(seed, "extend", it))
    n_acc = len(acc)
    acc = drop_short_ext(config, acc, rng)
    xstat["kept"] = len(acc)
    collected += [(tp, dr) for tp, dr in drafts] + [(tp, ex) for tp, _, ex in acc]
    if acc:
      xstat["draft_words_mean"] = float(np.mean([F.count_words(a[1]) for a in acc]))
      xstat["extended_words_mean"] = float(np.mean([F.count_words(a[2]) for a in acc]))
      gen_pairs = [(sl_lm.gen_prompt(tp), ex) for tp, _, ex in acc]
      ext_pairs = [(sl_lm.ext_prompt(tp, F.degrade_lines(dr, rng, lp.line_keep)), ex) for tp, dr, ex in acc]
      gen, gs = sft.train(gen, gen_pairs, length=lens["gen"], epochs=sc.epochs, rng=np_stream(seed, "sft", it, 0),
                          warmup_ratio=sc.warmup_ratio)
      ext, es = sft.train(ext, ext_pairs, length=lens["ext"], epochs=sc.epochs, rng=np_stream(seed, "sft", it, 1),
                          warmup_ratio=sc.warmup_ratio)
    else:
      gs = es = None
    ev = evaluate_lengths(config, sampler, gen, eval_topics, ekey)
    evals.append(ev)
    writer.scalars(it, {k: v for k, v in ev.items() if isinstance(v, float)}, prefix=f"s{seed}/eval/")
    ex = acc[0] if acc else None
    iters.append({"iter": it, "drafts": dstat, "extension": xstat, "micro": micro, "gen_sft": gs, "ext_sft": es,
                  "accepted_before_drop_short": n_acc, "seconds": time.time() - ti,
                  "example": {"topic": ex[0], "draft": ex[1], "extended": ex[2]} if ex else None})
    log(f"seed {seed} iter {it}: drafts {dstat['kept']}/{dstat['jobs']} ({dstat['words_mean']:.1f} words), "
        f"extensions accepted {n_acc}/{xstat['jobs']} kept {len(acc)} "
        f"({xstat.get('draft_words_mean', 0):.1f}->{xstat.get('extended_words_mean', 0):.1f} words); held-out "
        f"words {ev['words_mean']:.1f} (finished {ev['finished_rate']:.2f}: {ev['words_mean_finished']:.1f}), repetition pass {ev['pass_repetition']:.2f}, all {ev['pass_ok']:.2f} "
        f"({time.time() - ti:.0f}s)")

  # the length-following fine-tune
  lf = config.length_sft
  crng = np_stream(seed, "constraints")
  lf_pairs = []
  for tp, resp in collected:
    w = F.count_words(resp)
    if lf.min_words <= w < lf.max_words:
      c = F.sample_length_constraint(w, crng, lo=lf.min_words, hi=lf.max_words, coarse_unit=lf.coarse_unit,
                                     fine_unit=lf.fine_unit, p_coarse=lf.p_coarse)
      lf_pairs.append((sl_lm.gen_prompt(tp, c["text"]), resp))
  cases = length_eval_grid(config, held_topics)
  lkey = rng_stream(seed, "length_eval")
  before = length_following(config, sampler, gen, cases, lkey)
  if lf_pairs:
    gen_lf, lfs = sft.train(gen, lf_pairs, length=lens["gen"], epochs=lf.epochs, rng=np_stream(seed, "sft", 99),
                            warmup_ratio=sc.warmup_ratio)
    after = length_following(config, sampler, gen_lf, cases, lkey)
  else:
    lfs, after = None, None
  log(f"seed {seed}: length following {before['overall']:.3f} -> "
      f"{after['overall'] if after else float('nan'):.3f} ({len(lf_pairs)} constrained pairs)")
  w0, wl = evals[0]["words_mean"], evals[-1]["words_mean"]
  f0, fl = evals[0]["words_mean_finished"], evals[-1]["words_mean_finished"]
  return {"seed": seed, "bootstrap": {"gen": gi, "ext": ei, "gen_pairs": len(gen_boot), "ext_pairs": len(ext_boot)},
          "evals": evals, "iters": iters, "length_ratio": wl / max(w0, 1e-9),
          "length_ratio_finished": fl / f0 if np.isfinite(f0) and np.isfinite(fl) else None,
          "length_sft": {"pairs": len(lf_pairs), "train": lfs, "before": before, "after": after},
          "wall_seconds": time.time() - t0}


# ------------------------------------------------------------------------------------------ the run


def base_lm_config(config):
  b = config.base
  return stage_config(config, variant="self_lengthen_base", model=b.model, optim=b.optim,
                      data=dict(corpus=b.corpus, seq_len=b.seq_len, global_batch=b.global_batch, eval_fraction=0.05,
                                split="document", split_seed=0, shuffle_seed=int(config.seed), worker_count=0),
                      steps=b.steps, seed=config.seed)


def load_base(config, workdir, model, mesh):
  if config.base.steps == 0:
    return jax.jit(model.init)(rng_stream(config.seed, "base_init")), {"source": "random init"}
  _, params, info = load_lm("pretrain", mesh=mesh, axis_rules=config.axis_rules, stage=base_lm_config(config),
                            workdir=os.path.join(workdir, "base"))
  return params, info


def _ms(xs):
  xs = np.asarray([x for x in xs if x is not None and np.isfinite(x)], np.float64)
  if not len(xs):
    return {"mean": None, "std": None, "n": 0}
  return {"mean": float(xs.mean()), "std": float(xs.std(ddof=1)) if len(xs) > 1 else 0.0, "n": int(len(xs)),
          "values": xs.tolist()}


def summarize(per_seed: list[dict], macro_iters: int) -> dict:
  """Mean ± std (ddof 1) over seeds of every per-iteration number and the length-following scores."""
  s = {"iters": []}
  for i in range(macro_iters + 1):
    row = {"iter": i}
    for k in ("words_mean", "words_median", "words_mean_finished", "finished_rate", "eos_rate", "pass_punctuation", "pass_repetition", "pass_meta",
              "pass_ok"):
      row[k] = _ms([r["evals"][i][k] for r in per_seed])
    if i > 0:
      it = [r["iters"][i - 1] for r in per_seed]
      row["draft_first_try_pass_rate"] = _ms([x["drafts"]["first_try_pass_rate"] for x in it])
      row["acceptance_rate"] = _ms([x["extension"]["acceptance_rate"] for x in it])
      row["extended_words_mean"] = _ms([x["extension"].get("extended_words_mean") for x in it])
      row["draft_words_mean"] = _ms([x["extension"].get("draft_words_mean") for x in it])
    s["iters"].append(row)
  s["length_ratio"] = _ms([r["length_ratio"] for r in per_seed])
  s["length_ratio_finished"] = _ms([r.get("length_ratio_finished") for r in per_seed])
  for when in ("before", "after"):
    s[f"length_following_{when}"] = {k: _ms([(r["length_sft"][when] or {}).get(k) for r in per_seed])
                                     for k in ("overall",) + F.CONSTRAINT_TYPES}
  return s


def plot_all(workdir, per_seed, macro_iters):
  import matplotlib.pyplot as plt

  xs = np.arange(macro_iters + 1)
  series, bands = {}, {}
  for key, label in (("words_mean", "mean words (held-out)"),):
    v = np.array([[r["evals"][i][key] for i in xs] for r in per_seed])
    series[label] = (xs, v.mean(0))
    bands[label] = v.std(0)
  paths = [plots.curves(plot_path(workdir, "length"), series, bands=bands, xlabel="macro-iteration",
                        ylabel="words", title=f"Generator output length, {len(per_seed)} seed(s)")]
  series, bands = {}, {}
  for key in ("pass_repetition", "pass_punctuation", "pass_ok", "eos_rate"):
    v = np.array([[r["evals"][i][key] for i in xs] for r in per_seed])
    series[key], bands[key] = (xs, v.mean(0)), v.std(0)
  paths.append(plots.curves(plot_path(workdir, "filters"), series, bands=bands, xlabel="macro-iteration",
                            ylabel="fraction", title="filter pass rates of held-out outputs"))
  fig, ax = plt.subplots(figsize=(6, 4))
  for i in xs:
    w = np.concatenate([r["evals"][i]["words"] for r in per_seed])
    ax.hist(w, bins=np.arange(0, max(40, w.max() + 2)), histtype="step", label=f"iter {i}", density=True)
  ax.set(xlabel="words", ylabel="density", title="distribution of output length (all seeds)")
  ax.legend()
  paths.append(plots.save_figure(fig, plot_path(workdir, "length_hist")))
  fig, ax = plt.subplots(figsize=(6, 4))
  kinds = ("overall",) + F.CONSTRAINT_TYPES
  for j, when in enumerate(("before", "after")):
    vals = [[(r["length_sft"][when] or {}).get(k, np.nan) for r in per_seed] for k in kinds]
    ax.bar(np.arange(len(kinds)) + 0.4 * j, [np.nanmean(v) for v in vals], 0.4,
           yerr=[np.nanstd(v) for v in vals], label=when)
  ax.set_xticks(np.arange(len(kinds)) + 0.2, kinds)
  ax.set(ylabel="length-following score", title="before / after the length-following fine-tune")
  ax.legend()
  paths.append(plots.save_figure(fig, plot_path(workdir, "length_following")))
  return paths


def run(config, workdir: str) -> dict:
  model = validate(config)
  t_start = time.time()
  mesh = mesh_lib.make_mesh(config.mesh)
  os.makedirs(workdir, exist_ok=True)
  d, s = config.data, config.sampling
  train_items, held_items = seeds_lib.seed_sets(max_topic_chars=d.max_topic_chars,
                                                heldout_fraction=d.heldout_fraction)
  held_topics = [t for t, _ in held_items]
  held_topics = [held_topics[i] for i in np_stream(config.seed, "heldout_order").permutation(len(held_topics))]
  require(len(train_items) >= config.loop.n_prompts, "loop.n_prompts",
          f"{config.loop.n_prompts} exceeds the {len(train_items)} train topics")
  require(len(held_topics) >= config.eval.n_topics, "eval.n_topics",
          f"{config.eval.n_topics} exceeds the {len(held_topics)} held-out topics")
  t0 = time.time()
  base_params, base_info = load_base(config, workdir, model, mesh)
  base_info["seconds"] = time.time() - t0
  lens = lengths_for(d, s.prompt_buckets)
  sampler = sl_lm.Sampler(model, batch=s.batch, prompt_buckets=tuple(s.prompt_buckets), max_new_tokens=d.max_chars,
                          temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
  sft = sl_lm.SFT(model, config.sft.optim, batch=config.sft.batch)
  writer = Writer(workdir, total_steps=config.loop.macro_iters)
  n_params = num_params(model.abstract_params())
  print(f"self_lengthen: {n_params:,} params; base {base_info['source']} ({base_info['seconds']:.0f}s); "
        f"{len(train_items)} train / {len(held_topics)} held-out topics; seeds {list(config.seeds)}; workdir "
        f"{workdir}", flush=True)
  per_seed = []
  try:
    for seed in config.seeds:
      per_seed.append(run_seed(config, seed, model=model, base_params=base_params, train_items=train_items,
                               held_topics=held_topics, sampler=sampler, sft=sft, lens=lens, writer=writer,
                               log=lambda m: print(m, flush=True)))
  finally:
    writer.close()
  summary = summarize(per_seed, config.loop.macro_iters)
  results = {"method": "self_lengthen", "variant": config.variant, "params": n_params, "seeds": list(config.seeds),
             "base": base_info, "topics": {"train": len(train_items), "heldout": len(held_topics)},
             "sequence_lengths": lens, "summary": summary, "per_seed": per_seed,
             "wall_seconds": time.time() - t_start}
  path = write_results(workdir, results)
  if jax.process_index() == 0 and config.train.plot:
    plot_all(workdir, per_seed, config.loop.macro_iters)
  last = summary["iters"][-1]
  summary_line("self_lengthen", {
      "length ratio": summary["length_ratio"]["mean"], "repetition pass": last["pass_repetition"]["mean"],
      "LF before": summary["length_following_before"]["overall"]["mean"],
      "LF after": summary["length_following_after"]["overall"]["mean"]}, path)
  return results
