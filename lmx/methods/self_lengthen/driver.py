"""Self-Lengthen driver (Quan et al. 2024, arXiv 2410.23933; QwenLM/Self-Lengthen) in miniature.

The method (see ``configs/self_lengthen.py``):
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
  6. mean ± sample std over seeds, plots, results.json (rewritten after every seed).

The run's stages (:mod:`lmx.core.stages`; a rerun skips finished ones and resumes the interrupted one):
``s<seed>`` for every seed (a sweep), each made of ``s<seed>/boot_gen``, ``s<seed>/boot_ext`` (SFT),
``s<seed>/it0/eval``, then for every macro-iteration ``i``: ``s<seed>/it<i>/draft``, ``.../extend`` (sampling),
``.../filter``, ``.../gen_sft``, ``.../ext_sft`` (SFT, when something was accepted), ``.../eval``; then
``s<seed>/lf/before``, ``s<seed>/lf/sft``, ``s<seed>/lf/after``. SFT stages train on :mod:`lmx.core.loop` with
checkpoints in ``checkpoints/<stage>``; all stages log to the one ``Writer`` of the workdir.
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np

from lmx.core import mesh as mesh_lib, plots, schema, stages
from lmx.core.config import require
from lmx.core.metrics import Writer, progress
from lmx.core.results import plot_path, summary_line, write_results
from lmx.core.rng import np_stream, rng_stream
from lmx.datasets import text as text_lib
from lmx.methods.self_lengthen import filters as F
from lmx.methods.self_lengthen import lm as sl_lm
from lmx.methods.self_lengthen import seeds as seeds_lib
from lmx.train.lm import load_base as load_lm, stage_config
from lmx.models.registry import build_model
from lmx.models.transformer import num_params

STEPS_FIELD = None


def validate(config):
  """Checks the config before anything is built: its fields against ``configs/self_lengthen.py``'s declarations,
  then what relates fields (the corpus, distinct seeds, lengths against each other and against the built model's,
  the byte vocabulary). Returns the built model (no parameters)."""
  schema.validate(config)
  b, d, s, lf = config.base, config.data, config.sampling, config.length_sft
  text_lib.check_corpus(b.corpus)
  require(d.draft_chars <= d.max_chars, "data.draft_chars", f"must be <= data.max_chars={d.max_chars}")
  require(lf.min_words < lf.max_words, "length_sft.min_words", f"needs 0 <= min_words < max_words, got "
          f"{lf.min_words!r}, {lf.max_words!r}")
  require(all(len(bk) == 2 and 0 < bk[0] < bk[1] for bk in lf.eval_buckets), "length_sft.eval_buckets",
          f"must be (lo, hi) pairs with 0 < lo < hi, got {lf.eval_buckets!r}")
  seeds = list(config.seeds)
  require(len(set(seeds)) == len(seeds), "seeds", f"must be distinct integers >= 0, got {seeds}")
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


def _grow(bar, rows: int) -> None:
  """Adds ``rows`` to a progress bar's total (a stage whose retries add work as it goes)."""
  if bar is not None:
    bar.total = (bar.total or 0) + rows
    bar.refresh()


def draft(config, sampler, params, topics, key, rng, *, bar=None) -> tuple[list, dict]:
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
    _grow(bar, len(todo))
    texts, done = sampler(params, [sl_lm.encode_prompt(sl_lm.gen_prompt(jobs[i])) for i in todo],
                          jax.random.fold_in(key, attempt), bar=bar)
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


