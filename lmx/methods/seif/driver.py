"""SEIF's driver: SFT warm starts, then alternating Instructor / Follower GRPO rounds, per variant and seed.

Stages (each a resumable sub-run of the workdir, :mod:`lmx.core.stages`; a rerun skips the finished ones and
resumes the one it stopped in):

  sft_follower, sft_instructor     the warm starts F0 and I0 (the paper's base model): trained once with
                                   ``sft.seed`` and shared by every seed and variant. The Follower learns
                                   rule-written compliant answers to instructions of ``sft.follower_max_constraints``
                                   or fewer constraints; the Instructor random constraint sets (1..
                                   ``instructor.max_constraints``, not filtered) in the text form of
                                   :mod:`lmx.envs.instructions`.
  eval_F0                          F0 on the held-out set (round 0 of every variant).
  s<seed>/<variant>                one cell of the sweep (seeds × variants; results.json rewritten after each),
                                   made of the stages of its rounds T = 1..R:
    .../r<T>/instructor            (``seif``, ``no_filter``) GRPO from I_{T−1}; reward 0 if unparsable, 0 if the
                                   Filter rejects (``seif`` only), else 1 − adherence of the frozen F_{T−1}'s
                                   greedy answer.
    .../r<T>/pool                  q_T: I_T's constraints for the training questions at ``rounds.gen_temperature``,
                                   the parsable ones kept (``random``: uniformly random sets the Filter accepts).
    .../r<T>/pool_stats            q_T's difficulty: constraint count, Filter rejections, adherence of F0 and F_{T−1}.
    .../r<T>/follower              GRPO from F_{T−1} on q_T, reward = adherence (rule-based Judger), reference
                                   F_{T−1}; ``rounds.follower_epochs[T]`` × ``rounds.follower_steps`` steps (the same
                                   number in every variant).
    .../r<T>/eval, .../examples    F_T on the held-out set (greedy); example instructions of q_T with F_T's answers.

The GRPO stages run on the shared loop: the step is one jitted update over the step's fixed-size rollout buffer
(:meth:`lmx.methods.seif.policy.Policy.grpo_step`), the rollouts are sampled and scored on the host by the stage's
``batch_fn`` from the current parameters with named random streams indexed by (seed, round, variant, step), the
reference policy is the loop's frozen input. Writes ``results.json`` (per variant, seed, round and level; mean ±
sample std over seeds), ``metrics.jsonl`` + ``tb/`` (every stage's per-step scalars under its name) and plots.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from lmx.core import loop, schema, stages
from lmx.core.config import ConfigError, require
from lmx.core.metrics import Writer
from lmx.core.results import plot_path, summary_line, write_results
from lmx.core.rng import np_stream, rng_stream
from lmx.datasets import text
from lmx.envs import instructions as I
from lmx.methods.seif import data as D
from lmx.methods.seif import report
from lmx.methods.seif.policy import Policy, grpo_batch, sft_rows
from lmx.methods.seif.rewards import follower_reward, instructor_reward, parse_proposal

VARIANTS = ("seif", "random", "no_filter")
STEPS_FIELD = None
# The per-step scalars of a GRPO stage (the step's batch carries them), the same for both roles so that equal
# shapes share one compiled update: mean reward, mean completion length (tokens), and of the step's instructions
# (the Instructor's proposals; the Follower's prompts) the share that parses, the share the Filter accepts and the
# mean constraint count.
STATS = ("reward", "len", "parsed", "filter_pass", "n_constraints")
# The GRPO loops' own seed: their update takes its key from the batch (the named stream of seed, round, variant and
# step) and ignores the loop's step rng, so the loop seed is a constant.
GRPO_LOOP_SEED = 0


def validate(config):
  """Checks the config before anything runs: its fields against ``configs/seif.py``'s declarations, then what
  relates fields (distinct seeds and variants, per-round epochs, minibatches, levels, sequence lengths, the answer
  budget) and the paper-scale variant, which does not run here. Errors name the field."""
  schema.validate(config)
  seeds = list(config.seeds)
  require(len(set(seeds)) == len(seeds), "seeds", f"must be distinct integers >= 0, got {seeds}")
  vs = list(config.variants)
  require(len(set(vs)) == len(vs), "variants", f"must be distinct names from {VARIANTS}, got {vs}")
  g, r = config.grpo, config.rounds
  require(len(r.follower_epochs) >= r.n, "rounds.follower_epochs",
          f"needs one entry per round ({r.n}), got {tuple(r.follower_epochs)}")
  b = r.prompts_per_step * g.group_size
  require(g.minibatches <= b, "grpo.minibatches",
          f"must be an integer in [1, rounds.prompts_per_step*group_size = {b}], got {g.minibatches!r}")
  require(all(lv <= config.instructor.max_constraints + 2 for lv in config.eval.levels), "eval.levels",
          f"levels are constraint counts >= 1 and <= instructor.max_constraints + 2, got {tuple(config.eval.levels)}")
  require(config.eval.hard_level in tuple(config.eval.levels), "eval.hard_level",
          f"must be one of eval.levels {tuple(config.eval.levels)}")
  for role in ("follower", "instructor"):
    m = config[role].model
    require(m.vocab_size >= text.VOCAB_SIZE, f"{role}.model.vocab_size", f"must be >= {text.VOCAB_SIZE}")
    need = config[role].prompt_len + config[role].new_tokens
    require(need <= m.max_seq_len, f"{role}.prompt_len",
            f"prompt_len + new_tokens = {need} exceeds {role}.model.max_seq_len={m.max_seq_len}")
  require(config.follower.new_tokens >= config.answer_chars + 1, "follower.new_tokens",
          f"must be >= answer_chars + 1 (EOS) = {config.answer_chars + 1}")
  require(config.paper.enabled is False, "paper.enabled",
          "the paper-scale variant builds and lowers its GRPO step only (lmx.methods.seif.paper.lower_step); it "
          "does not run here")


def build_policies(config) -> tuple[Policy, Policy]:
  """``(follower, instructor)``; roles of identical shape (smoke) share one policy, so one compilation of each
  step and of the sampler."""
  g = config.grpo
  rl_cfg = dict(clip_low=g.clip_low, clip_high=g.clip_high, dual_clip=g.dual_clip, kl_coef=g.kl_coef,
                kl_kind=g.kl_kind, agg=g.agg)
  out, built = [], {}
  for role in ("follower", "instructor"):
    r = config[role]
    key = (str(r.model.to_dict()), r.prompt_len, r.new_tokens)
    if key not in built:
      built[key] = Policy.build(r.model, prompt_len=r.prompt_len, new_tokens=r.new_tokens,
                                rl_optim=config.rl_optim, rl_cfg=rl_cfg)
    out.append(built[key])
  return out[0], out[1]


@dataclasses.dataclass
class Context:
  """What every stage of one run reads: the config, the workdir and its writer, the two policies, the data."""
  config: object
  workdir: str
  writer: Writer
  vocab: D.Vocab
  fol: Policy
  inst: Policy
  heldout: list

  @property
  def rows(self) -> int:
    """Rollouts per GRPO step (and the batch of every sampling call): prompts × group size."""
    return int(self.config.rounds.prompts_per_step * self.config.grpo.group_size)


def _fp(config, question, constraints):
  return D.prompt_text(question, constraints, config.follower.prompt_style)


# ------------------------------------------------------------------------------------------ SFT warm starts


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


def sft(ctx: Context, policy: Policy, name: str, make_example, steps: int) -> dict:
  """The stage ``sft_<name>``: a fresh ``policy`` trained for ``steps`` SFT steps; batch k is ``sft.batch``
  examples ``make_example(rng)`` from ``np_stream(sft.seed, "seif_sft_<name>", k)``. Returns the parameters
  (packed) and the last step's NLL."""
  c = ctx.config
  seed = int(c.sft.seed)
  step_fn, tx = policy.sft_step(c.sft_optim, steps)
  parts = {**loop.optax_state(policy.init_params(rng_stream(seed, f"seif_init_{name}")), tx),
           "nll": np.zeros((), np.float32)}

  def batch_fn(step, state):
    del state
    rng = np_stream(seed, f"seif_sft_{name}", step)
    ex = [make_example(rng)[:2] for _ in range(c.sft.batch)]
    return sft_rows([p for p, _ in ex], [t for _, t in ex], policy.max_seq_len)

  res = stages.train(ctx.workdir, f"sft_{name}", writer=ctx.writer, total_steps=steps, step_fn=step_fn,
                     init_state=parts, seed=seed, batch_fn=batch_fn, log_every=c.train.log_every,
                     compile_cache=policy.compile_cache)
  nll = float(loop.host(res.state["nll"])) if steps else None
  print(f"sft_{name}: {steps} steps" + (f", last nll {nll:.3f}" if steps else ""), flush=True)
  return {"params": policy.pack(res.state["params"]), "nll": nll}


