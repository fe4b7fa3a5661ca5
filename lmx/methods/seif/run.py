"""SEIF's driver: SFT warm starts, then alternating Instructor / Follower GRPO rounds, per variant and seed.

Per seed (paired across variants: the same warm-started Follower F0 and Instructor I0, the same held-out set):
  0. SFT: the Follower on rule-written compliant answers to instructions of ``sft.follower_max_constraints``
     or fewer constraints; the Instructor on random constraint sets (1..``instructor.max_constraints``, not
     filtered) written in the text form of :mod:`lmx.envs.instructions`.
  1. For each variant and round T = 1..R:
     a. Instructor I_T (variants ``seif``, ``no_filter``): GRPO from I_{T−1}; reward 0 if unparsable, 0 if the
        Filter rejects (``seif`` only), else 1 − adherence of the frozen F_{T−1}'s greedy answer.
     b. q_T: I_T samples constraints for the training questions at ``rounds.gen_temperature`` (0.7); the
        parsable ones are kept (``random``: uniformly random sets the Filter accepts, no Instructor).
     c. Follower F_T: GRPO from F_{T−1} on q_T with reward = adherence (rule-based Judger), reference F_{T−1};
        ``rounds.follower_epochs[T]`` × ``rounds.follower_steps`` steps (3/1/1 as the paper's epochs): the same
        number of Follower steps in every variant.
     d. Evaluation of F_T on the held-out set (greedy), the difficulty of the round's proposals (constraint
        count, Filter rejections, adherence of F0 and F_{T−1} on them) and example instructions with answers.
Writes ``results.json`` (per variant, seed, round and level; mean ± std over seeds), ``metrics.jsonl``,
``examples.json`` and plots.
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from lmx.core.config import ConfigError, check_keys, require
from lmx.core.metrics import Writer, progress
from lmx.core.results import plot_path, summary_line, write_results
from lmx.core.rng import np_stream, rng_stream
from lmx.datasets import text
from lmx.envs import instructions as I
from lmx.methods.seif import data as D
from lmx.methods.seif import report
from lmx.methods.seif.policy import Policy, grpo_batch, sft_rows, split_batch
from lmx.methods.seif.rewards import follower_reward, instructor_reward, parse_proposal

VARIANTS = ("seif", "random", "no_filter")
CONFIG_FIELDS = ("method", "variant", "seeds", "variants", "vocab", "answer_chars", "follower", "instructor",
                 "sft", "sft_optim", "rl_optim", "grpo", "rounds", "eval", "train", "paper")
STEPS_FIELD = None
SAFE_TO_CHANGE = ("train.log_every", "train.plot")


def validate(config):
  """Checks the fields before anything runs (errors name the field)."""
  check_keys(config, "config", CONFIG_FIELDS)
  seeds = list(config.seeds)
  require(seeds and all(isinstance(s, int) and s >= 0 for s in seeds) and len(set(seeds)) == len(seeds), "seeds",
          f"must be distinct integers >= 0, got {seeds}")
  vs = list(config.variants)
  require(vs and all(v in VARIANTS for v in vs) and len(set(vs)) == len(vs), "variants",
          f"must be distinct names from {VARIANTS}, got {vs}")
  kinds = list(config.vocab.kinds)
  bad = [k for k in kinds if k not in D.Vocab().kinds]
  require(kinds and not bad, "vocab.kinds", f"unknown kinds {bad}; valid: {D.Vocab().kinds}")
  g = config.grpo
  require(isinstance(g.group_size, int) and g.group_size >= 2, "grpo.group_size",
          f"must be an integer >= 2 (GRPO's group baseline), got {g.group_size!r}")
  r = config.rounds
  require(r.n >= 1, "rounds.n", f"must be >= 1, got {r.n}")
  require(len(r.follower_epochs) >= r.n, "rounds.follower_epochs",
          f"needs one entry per round ({r.n}), got {tuple(r.follower_epochs)}")
  b = r.prompts_per_step * g.group_size
  require(b % g.minibatches == 0 and (b // g.minibatches) % g.group_size == 0, "grpo.minibatches",
          f"rounds.prompts_per_step*group_size={b} must split into {g.minibatches} minibatches of whole groups")
  for f in ("follower_steps", "instructor_steps", "pool_size", "prompts_per_step"):
    require(isinstance(r[f], int) and r[f] >= 0, f"rounds.{f}", f"must be an integer >= 0, got {r[f]!r}")
  require(r.prompts_per_step >= 1, "rounds.prompts_per_step", "must be >= 1")
  require(0 < config.instructor.max_constraints <= 8, "instructor.max_constraints",
          f"must be in [1, 8], got {config.instructor.max_constraints}")
  require(all(1 <= lv <= config.instructor.max_constraints + 2 for lv in config.eval.levels), "eval.levels",
          f"levels are constraint counts >= 1, got {tuple(config.eval.levels)}")
  require(config.eval.hard_level in tuple(config.eval.levels), "eval.hard_level",
          f"must be one of eval.levels {tuple(config.eval.levels)}")
  for role in ("follower", "instructor"):
    m = config[role].model
    require(m.vocab_size >= text.VOCAB_SIZE, f"{role}.model.vocab_size", f"must be >= {text.VOCAB_SIZE}")
    need = config[role].prompt_len + config[role].new_tokens
    require(need <= m.max_seq_len, f"{role}.prompt_len",
            f"prompt_len + new_tokens = {need} exceeds {role}.model.max_seq_len={m.max_seq_len}")
  require(config.follower.prompt_style in ("spec", "short", "ifeval"), "follower.prompt_style",
          f"must be 'spec', 'short' or 'ifeval', got {config.follower.prompt_style!r}")
  require(isinstance(config.sft.seed, int) and config.sft.seed >= 0, "sft.seed",
          f"must be an integer >= 0, got {config.sft.seed!r}")
  require(config.follower.new_tokens >= config.answer_chars + 1, "follower.new_tokens",
          f"must be >= answer_chars + 1 (EOS) = {config.answer_chars + 1}")
  require(config.paper.enabled is False, "paper.enabled",
          "the paper-scale variant builds and lowers its GRPO step only (lmx.methods.seif.paper.lower_step); it "
          "does not run here")


def build_policies(config) -> tuple[Policy, Policy]:
  """``(follower, instructor)`` with compiled steps (shared across seeds and variants)."""
  g = config.grpo
  rl_cfg = dict(clip_low=g.clip_low, clip_high=g.clip_high, dual_clip=g.dual_clip, kl_coef=g.kl_coef,
                kl_kind=g.kl_kind, agg=g.agg)
  out, built = [], {}
  for role in ("follower", "instructor"):
    r = config[role]
    key = (str(r.model.to_dict()), r.prompt_len, r.new_tokens)
    if key not in built:  # identical roles (smoke) share one policy: one compilation of each step
      built[key] = Policy.build(r.model, prompt_len=r.prompt_len, new_tokens=r.new_tokens,
                                sft_optim=config.sft_optim, rl_optim=config.rl_optim, rl_cfg=rl_cfg)
    out.append(built[key])
  return out[0], out[1]


# ------------------------------------------------------------------------------------------ SFT warm starts


def _fp(config, question, constraints):
  return D.prompt_text(question, constraints, config.follower.prompt_style)


def follower_sft_example(config, vocab, rng, qs):
  topic, q = qs[rng.integers(len(qs))]
  n = int(rng.integers(0, config.sft.follower_max_constraints + 1))
  cs = D.sample_set(vocab, rng, n, max_chars=config.answer_chars) if n else ()
  return _fp(config, q, cs), D.solve(topic, cs, rng, max_chars=config.answer_chars), cs


def instructor_sft_example(config, vocab, rng, qs):
  _, q = qs[rng.integers(len(qs))]
  n = int(rng.integers(1, config.instructor.max_constraints + 1))
  cs = D.sample_set(vocab, rng, n, valid=False)
  return D.instructor_prompt(q), I.to_text(cs)


def sft(policy: Policy, make_example, steps: int, batch: int, seed: int, name: str, writer, log_every: int):
  """Trains a fresh ``policy`` for ``steps`` SFT steps on ``make_example(rng) -> (prompt, target)``."""
  rng = np_stream(seed, f"seif_sft_{name}")
  state = policy.init_state(rng_stream(seed, f"seif_init_{name}"))
  length = policy.model.cfg.max_seq_len
  last = {}
  bar = progress(steps, desc=f"seed {seed} sft {name}", leave=False)
  for step in range(steps):
    ex = [make_example(rng)[:2] for _ in range(batch)]
    rows = sft_rows([p for p, _ in ex], [t for _, t in ex], length)
    state, m = policy.sft_step(state, rows)
    if (step + 1) % log_every == 0 or step + 1 == steps:
      last = writer.scalars(step + 1, {"nll": m["loss"]}, prefix=f"s{seed}/sft_{name}/")
    bar.update(1)
  bar.close()
  return state["params"], last


# ------------------------------------------------------------------------------------------ evaluation


def evaluate(config, follower: Policy, params, heldout, key) -> dict:
  """Greedy answers to the held-out set: per level mean adherence and the all-followed rate, plus per kind."""
  prompts = [_fp(config, h["question"], h["constraints"]) for h in heldout]
  texts = follower.sample_batched(params, prompts, key, 0.0, config.rounds.prompts_per_step * config.grpo.group_size)
  by_level, by_id = {}, {}
  for h, t in zip(heldout, texts):
    ok = I.check_all(t, h["constraints"])
    by_level.setdefault(h["level"], []).append(ok)
    for c, o in zip(h["constraints"], ok):
      by_id.setdefault(c.id, []).append(o)
  out = {}
  for lv, oks in sorted(by_level.items()):
    out[f"L{lv}/adherence"] = float(np.mean([np.mean(o) for o in oks]))
    out[f"L{lv}/all_followed"] = float(np.mean([all(o) for o in oks]))
  out["mean/adherence"] = float(np.mean([out[f"L{lv}/adherence"] for lv in by_level]))
  out["per_type"] = {k: float(np.mean(v)) for k, v in sorted(by_id.items())}
  out["examples"] = [{"level": h["level"], "prompt": p, "answer": t, "followed": I.check_all(t, h["constraints"])}
                     for h, p, t in list(zip(heldout, prompts, texts))[::max(1, len(heldout) // 4)][:4]]
  return out


# ------------------------------------------------------------------------------------------ GRPO rounds


def train_instructor(config, inst: Policy, inst_params, fol: Policy, fol_params, *, use_filter: bool, seed: int,
                     rnd: int, variant: str, writer, step0: int):
  """GRPO on the Instructor for ``rounds.instructor_steps`` steps against the frozen Follower ``fol_params``."""
  r, g = config.rounds, config.grpo
  qs = D.questions("train")
  rng = np_stream(seed, "seif_inst_prompts", rnd, VARIANTS.index(variant))
  state = inst.init_state(None, "rl", params=jax.tree.map(lambda x: x.copy(), inst_params))
  ref = inst_params
  stats = []
  for step in range(r.instructor_steps):
    key = rng_stream(seed, "seif_inst_sample", rnd, VARIANTS.index(variant), step)
    picks = [qs[i] for i in rng.choice(len(qs), r.prompts_per_step, replace=False)]
    prompts = [D.instructor_prompt(q) for _, q in picks for _ in range(g.group_size)]
    out = inst.sample(state["params"], prompts, key, g.temperature)
    parsed = [parse_proposal(t, max_constraints=config.instructor.max_constraints) for t in out["texts"]]
    topics = [t for t, _ in picks for _ in range(g.group_size)]
    fprompts = [_fp(config, q, cs or ()) for (_, q), cs in zip([p for p in picks for _ in range(g.group_size)],
                                                                  parsed)]
    answers = fol.sample(fol_params, fprompts, jax.random.fold_in(key, 1), 0.0)["texts"]
    rewards = [instructor_reward(cs, a, use_filter=use_filter, max_chars=config.answer_chars)
               for cs, a in zip(parsed, answers)]
    batch, _ = grpo_batch(out, rewards, g.group_size)
    for mb in split_batch(batch, g.minibatches):
      state, m = inst.grpo_step(state, ref, mb)
    valid = [cs is not None and I.is_valid(cs, max_chars=config.answer_chars) for cs in parsed]
    rec = {"reward": float(np.mean(rewards)), "parsed": float(np.mean([cs is not None for cs in parsed])),
           "filter_pass": float(np.mean(valid)),
           "n_constraints": float(np.mean([len(cs) for cs in parsed if cs] or [0])),
           "loss": float(m["loss"]), "kl_ref": float(m.get("kl_ref", 0.0))}
    stats.append(rec)
    del topics
    if (step + 1) % config.train.log_every == 0 or step + 1 == r.instructor_steps:
      writer.scalars(step0 + step + 1, rec, prefix=f"s{seed}/{variant}/instructor/")
  return state["params"], stats


def make_pool(config, variant: str, inst: Policy | None, inst_params, seed: int, rnd: int, vocab) -> list[dict]:
  """q_T: ``rounds.pool_size`` instructions (question + constraint set) for the round's Follower training."""
  r = config.rounds
  qs = D.questions("train")
  rng = np_stream(seed, "seif_pool", rnd, VARIANTS.index(variant))
  picks = [qs[i] for i in rng.integers(0, len(qs), r.pool_size)]
  if variant == "random":
    lo, hi = config.rounds.random_constraints
    return [{"topic": t, "question": q, "constraints": D.sample_set(vocab, rng, int(rng.integers(lo, hi + 1)),
                                                                    max_chars=config.answer_chars)}
            for t, q in picks]
  b = r.prompts_per_step * config.grpo.group_size
  texts = inst.sample_batched(inst_params, [D.instructor_prompt(q) for _, q in picks],
                              rng_stream(seed, "seif_pool_sample", rnd, VARIANTS.index(variant)), r.gen_temperature, b)
  pool = []
  for (t, q), s in zip(picks, texts):
    cs = parse_proposal(s, max_constraints=config.instructor.max_constraints)
    if cs:
      pool.append({"topic": t, "question": q, "constraints": cs, "text": s})
  return pool