def extend(config, sampler, params, drafts, key, *, bar=None) -> tuple[list, list, dict]:
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
    _grow(bar, 2 * lp.micro_iters * len(todo))
    for it in range(lp.micro_iters):
      k = jax.random.fold_in(jax.random.fold_in(key, attempt), it)
      # stage 1: enrich the first half
      p1 = [sl_lm.encode_prompt(sl_lm.ext_prompt(jobs[i][0], F.first_half(cur[i]))) for i in todo]
      out1, _ = sampler(params, p1, jax.random.fold_in(k, 1), bar=bar)
      kept = [F.keep_two_thirds(o) for o in out1]
      # stage 2: continue from the kept part, given the whole current text
      p2 = [sl_lm.encode_prompt(sl_lm.ext_prompt(jobs[i][0], cur[i])) + text_lib.encode(f).tolist()
            for i, f in zip(todo, kept)]
      out2, done2 = sampler(params, p2, jax.random.fold_in(k, 2), bar=bar)
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


def filter_accepted(config, acc, *, drop_rng, degrade_rng) -> dict:
  """``drop_short`` over the accepted extensions, then the macro-iteration's SFT pairs: the Generator's
  (topic → extended) and the Extender's (topic + the draft with each line kept w.p. ``loop.line_keep`` →
  extended)."""
  lp = config.loop
  if lp.drop_short and acc:
    acc = [acc[i] for i in F.drop_short([len(a[2]) for a in acc], drop_rng)]
  return {"kept": acc, "gen_pairs": [(sl_lm.gen_prompt(tp), ex) for tp, _, ex in acc],
          "ext_pairs": [(sl_lm.ext_prompt(tp, F.degrade_lines(dr, degrade_rng, lp.line_keep)), ex)
                        for tp, dr, ex in acc]}


def evaluate_lengths(config, sampler, params, topics, key, *, bar=None) -> dict:
  """The Generator on held-out topics (``eval.n_samples`` each, one fixed key): word lengths and filter pass
  rates (punctuation, repetition, meta, all), the share that ended within ``max_chars`` (EOS), examples."""
  lp = config.loop
  jobs = [t for t in topics for _ in range(config.eval.n_samples)]
  _grow(bar, len(jobs))
  texts, done = sampler(params, [sl_lm.encode_prompt(sl_lm.gen_prompt(t)) for t in jobs], key, bar=bar)
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


def length_following(config, sampler, params, cases, key, *, bar=None) -> dict:
  """The length-following score (:func:`.filters.length_following_score`) of ``params`` on ``cases``: overall,
  per constraint type and per bucket, with the mean generated words."""
  _grow(bar, len(cases))
  texts, _ = sampler(params, [sl_lm.encode_prompt(sl_lm.gen_prompt(c["topic"], c["text"])) for c in cases], key,
                     bar=bar)
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


def constrained_pairs(config, collected, rng) -> list:
  """The length-following SFT set: every (topic, response) of ``collected`` with ``min_words <= words <
  max_words``, its Generator prompt given a constraint drawn by :func:`.filters.sample_length_constraint`."""
  lf = config.length_sft
  pairs = []
  for tp, resp in collected:
    w = F.count_words(resp)
    if lf.min_words <= w < lf.max_words:
      c = F.sample_length_constraint(w, rng, lo=lf.min_words, hi=lf.max_words, coarse_unit=lf.coarse_unit,
                                     fine_unit=lf.fine_unit, p_coarse=lf.p_coarse)
      pairs.append((sl_lm.gen_prompt(tp, c["text"]), resp))
  return pairs


