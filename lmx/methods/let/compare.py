r"""LET vs baseline at equal seeds, data order and lr schedule: arms × seeds on one shared teacher.

  python launch/run.py --config=configs/let.py --config.compare.seeds="(0,1,2)" --workdir=runs/let-compare
  python launch/run.py --config=configs/let.py:smoke --config.compare.seeds="(0,)" \
      --config.compare.arms="('baseline','let','constant')" --workdir=runs/let-compare-smoke

Every arm is a LET student of the same config with one change, seed ``s`` setting both ``seed`` (init, step
rngs) and ``data.shuffle_seed`` (data order), so within a seed the arms see identical initial weights and batches:
  baseline   λ0 = 0 (the same step; the teacher's forward is computed but weighs nothing)
  let        the config as given (late-to-early: teacher final layer -> student block ``let.student_layer``)
  l2l        late-to-late: the student's last block
  constant   λ = λ0 until S_stop (no linear decay)
  large      λ0 = 3
The workdir's stages: the teacher (``teacher``, trained once as in a ``let`` run), then a sweep of one stage per arm
and seed (``<arm>/s<seed>``, :func:`lmx.core.stages.sweep`): finished cells are skipped on a rerun and
``results.json`` is rewritten after each. Reported per seed and as mean ± std over seeds (sample std, n stated):
each arm's final validation CE, and the steps a non-baseline arm needs to reach the baseline's final validation CE
(linear interpolation between evaluations) with the speedup ``baseline steps / those steps``.
"""
from __future__ import annotations

import copy

import numpy as np

from lmx.core import plots, stages
from lmx.core.results import plot_path

ARMS = ("baseline", "let", "l2l", "constant", "large")


def arm_config(config, arm: str, seed: int):
  """The config of one arm at one seed (see the module docstring)."""
  c = copy.deepcopy(config)
  c.seed = int(seed)
  c.data.shuffle_seed = int(seed)
  c.let.with_baseline = False  # the sweep trains the baseline arm itself
  c.compare.seeds = ()
  if arm == "baseline":
    c.let.lam0 = 0.0
  elif arm == "l2l":
    c.let.student_layer = c.model.n_layers - 1
  elif arm == "constant":
    c.let.schedule = "constant"
  elif arm == "large":
    c.let.lam0 = 3.0
  elif arm != "let":
    raise ValueError(f"unknown arm {arm!r}; valid: {list(ARMS)}")
  return c


def steps_to_reach(steps, values, target: float) -> float | None:
  """The first step at which the curve reaches ``values <= target``, linearly interpolated between the
  evaluation before and the one at the crossing (the first point when it is already below); None if never."""
  steps, values = np.asarray(steps, float), np.asarray(values, float)
  hit = np.nonzero(values <= target)[0]
  if not len(hit):
    return None
  i = int(hit[0])
  if i == 0:
    return float(steps[0])
  s0, s1, v0, v1 = steps[i - 1], steps[i], values[i - 1], values[i]
  return float(s0 + (s1 - s0) * (v0 - target) / (v0 - v1))


def summarize(per_seed: dict, arms, total_steps: int) -> dict:
  """``per_seed[seed][arm] = (steps, eval_ce)`` -> the table: per seed, and :func:`lmx.core.stages.mean_std` over
  seeds."""
  table = {"per_seed": {}, "mean": {}}
  for seed, curves in per_seed.items():
    base_final = float(curves["baseline"][1][-1])
    row = {}
    for arm in arms:
      steps, ce = curves[arm]
      entry = {"final_eval_ce": float(ce[-1])}
      if arm != "baseline":
        reach = steps_to_reach(steps, ce, base_final)
        entry.update(steps_to_baseline_final=reach, speedup=(total_steps / reach) if reach else None,
                     delta_final_eval_ce=float(ce[-1]) - base_final)  # paired: same seed, init and data order
      row[arm] = entry
    table["per_seed"][str(seed)] = row
  for arm in arms:
    for key in ("final_eval_ce", "speedup", "delta_final_eval_ce"):
      vals = [table["per_seed"][str(s)][arm].get(key) for s in per_seed]
      if any(v is not None for v in vals):
        table["mean"].setdefault(arm, {})[key] = stages.mean_std(vals)
    if arm != "baseline":
      reached = sum(table["per_seed"][str(s)][arm]["speedup"] is not None for s in per_seed)
      table["mean"].setdefault(arm, {})["seeds_reaching_baseline"] = f"{reached}/{len(per_seed)}"
  return table


def _curve_stats(rows: np.ndarray, common: list[int]) -> dict:
  """Mean and sample std over seeds (the rows) at each shared step (the columns); std None for one seed."""
  ms = [stages.mean_std(col) for col in np.asarray(rows, float).T]
  return {"steps": common, "mean": [m["mean"] for m in ms], "std": [m["std"] for m in ms], "n": int(len(rows))}