def pool_stats(config, pool, fol: Policy, params_by_name: dict, key) -> dict:
  """Difficulty of a pool: constraint count, Filter rejections, adherence of the given Followers (greedy)."""
  if not pool:
    return {"size": 0}
  out = {"size": len(pool), "n_constraints": float(np.mean([len(p["constraints"]) for p in pool])),
         "filter_reject": float(np.mean([not I.is_valid(p["constraints"], max_chars=config.answer_chars)
                                         for p in pool]))}
  sub = pool[: config.rounds.prompts_per_step * config.grpo.group_size * 2]
  prompts = [_fp(config, p["question"], p["constraints"]) for p in sub]
  b = config.rounds.prompts_per_step * config.grpo.group_size
  for name, params in params_by_name.items():
    texts = fol.sample_batched(params, prompts, key, 0.0, b)
    out[f"adherence_{name}"] = float(np.mean([I.adherence(t, p["constraints"]) for t, p in zip(texts, sub)]))
  kinds = {}
  for p in pool:
    for c in p["constraints"]:
      kinds[c.id] = kinds.get(c.id, 0) + 1
  out["kinds"] = {k: v / len(pool) for k, v in sorted(kinds.items())}
  return out


def train_follower(config, fol: Policy, fol_params, pool, steps: int, *, seed: int, rnd: int, variant: str, writer,
                   step0: int, vocab):
  """GRPO on the Follower for ``steps`` steps on instructions drawn from ``pool`` (reference: ``fol_params``)."""
  g, r = config.grpo, config.rounds
  rng = np_stream(seed, "seif_fol_prompts", rnd, VARIANTS.index(variant))
  state = fol.init_state(None, "rl", params=jax.tree.map(lambda x: x.copy(), fol_params))
  ref = fol_params
  stats = []
  for step in range(steps):
    items = [pool[i] for i in rng.integers(0, len(pool), r.prompts_per_step)]
    prompts = [_fp(config, it["question"], it["constraints"]) for it in items for _ in range(g.group_size)]
    cons = [it["constraints"] for it in items for _ in range(g.group_size)]
    out = fol.sample(state["params"], prompts, rng_stream(seed, "seif_fol_sample", rnd, VARIANTS.index(variant),
                                                          step), g.temperature)
    rewards = [follower_reward(t, cs) for t, cs in zip(out["texts"], cons)]
    batch, _ = grpo_batch(out, rewards, g.group_size)
    for mb in split_batch(batch, g.minibatches):
      state, m = fol.grpo_step(state, ref, mb)
    rec = {"reward": float(np.mean(rewards)), "loss": float(m["loss"]), "kl_ref": float(m.get("kl_ref", 0.0)),
           "len": float(np.mean(np.asarray(out["lengths"])))}
    stats.append(rec)
    if (step + 1) % config.train.log_every == 0 or step + 1 == steps:
      writer.scalars(step0 + step + 1, rec, prefix=f"s{seed}/{variant}/follower/")
  del vocab
  return state["params"], stats