class Pipeline:
  """One seed's stages on the shared pieces of a run (model, sampler, writer, base parameters, topics).

  Every stage is :func:`lmx.core.stages.run_stage` of the workdir, named ``s<seed>/...``: an SFT stage trains on
  the loop (:func:`.lm.train_sft`) and outputs the fine-tuned parameters (as the leaves of the model's
  parameter tree) and its statistics; a sampling stage outputs the texts it kept and its statistics. A rerun
  reads finished stages back and resumes the interrupted one.
  """

  def __init__(self, config, workdir, *, model, base_params, train_items, held_topics, sampler, writer, lens):
    self.config, self.workdir, self.model, self.sampler, self.writer = config, workdir, model, sampler, writer
    self.base_params, self.train_items, self.held_topics, self.lens = base_params, train_items, held_topics, lens
    self.treedef = jax.tree.structure(model.abstract_params())

  def stage(self, name: str, fn):
    return stages.run_stage(self.workdir, name, fn, quiet=True)

  def sampling(self, name: str, fn):
    """A sampling stage: ``fn(bar)`` with a progress bar named after the stage."""
    def go():
      with progress(0, desc=name) as bar:
        return fn(bar)

    return self.stage(name, go)

  def sft(self, name: str, seed: int, params, pairs, *, role: str, steps: int, lr: float | None = None):
    """``(params, stats)`` of the SFT stage ``name`` (``role``: ``gen`` or ``ext``, which sets the sequence
    length)."""
    sc = self.config.sft

    def fn():
      p, stats = sl_lm.train_sft(self.workdir, name, model=self.model, params=params, pairs=pairs,
                                 length=self.lens[role], steps=steps, optim_cfg=sc.optim,
                                 warmup_ratio=sc.warmup_ratio, batch=sc.batch, seed=seed, writer=self.writer, lr=lr)
      return {"params": jax.tree.leaves(p), "stats": stats}

    out = self.stage(name, fn)
    return jax.tree.unflatten(self.treedef, out["params"]), out["stats"]

  def evaluate(self, name: str, seed: int, params, it: int) -> dict:
    """The held-out length evaluation after macro-iteration ``it``, logged under ``s<seed>/eval/``."""
    topics = self.held_topics[:self.config.eval.n_topics]

    def fn(bar):
      ev = evaluate_lengths(self.config, self.sampler, params, topics, rng_stream(seed, "eval"), bar=bar)
      self.writer.scalars(it, {k: v for k, v in ev.items() if isinstance(v, float)}, prefix=f"s{seed}/eval/")
      return ev

    return self.sampling(name, fn)

  def run_seed(self, seed: int) -> dict:
    """One seed's pipeline: bootstrap SFTs → macro-iterations (drafts, extensions, filters, Generator SFT,
    Extender SFT, evaluation) → length-following SFT and its evaluation."""
    config, log = self.config, lambda m: print(m, flush=True)
    lp, sc, bc, lf = config.loop, config.sft, config.bootstrap, config.length_sft
    t0 = time.time()
    gen_boot, ext_boot = bootstrap_pairs(self.train_items, config, np_stream(seed, "bootstrap"))
    require(len(gen_boot) > 0 and len(ext_boot) > 0, "data.max_chars",
            f"leaves {len(gen_boot)} Generator / {len(ext_boot)} Extender bootstrap pairs; raise data.max_chars or "
            "data.draft_chars")
    gen, gi = self.sft(f"s{seed}/boot_gen", seed, self.base_params, gen_boot, role="gen", steps=bc.gen_steps,
                       lr=bc.lr)
    ext, ei = self.sft(f"s{seed}/boot_ext", seed, self.base_params, ext_boot, role="ext", steps=bc.ext_steps,
                       lr=bc.lr)
    log(f"seed {seed} bootstrap: Generator {gi['examples']} pairs, {gi['steps']} steps, CE {gi['first_ce']:.3f} → "
        f"{gi['last_ce']:.3f}; Extender {ei['examples']} pairs, {ei['steps']} steps, CE {ei['first_ce']:.3f} → "
        f"{ei['last_ce']:.3f}")
    evals = [self.evaluate(f"s{seed}/it0/eval", seed, gen, 0)]
    log(f"seed {seed} iter 0: held-out words {evals[0]['words_mean']:.1f}, finished "
        f"{evals[0]['finished_rate']:.2f}, repetition pass {evals[0]['pass_repetition']:.2f}, all filters "
        f"{evals[0]['pass_ok']:.2f}")
    iters, collected = [], []
    train_topics = [t for t, _ in self.train_items]
    for it in range(1, lp.macro_iters + 1):
      ti, pre = time.time(), f"s{seed}/it{it}"
      topics = [train_topics[i] for i in np_stream(seed, "prompts", it).choice(len(train_topics), lp.n_prompts,
                                                                               replace=False)]
      d = self.sampling(f"{pre}/draft", lambda bar: dict(zip(("pairs", "stats"), draft(
          config, self.sampler, gen, topics, rng_stream(seed, "draft", it), np_stream(seed, "drop_short_drafts", it),
          bar=bar))))
      x = self.sampling(f"{pre}/extend", lambda bar: dict(zip(("accepted", "micro", "stats"), extend(
          config, self.sampler, ext, d["pairs"], rng_stream(seed, "extend", it), bar=bar))))
      f = self.stage(f"{pre}/filter", lambda: filter_accepted(
          config, x["accepted"], drop_rng=np_stream(seed, "drop_short_extended", it),
          degrade_rng=np_stream(seed, "degrade", it)))
      acc = f["kept"]
      xstat = {**x["stats"], "kept": len(acc)}
      collected += list(d["pairs"]) + [(tp, ex) for tp, _, ex in acc]
      gs = es = None
      if acc:
        xstat["draft_words_mean"] = float(np.mean([F.count_words(a[1]) for a in acc]))
        xstat["extended_words_mean"] = float(np.mean([F.count_words(a[2]) for a in acc]))
        steps = sl_lm.sft_steps(len(acc), sc.batch, sc.epochs)
        gen, gs = self.sft(f"{pre}/gen_sft", seed, gen, f["gen_pairs"], role="gen", steps=steps)
        ext, es = self.sft(f"{pre}/ext_sft", seed, ext, f["ext_pairs"], role="ext", steps=steps)
      ev = self.evaluate(f"{pre}/eval", seed, gen, it)
      evals.append(ev)
      ex = acc[0] if acc else None
      iters.append({"iter": it, "drafts": d["stats"], "extension": xstat, "micro": x["micro"], "gen_sft": gs,
                    "ext_sft": es, "accepted_before_drop_short": len(x["accepted"]), "wall_s": time.time() - ti,
                    "example": {"topic": ex[0], "draft": ex[1], "extended": ex[2]} if ex else None})
      ds = d["stats"]
      log(f"seed {seed} iter {it}: drafts kept {ds['kept']}/{ds['jobs']} ({ds['words_mean']:.1f} words); "
          f"extensions accepted {len(x['accepted'])}/{xstat['jobs']}, kept {len(acc)} "
          f"({xstat.get('draft_words_mean', 0):.1f} → {xstat.get('extended_words_mean', 0):.1f} words); held-out "
          f"words {ev['words_mean']:.1f}, finished {ev['finished_rate']:.2f}, repetition pass "
          f"{ev['pass_repetition']:.2f}, all filters {ev['pass_ok']:.2f}")

    # the length-following fine-tune and the final evaluation
    lf_pairs = constrained_pairs(config, collected, np_stream(seed, "constraints"))
    cases = length_eval_grid(config, self.held_topics)
    lkey = rng_stream(seed, "length_eval")
    before = self.sampling(f"s{seed}/lf/before",
                           lambda bar: length_following(config, self.sampler, gen, cases, lkey, bar=bar))
    lfs = after = None
    if lf_pairs:
      gen_lf, lfs = self.sft(f"s{seed}/lf/sft", seed, gen, lf_pairs, role="gen",
                             steps=sl_lm.sft_steps(len(lf_pairs), sc.batch, lf.epochs))
      after = self.sampling(f"s{seed}/lf/after",
                            lambda bar: length_following(config, self.sampler, gen_lf, cases, lkey, bar=bar))
    log(f"seed {seed}: length following {before['overall']:.3f} → "
        f"{'n/a' if after is None else format(after['overall'], '.3f')} ({len(lf_pairs)} constrained pairs)")
    w0, wl = evals[0]["words_mean"], evals[-1]["words_mean"]
    f0, fl = evals[0]["words_mean_finished"], evals[-1]["words_mean_finished"]
    return {"seed": seed, "bootstrap": {"gen": gi, "ext": ei, "gen_pairs": len(gen_boot),
                                        "ext_pairs": len(ext_boot)},
            "evals": evals, "iters": iters, "length_ratio": wl / max(w0, 1e-9),
            "length_ratio_finished": fl / f0 if np.isfinite(f0) and np.isfinite(fl) else None,
            "length_sft": {"pairs": len(lf_pairs), "train": lfs, "before": before, "after": after},
            "wall_s": time.time() - t0}