# ------------------------------------------------------------------------------------------ evaluation


def evaluate(ctx: Context, params) -> dict:
  """Greedy answers of the Follower ``params`` to the held-out set: per level the mean adherence and the
  all-followed rate, per constraint type the adherence, and four examples."""
  config, heldout = ctx.config, ctx.heldout
  prompts = [_fp(config, h["question"], h["constraints"]) for h in heldout]
  texts = ctx.fol.sample_batched(params, prompts, rng_stream(int(config.sft.seed), "seif_eval"), 0.0, ctx.rows)
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


# ------------------------------------------------------------------------------------------ GRPO stages


def max_grpo_steps(config) -> int:
  """The longest GRPO stage of a run (rows of every stage's per-step record: one state shape for all)."""
  r = config.rounds
  return max(1, r.instructor_steps, max(int(e) for e in r.follower_epochs[:r.n]) * r.follower_steps)


def grpo_stage(ctx: Context, policy: Policy, name: str, params, steps: int, make_batch) -> dict:
  """The GRPO training stage ``name``: ``steps`` updates of ``policy`` from ``params`` (also the frozen
  reference), batch k = ``make_batch(k, current params)`` (rollout buffer, :data:`STATS`, update key). The
  per-step scalars are kept in the state (checkpointed with it). Returns the trained parameters (packed) and
  ``stats[name]`` = the per-step values."""
  c = ctx.config
  tx = policy.rl_tx
  parts = {"params": params, "opt_state": tx.init(jax.tree.map(jnp.asarray, params)),
           "stats": np.zeros((max_grpo_steps(c), len(STATS)), np.float32)}
  res = stages.train(ctx.workdir, name, writer=ctx.writer, total_steps=steps,
                     step_fn=policy.grpo_step(rows=ctx.rows, minibatches=c.grpo.minibatches), init_state=parts,
                     seed=GRPO_LOOP_SEED, batch_fn=lambda k, state: make_batch(k, state["params"]),
                     frozen={"ref_params": params}, log_every=c.train.log_every, postfix=("loss", "reward"),
                     compile_cache=policy.compile_cache)
  hist = loop.host(res.state["stats"])[:steps]
  stats = {n: hist[:, i] for i, n in enumerate(sorted(STATS))}
  if steps:
    k = max(1, steps // 4)
    rw = stats["reward"]
    print(f"{name}: {steps} steps, reward {np.mean(rw[:k]):.3f} (first {k}) → {np.mean(rw[-k:]):.3f} (last {k})",
          flush=True)
  return {"params": policy.pack(res.state["params"]), "stats": stats}


def _update_key(seed: int, role: str, rnd: int, vidx: int, step: int) -> np.ndarray:
  return np.asarray(jax.random.key_data(rng_stream(seed, f"seif_update_{role}", rnd, vidx, step)))


def _stats(rewards, lengths, constraint_sets, max_chars: int) -> dict:
  """:data:`STATS` of one rollout batch (``constraint_sets``: the step's instructions, None where unparsable)."""
  parsed = [cs for cs in constraint_sets if cs]
  out = {"reward": np.mean(rewards), "len": np.mean(np.asarray(lengths)),
         "parsed": len(parsed) / len(constraint_sets),
         "filter_pass": np.mean([bool(cs) and I.is_valid(cs, max_chars=max_chars) for cs in constraint_sets]),
         "n_constraints": np.mean([len(cs) for cs in parsed] or [0])}
  return {k: np.float32(out[k]) for k in STATS}


def train_instructor(ctx: Context, i_prev, f_prev, *, use_filter: bool, seed: int, rnd: int, variant: str,
                     name: str) -> dict:
  """GRPO on the Instructor from ``i_prev`` for ``rounds.instructor_steps`` steps against the frozen Follower
  ``f_prev``: step k asks ``rounds.prompts_per_step`` questions of ``np_stream(seed, "seif_inst_prompts", rnd,
  variant, k)``, ``grpo.group_size`` proposals each."""
  c, r, g = ctx.config, ctx.config.rounds, ctx.config.grpo
  qs = D.questions("train")
  vidx = VARIANTS.index(variant)

  def make_batch(step, params):
    rng = np_stream(seed, "seif_inst_prompts", rnd, vidx, step)
    key = rng_stream(seed, "seif_inst_sample", rnd, vidx, step)
    picks = [qs[i] for i in rng.choice(len(qs), r.prompts_per_step, replace=False)]
    group = [p for p in picks for _ in range(g.group_size)]
    out = ctx.inst.sample(params, [D.instructor_prompt(q) for _, q in group], key, g.temperature)
    parsed = [parse_proposal(t, max_constraints=c.instructor.max_constraints) for t in out["texts"]]
    answers = ctx.fol.sample(f_prev, [_fp(c, q, cs or ()) for (_, q), cs in zip(group, parsed)],
                             jax.random.fold_in(key, 1), 0.0)["texts"]
    rewards = [instructor_reward(cs, a, use_filter=use_filter, max_chars=c.answer_chars)
               for cs, a in zip(parsed, answers)]
    rows, _ = grpo_batch(out, rewards, g.group_size)
    return {"rows": rows, "stats": _stats(rewards, out["lengths"], parsed, c.answer_chars),
            "key": _update_key(seed, "instructor", rnd, vidx, step)}

  return grpo_stage(ctx, ctx.inst, name, i_prev, r.instructor_steps, make_batch)


def train_follower(ctx: Context, f_prev, pool, steps: int, *, seed: int, rnd: int, variant: str, name: str) -> dict:
  """GRPO on the Follower from ``f_prev`` (also its reference) for ``steps`` steps on instructions of ``pool``:
  step k draws ``rounds.prompts_per_step`` of them from ``np_stream(seed, "seif_fol_prompts", rnd, variant, k)``,
  ``grpo.group_size`` answers each, reward = adherence."""
  c, r, g = ctx.config, ctx.config.rounds, ctx.config.grpo
  vidx = VARIANTS.index(variant)

  def make_batch(step, params):
    rng = np_stream(seed, "seif_fol_prompts", rnd, vidx, step)
    items = [pool[i] for i in rng.integers(0, len(pool), r.prompts_per_step)]
    group = [it for it in items for _ in range(g.group_size)]
    out = ctx.fol.sample(params, [_fp(c, it["question"], it["constraints"]) for it in group],
                         rng_stream(seed, "seif_fol_sample", rnd, vidx, step), g.temperature)
    rewards = [follower_reward(t, it["constraints"]) for t, it in zip(out["texts"], group)]
    rows, _ = grpo_batch(out, rewards, g.group_size)
    return {"rows": rows, "stats": _stats(rewards, out["lengths"], [it["constraints"] for it in group], c.answer_chars),
            "key": _update_key(seed, "follower", rnd, vidx, step)}

  return grpo_stage(ctx, ctx.fol, name, f_prev, steps, make_batch)


# ------------------------------------------------------------------------------------------ pools


def make_pool(ctx: Context, variant: str, i_params, seed: int, rnd: int) -> dict:
  """q_T: ``rounds.pool_size`` instructions (question + constraints in the text form) for the round's Follower
  training; ``random`` (and the fallback when the Instructor wrote nothing parsable, so that the Follower's step
  count stays equal) draws uniformly random sets the Filter accepts."""
  c, r = ctx.config, ctx.config.rounds
  qs = D.questions("train")

  def random_pool():
    rng = np_stream(seed, "seif_pool", rnd, VARIANTS.index("random"))
    picks = [qs[i] for i in rng.integers(0, len(qs), r.pool_size)]
    lo, hi = r.random_constraints
    items = []
    for t, q in picks:
      spec = I.to_text(D.sample_set(ctx.vocab, rng, int(rng.integers(lo, hi + 1)), max_chars=c.answer_chars))
      items.append({"topic": t, "question": q, "spec": spec, "text": spec})
    return items

  if variant == "random":
    return {"items": random_pool(), "fallback_random": False}
  rng = np_stream(seed, "seif_pool", rnd, VARIANTS.index(variant))
  picks = [qs[i] for i in rng.integers(0, len(qs), r.pool_size)]
  texts = ctx.inst.sample_batched(i_params, [D.instructor_prompt(q) for _, q in picks],
                                  rng_stream(seed, "seif_pool_sample", rnd, VARIANTS.index(variant)),
                                  r.gen_temperature, ctx.rows)
  items = []
  for (t, q), s in zip(picks, texts):
    cs = parse_proposal(s, max_constraints=c.instructor.max_constraints)
    if cs:
      items.append({"topic": t, "question": q, "spec": I.to_text(cs), "text": s})
  if not items:
    return {"items": random_pool(), "fallback_random": True}
  return {"items": items, "fallback_random": False}


def with_constraints(items) -> list[dict]:
  """Pool items with their constraints parsed back from the text form (a stage saves strings)."""
  return [dict(it, constraints=I.parse(it["spec"])) for it in items]


def pool_stats(ctx: Context, pool, params_by_name: dict, key) -> dict:
  """Difficulty of a pool: constraint count, Filter rejections, adherence of the given Followers (greedy)."""
  c = ctx.config
  if not pool:
    return {"size": 0}
  out = {"size": len(pool), "n_constraints": float(np.mean([len(p["constraints"]) for p in pool])),
         "filter_reject": float(np.mean([not I.is_valid(p["constraints"], max_chars=c.answer_chars)
                                         for p in pool]))}
  sub = pool[: ctx.rows * 2]
  prompts = [_fp(c, p["question"], p["constraints"]) for p in sub]
  for name, params in params_by_name.items():
    texts = ctx.fol.sample_batched(params, prompts, key, 0.0, ctx.rows)
    out[f"adherence_{name}"] = float(np.mean([I.adherence(t, p["constraints"]) for t, p in zip(texts, sub)]))
  kinds = {}
  for p in pool:
    for cn in p["constraints"]:
      kinds[cn.id] = kinds.get(cn.id, 0) + 1
  out["kinds"] = {k: v / len(pool) for k, v in sorted(kinds.items())}
  return out


def examples(ctx: Context, pool, f_params, seed: int) -> list[dict]:
  """The first ``train.examples`` instructions of the pool with the Follower's greedy answers and verdicts."""
  c = ctx.config
  items = pool[:c.train.examples]
  texts = ctx.fol.sample_batched(f_params, [_fp(c, p["question"], p["constraints"]) for p in items],
                                 rng_stream(seed, "seif_examples"), 0.0, ctx.rows) if items else []
  return [{"instruction": p["text"], "question": p["question"],
           "filter_valid": I.is_valid(p["constraints"], max_chars=c.answer_chars), "answer": t,
           "followed": I.check_all(t, p["constraints"])} for p, t in zip(items, texts)]


# ------------------------------------------------------------------------------------------ one cell


def _quarters(stats: dict, names) -> dict:
  """Mean of each per-step scalar over the first and the last quarter of the steps."""
  n = len(stats[names[0]]) if names else 0
  if not n:
    return {}
  k = max(1, n // 4)
  return {f"{name}_{w}": float(np.mean(sl)) for name in names
          for w, sl in (("first", stats[name][:k]), ("last", stats[name][-k:]))}


def run_cell(ctx: Context, f0, i0, eval0, seed: int, variant: str) -> dict:
  """All rounds of ``variant`` at ``seed`` from the shared warm starts ``f0`` / ``i0``, each piece a stage."""
  c, r, w = ctx.config, ctx.config.rounds, ctx.workdir
  vidx = VARIANTS.index(variant)
  f_prev, i_prev = f0, i0
  rounds = [{"round": 0, "eval": eval0}]
  fsteps = isteps = 0
  for rnd in range(1, r.n + 1):
    name = f"s{seed}/{variant}/r{rnd}"
    rec = {"round": rnd}
    if variant != "random":
      out = stages.run_stage(w, f"{name}/instructor", lambda: train_instructor(
          ctx, i_prev, f_prev, use_filter=(variant == "seif"), seed=seed, rnd=rnd, variant=variant,
          name=f"{name}/instructor"))
      i_prev = ctx.inst.unpack(out["params"])
      rec["instructor"] = _quarters(out["stats"], ("reward", "parsed", "filter_pass", "n_constraints"))
      isteps += r.instructor_steps
    made = stages.run_stage(w, f"{name}/pool", lambda: make_pool(ctx, variant, i_prev, seed, rnd))
    pool = with_constraints(made["items"])
    key = rng_stream(seed, "seif_pool_eval", rnd, vidx)
    rec["pool"] = dict(stages.run_stage(w, f"{name}/pool_stats", lambda: pool_stats(
        ctx, pool, {"F0": f0, "Fprev": f_prev}, key)), fallback_random=bool(made["fallback_random"]))
    steps = int(r.follower_epochs[rnd - 1]) * r.follower_steps
    out = stages.run_stage(w, f"{name}/follower", lambda: train_follower(
        ctx, f_prev, pool, steps, seed=seed, rnd=rnd, variant=variant, name=f"{name}/follower"))
    f_prev = ctx.fol.unpack(out["params"])
    fsteps += steps
    q = _quarters(out["stats"], ("reward",))
    rec["follower"] = {"steps": steps, "total_steps": fsteps, "reward_first": q.get("reward_first"),
                       "reward_last": q.get("reward_last")}
    fresh = not stages.is_finished(w, f"{name}/eval")
    rec["eval"] = stages.run_stage(w, f"{name}/eval", lambda: evaluate(ctx, f_prev))
    rec["examples"] = stages.run_stage(w, f"{name}/examples", lambda: examples(ctx, pool, f_prev, seed))
    if fresh:
      e, hard = rec["eval"], c.eval.hard_level
      ctx.writer.summary(rnd, {f"L{hard}_adherence": e[f"L{hard}/adherence"], "mean_adherence": e["mean/adherence"],
                               "pool_n": rec["pool"].get("n_constraints", 0.0),
                               "pool_reject": rec["pool"].get("filter_reject", 0.0)},
                         prefix=f"s{seed}/{variant}/round/")
    rounds.append(rec)
  return {"rounds": rounds, "follower_steps": fsteps, "instructor_steps": isteps}


# ------------------------------------------------------------------------------------------ the run


def results_of(ctx: Context, sft_info: dict, done: dict) -> dict:
  """results.json from the finished cells ``{(seed, variant): record}`` (a partial sweep gives partial means)."""
  c = ctx.config
  per_seed: dict = {}
  for (seed, variant), rec in done.items():
    per_seed.setdefault(seed, {"variants": {}})["variants"][variant] = rec
  return {"method": "seif", "variant": c.variant, "seeds": list(c.seeds), "variants": list(c.variants),
          "levels": list(c.eval.levels), "hard_level": c.eval.hard_level,
          "summary": report.summarize(per_seed, list(c.variants), list(c.eval.levels), c.rounds.n),
          "sft": sft_info, "per_seed": per_seed,
          "heldout": [{"level": h["level"], "question": h["question"], "instruction": I.to_text(h["constraints"])}
                      for h in ctx.heldout]}


def run(config, workdir: str) -> dict:
  validate(config)
  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  vocab = D.Vocab.from_config(config.vocab)
  fol, inst = build_policies(config)
  ev = config.eval
  heldout = D.heldout_set(vocab, tuple(ev.levels), ev.per_level, ev.seed, max_chars=config.answer_chars)
  writer = Writer(workdir, total_steps=config.rounds.n)
  ctx = Context(config, workdir, writer, vocab, fol, inst, heldout)
  try:
    qs = D.questions("train")
    fo = stages.run_stage(workdir, "sft_follower", lambda: sft(
        ctx, fol, "follower", lambda rng: follower_sft_example(config, vocab, rng, qs), config.sft.follower_steps))
    io = stages.run_stage(workdir, "sft_instructor", lambda: sft(
        ctx, inst, "instructor", lambda rng: instructor_sft_example(config, vocab, rng, qs),
        config.sft.instructor_steps))
    f0, i0 = fol.unpack(fo["params"]), inst.unpack(io["params"])
    eval0 = stages.run_stage(workdir, "eval_F0", lambda: evaluate(ctx, f0))
    sft_info = {"follower_nll": fo["nll"], "instructor_nll": io["nll"],
                "F0_eval": {k: v for k, v in eval0.items() if k != "examples"}, "F0_examples": eval0["examples"]}
    print(f"seif: F0 held-out mean adherence {eval0['mean/adherence']:.3f}", flush=True)
    cells = [(seed, v) for seed in config.seeds for v in config.variants]
    done = stages.sweep(workdir, cells, lambda cell: run_cell(ctx, f0, i0, eval0, *cell),
                        lambda d: results_of(ctx, sft_info, d))
    results = {**results_of(ctx, sft_info, done), "wall_s": time.time() - t_start}
    path = write_results(workdir, results)
    if jax.process_index() == 0 and config.train.plot:
      for p in report.plots(results, workdir):
        writer.image(f"plots/{os.path.splitext(os.path.basename(p))[0]}", p)
  finally:
    writer.close()
  last, hard = results["summary"]["final"], ev.hard_level
  summary_line("seif", {f"{v} L{hard}": stages.fmt_mean_std(last[v][f"L{hard}/adherence"])
                        for v in config.variants}, path)
  return results


__all__ = ["run", "validate", "ConfigError", "VARIANTS", "plot_path"]