def run_variant(config, variant, seed, fol, inst, f0, i0, heldout, vocab, writer, eval0) -> dict:
  """All rounds of one variant at one seed, from the shared warm starts ``f0`` / ``i0``."""
  r = config.rounds
  f_prev, i_prev = f0, i0
  rounds = [{"round": 0, "eval": eval0}]
  fsteps = isteps = 0
  for rnd in range(1, r.n + 1):
    t0 = time.time()
    rec = {"round": rnd}
    if variant != "random":
      i_new, istats = train_instructor(config, inst, i_prev, fol, f_prev, use_filter=(variant == "seif"),
                                       seed=seed, rnd=rnd, variant=variant, writer=writer, step0=isteps)
      isteps += len(istats)
      k = max(1, len(istats) // 4)
      rec["instructor"] = {f"{n}_{w}": float(np.mean([s[n] for s in sl])) for n in ("reward", "parsed", "filter_pass",
                                                                                 "n_constraints")
                           for w, sl in (("first", istats[:k]), ("last", istats[-k:]))} if istats else {}
      i_prev = i_new
    pool = make_pool(config, variant, inst, i_prev, seed, rnd, vocab)
    fallback = not pool
    if fallback:  # the Instructor wrote nothing parsable: train on random sets so the step count stays equal
      pool = make_pool(config, "random", None, None, seed, rnd, vocab)
    key = rng_stream(seed, "seif_pool_eval", rnd, VARIANTS.index(variant))
    rec["pool"] = pool_stats(config, pool, fol, {"F0": f0, "Fprev": f_prev}, key)
    rec["pool"]["fallback_random"] = fallback
    steps = int(r.follower_epochs[rnd - 1]) * r.follower_steps
    f_new, fstats = train_follower(config, fol, f_prev, pool, steps, seed=seed, rnd=rnd, variant=variant,
                                   writer=writer, step0=fsteps, vocab=vocab)
    fsteps += steps
    rec["follower"] = {"steps": steps, "total_steps": fsteps,
                       "reward_first": float(np.mean([s["reward"] for s in fstats[:max(1, steps // 4)]])) if steps
                       else None,
                       "reward_last": float(np.mean([s["reward"] for s in fstats[-max(1, steps // 4):]])) if steps
                       else None}
    f_prev = f_new
    rec["eval"] = evaluate(config, fol, f_prev, heldout, rng_stream(seed, "seif_eval"))
    ex_items = pool[:config.train.examples]
    ex_texts = fol.sample_batched(f_prev, [_fp(config, p["question"], p["constraints"]) for p in ex_items],
                                  rng_stream(seed, "seif_examples"), 0.0,
                                  config.rounds.prompts_per_step * config.grpo.group_size) if ex_items else []
    rec["examples"] = [{"instruction": p.get("text", I.to_text(p["constraints"])), "question": p["question"],
                        "filter_valid": I.is_valid(p["constraints"], max_chars=config.answer_chars),
                        "answer": t, "followed": I.check_all(t, p["constraints"])}
                       for p, t in zip(ex_items, ex_texts)]
    rec["seconds"] = time.time() - t0
    e = rec["eval"]
    hard = config.eval.hard_level
    writer.summary(rnd, {f"L{hard}_adherence": e[f"L{hard}/adherence"], "mean_adherence": e["mean/adherence"],
                         "pool_n": rec["pool"].get("n_constraints", 0.0),
                         "pool_reject": rec["pool"].get("filter_reject", 0.0)}, prefix=f"s{seed}/{variant}/round/")
    rounds.append(rec)
  return {"rounds": rounds, "follower_steps": fsteps, "instructor_steps": isteps}


def run(config, workdir: str) -> dict:
  validate(config)
  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  vocab = D.Vocab.from_config(config.vocab)
  fol, inst = build_policies(config)
  writer = Writer(workdir, total_steps=config.rounds.n)
  ev = config.eval
  heldout = D.heldout_set(vocab, tuple(ev.levels), ev.per_level, ev.seed, max_chars=config.answer_chars)
  per_seed = {}
  try:
    # The warm starts (the paper's base model): trained once, shared by every seed and variant; the seeds vary
    # the RL (proposals, rollouts, prompt order).
    ts, sseed = time.time(), int(config.sft.seed)
    qs = D.questions("train")
    f0, fsft = sft(fol, lambda rng: follower_sft_example(config, vocab, rng, qs), config.sft.follower_steps,
                   config.sft.batch, sseed, "follower", writer, config.train.log_every)
    i0, isft = sft(inst, lambda rng: instructor_sft_example(config, vocab, rng, qs), config.sft.instructor_steps,
                   config.sft.batch, sseed, "instructor", writer, config.train.log_every)
    eval0 = evaluate(config, fol, f0, heldout, rng_stream(sseed, "seif_eval"))
    sft_info = {"follower_nll": fsft.get(f"s{sseed}/sft_follower/nll"),
                "instructor_nll": isft.get(f"s{sseed}/sft_instructor/nll"), "seconds": time.time() - ts,
                "F0_eval": {k: v for k, v in eval0.items() if k != "examples"}, "F0_examples": eval0["examples"]}
    print(f"seif: SFT warm starts in {sft_info['seconds']:.0f}s (follower nll {sft_info['follower_nll']}, "
          f"instructor nll {sft_info['instructor_nll']}); F0 held-out mean adherence {eval0['mean/adherence']:.3f}",
          flush=True)
    for seed in config.seeds:
      per_seed[seed] = {"variants": {}}
      for variant in config.variants:
        tv = time.time()
        per_seed[seed]["variants"][variant] = run_variant(config, variant, seed, fol, inst, f0, i0, heldout, vocab,
                                                          writer, eval0)
        per_seed[seed]["variants"][variant]["seconds"] = time.time() - tv
        print(f"seif: seed {seed} {variant} done in {time.time() - tv:.0f}s", flush=True)
  finally:
    writer.close()
  summary = report.summarize(per_seed, list(config.variants), list(ev.levels), config.rounds.n)
  results = {"method": "seif", "variant": config.variant, "seeds": list(config.seeds),
             "variants": list(config.variants), "levels": list(ev.levels), "hard_level": ev.hard_level,
             "summary": summary, "sft": sft_info, "per_seed": per_seed, "seconds": time.time() - t_start,
             "heldout": [{"level": h["level"], "question": h["question"], "instruction": I.to_text(h["constraints"])}
                         for h in heldout]}
  path = write_results(workdir, results)
  if jax.process_index() == 0 and config.train.plot:
    report.plots(results, workdir)
  hard = ev.hard_level
  last = summary["final"]
  summary_line("seif", {f"{v} L{hard}": f"{last[v][f'L{hard}/adherence']['mean']:.3f}±"
                                      f"{last[v][f'L{hard}/adherence']['std']:.3f}" for v in config.variants}, path)
  return results


def load_results(workdir: str) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


__all__ = ["run", "validate", "ConfigError", "VARIANTS", "plot_path"]