# ------------------------------------------------------------------------------------------ the run


def base_lm_config(config):
  b = config.base
  return stage_config(config, variant="self_lengthen_base", model=b.model, optim=b.optim,
                      data=dict(corpus=b.corpus, seq_len=b.seq_len, global_batch=b.global_batch, eval_fraction=0.05,
                                split="document", split_seed=0, shuffle_seed=int(config.seed), worker_count=0),
                      steps=b.steps, seed=config.seed)


def load_base(config, workdir, model, mesh):
  """``(params as host arrays, info)``: the ``lm`` pretraining in ``<workdir>/base`` (reused when finished), or
  the random initialisation when ``base.steps=0``."""
  if config.base.steps == 0:
    _, params, info = load_lm("init", mesh=mesh, axis_rules=config.axis_rules, model=model, seed=config.seed,
                              name="base_init")
  else:
    _, params, info = load_lm("pretrain", mesh=mesh, axis_rules=config.axis_rules, stage=base_lm_config(config),
                              workdir=os.path.join(workdir, "base"))
    info["workdir"] = "base"  # relative to the run's workdir
  return jax.device_get(params), info


def summarize(per_seed: list[dict], macro_iters: int) -> dict:
  """Mean ± sample std (:func:`lmx.core.stages.mean_std`, n stated) over seeds of every per-iteration number and
  the length-following scores."""
  ms = stages.mean_std
  s = {"iters": []}
  for i in range(macro_iters + 1):
    row = {"iter": i}
    for k in ("words_mean", "words_median", "words_mean_finished", "finished_rate", "eos_rate", "pass_punctuation",
              "pass_repetition", "pass_meta", "pass_ok"):
      row[k] = ms([r["evals"][i][k] for r in per_seed])
    if i > 0:
      it = [r["iters"][i - 1] for r in per_seed]
      row["draft_first_try_pass_rate"] = ms([x["drafts"]["first_try_pass_rate"] for x in it])
      row["acceptance_rate"] = ms([x["extension"]["acceptance_rate"] for x in it])
      row["extended_words_mean"] = ms([x["extension"].get("extended_words_mean") for x in it])
      row["draft_words_mean"] = ms([x["extension"].get("draft_words_mean") for x in it])
    s["iters"].append(row)
  s["length_ratio"] = ms([r["length_ratio"] for r in per_seed])
  s["length_ratio_finished"] = ms([r.get("length_ratio_finished") for r in per_seed])
  for when in ("before", "after"):
    s[f"length_following_{when}"] = {k: ms([(r["length_sft"][when] or {}).get(k) for r in per_seed])
                                     for k in ("overall",) + F.CONSTRAINT_TYPES}
  return s