def delta_curves(per_seed: dict, arms) -> dict:
  """Per non-baseline arm: mean and sample std over seeds of (arm's validation CE − the same seed's baseline's) at
  the evaluation steps every run shares; < 0 where the arm is ahead."""
  out = {}
  for arm in arms:
    if arm == "baseline":
      continue
    runs = [(per_seed[s][arm], per_seed[s]["baseline"]) for s in per_seed]
    common = sorted(set.intersection(*(set(map(int, c[0])) & set(map(int, b[0])) for c, b in runs)))
    vals = [[dict(zip(map(int, c[0]), c[1]))[k] - dict(zip(map(int, b[0]), b[1]))[k] for k in common]
            for c, b in runs]
    out[arm] = _curve_stats(vals, common)
  return out


def mean_curves(per_seed: dict, arms) -> dict:
  """Per arm: the validation-CE curve's mean and sample std over seeds at the evaluation steps all seeds share."""
  out = {}
  for arm in arms:
    curves = [per_seed[s][arm] for s in per_seed]
    common = sorted(set.intersection(*(set(int(x) for x in c[0]) for c in curves)))
    vals = [[dict(zip(map(int, c[0]), c[1]))[k] for k in common] for c in curves]
    out[arm] = _curve_stats(vals, common)
  return out


def compare(config, workdir: str, *, mesh, writer) -> dict:
  """Runs (or resumes) the teacher and every arm × seed of ``config.compare`` as stages of ``workdir``; rewrites
  ``results.json`` after every cell and draws ``plots/compare_eval_ce.png`` and ``plots/compare_delta_ce.png``.
  Returns the results."""
  from lmx.methods.let import driver

  seeds = [int(s) for s in config.compare.seeds]
  arms = tuple(config.compare.arms)
  arms = arms if "baseline" in arms else ("baseline",) + arms
  student, _ = driver.validate(config, check_teacher_source=False)
  teacher, teacher_params, teacher_info = driver.load_teacher(config, workdir, mesh, writer)
  steps = int(config.train.steps)

  def cell(c):
    arm, seed = c
    cfg = arm_config(config, arm, seed)
    driver.validate(cfg)
    r = driver.train_student(cfg, workdir, stages.cell_name(c), student=student, teacher=teacher,
                             teacher_params=teacher_params, mesh=mesh, writer=writer)
    return {"eval_steps": r["eval_steps"], "eval_ce": r["eval_ce"],
            "teacher_step_time_overhead": driver.teacher_step_time_overhead(r)}

  def summary(done: dict) -> dict:
    by_seed = {}
    for (arm, seed), r in done.items():
      by_seed.setdefault(seed, {})[arm] = (np.asarray(r["eval_steps"]), np.asarray(r["eval_ce"]))
    full = {s: c for s, c in by_seed.items() if all(a in c for a in arms)}  # seeds with every arm finished
    out = {"method": "let", "variant": config.variant, "comparison": True, "seeds": seeds, "arms": list(arms),
           "steps": steps, "s_stop": driver.s_stop(config), "teacher": teacher_info,
           "cells_finished": [stages.cell_name(c) for c in done],
           "teacher_step_time_overhead": {stages.cell_name(c): r["teacher_step_time_overhead"]
                                          for c, r in done.items()}}
    if full:
      out.update(table=summarize(full, arms, steps), curves=mean_curves(full, arms),
                 delta_curves=delta_curves(full, arms))
    return out

  def draw(done: dict) -> None:
    res = summary(done)
    if "curves" not in res:
      return
    k = len(res["table"]["per_seed"])

    def bands(cs):
      return {a: c["std"] for a, c in cs.items()} if k > 1 else None

    for name, cs, ylabel, title in (
        ("compare_eval_ce", res["curves"], "validation CE (nats)",
         f"LET arms, mean ± std over {k} seed(s) ({config.variant or 'default'})"),
        ("compare_delta_ce", res["delta_curves"], "validation CE − baseline's (nats)",
         f"paired difference to the baseline, mean ± std over {k} seed(s)")):
      if cs:
        png = plots.curves(plot_path(workdir, name), {a: (c["steps"], c["mean"]) for a, c in cs.items()},
                           bands=bands(cs), ylabel=ylabel, title=title)
        writer.image(f"plots/{name}", png, len(done))

  done = stages.sweep(workdir, [(arm, seed) for seed in seeds for arm in arms], cell, summary, after=draw)
  return summary(done)


def validate_block(compare_cfg) -> None:
  """What ``config.compare``'s declarations cannot say: its seeds and its arms each distinct."""
  from lmx.core.config import require

  seeds = list(compare_cfg.seeds)
  require(all(isinstance(s, int) for s in seeds) and len(set(seeds)) == len(seeds), "compare.seeds",
          f"must be distinct integers >= 0 (empty: one LET run, no comparison), got {seeds}")
  arms = list(compare_cfg.arms)
  require(len(set(arms)) == len(arms), "compare.arms", f"must be distinct arms from {list(ARMS)}, got {arms}")