def _mean_band(values) -> tuple[float, float]:
  """Mean and sample std (0 when undefined, n < 2) of ``values`` for a plot."""
  m = stages.mean_std(values)
  return (np.nan if m["mean"] is None else m["mean"]), (m["std"] or 0.0)


def plot_all(workdir, per_seed, macro_iters):
  """The run's plots (mean ± sample std over seeds); returns their paths."""
  import matplotlib.pyplot as plt

  xs = np.arange(macro_iters + 1)

  def curve(key):
    mb = np.array([_mean_band([r["evals"][i][key] for r in per_seed]) for i in xs])
    return (xs, mb[:, 0]), mb[:, 1]

  (c, b) = curve("words_mean")
  paths = [plots.curves(plot_path(workdir, "length"), {"mean words (held-out)": c},
                        bands={"mean words (held-out)": b}, xlabel="macro-iteration", ylabel="words",
                        title=f"Generator output length, {len(per_seed)} seed(s)")]
  series, bands = {}, {}
  for key in ("pass_repetition", "pass_punctuation", "pass_ok", "eos_rate"):
    series[key], bands[key] = curve(key)
  paths.append(plots.curves(plot_path(workdir, "filters"), series, bands=bands, xlabel="macro-iteration",
                            ylabel="fraction", title="filter pass rates of held-out outputs"))
  fig, ax = plt.subplots(figsize=(6, 4))
  for i in xs:
    w = np.concatenate([np.asarray(r["evals"][i]["words"]) for r in per_seed])
    ax.hist(w, bins=np.arange(0, max(40, w.max() + 2)), histtype="step", label=f"iter {i}", density=True)
  ax.set(xlabel="words", ylabel="density", title="distribution of output length (all seeds)")
  ax.legend()
  paths.append(plots.save_figure(fig, plot_path(workdir, "length_hist")))
  fig, ax = plt.subplots(figsize=(6, 4))
  kinds = ("overall",) + F.CONSTRAINT_TYPES
  for j, when in enumerate(("before", "after")):
    mb = np.array([_mean_band([(r["length_sft"][when] or {}).get(k) for r in per_seed]) for k in kinds])
    ax.bar(np.arange(len(kinds)) + 0.4 * j, mb[:, 0], 0.4, yerr=mb[:, 1], label=when)
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
  lens = lengths_for(d, s.prompt_buckets)
  n_params = num_params(model.abstract_params())
  writer = Writer(workdir)
  try:
    t0 = time.time()
    base_params, base_info = load_base(config, workdir, model, mesh)
    base_info["wall_s"] = time.time() - t0
    sampler = sl_lm.Sampler(model, batch=s.batch, prompt_buckets=tuple(s.prompt_buckets),
                            max_new_tokens=d.max_chars, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    pipe = Pipeline(config, workdir, model=model, base_params=base_params, train_items=train_items,
                    held_topics=held_topics, sampler=sampler, writer=writer, lens=lens)
    print(f"self_lengthen: {n_params:,} params; base: {base_info['source']}; {len(train_items)} train / "
          f"{len(held_topics)} held-out topics; seeds {list(config.seeds)}; workdir {workdir}", flush=True)

    def results(done: dict) -> dict:
      per_seed = [done[k] for k in config.seeds if k in done]
      return {"method": "self_lengthen", "variant": config.variant, "params": n_params,
              "seeds": list(config.seeds), "base": base_info,
              "topics": {"train": len(train_items), "heldout": len(held_topics)}, "sequence_lengths": lens,
              "summary": summarize(per_seed, config.loop.macro_iters), "per_seed": per_seed,
              "wall_s": time.time() - t_start}

    done = stages.sweep(workdir, list(config.seeds), pipe.run_seed, summarize=results)
    out = results(done)
    if jax.process_index() == 0 and config.train.plot:
      for path in plot_all(workdir, out["per_seed"], config.loop.macro_iters):
        writer.image(f"plots/{os.path.splitext(os.path.basename(path))[0]}", path)
  finally:
    writer.close()
  path = write_results(workdir, out)
  sm, last = out["summary"], out["summary"]["iters"][-1]
  fmt = stages.fmt_mean_std
  summary_line("self_lengthen", {
      "length ratio": fmt(sm["length_ratio"]), "repetition pass": fmt(last["pass_repetition"]),
      "LF before": fmt(sm["length_following_before"]["overall"]),
      "LF after": fmt(sm["length_following_after"]["overall"])}, path)
  return out
