r"""LET vs baseline at equal seeds, data order and lr schedule (issue 13 item 5): arms × seeds, one shared teacher.

  python -m lmx.methods.let.compare --config=configs/let.py --seeds=0,1,2 --workdir=runs/let-compare
  python -m lmx.methods.let.compare --config=configs/let.py:smoke --seeds=0 --arms=baseline,let

Every arm is a ``let`` run of the same config with one change, seed ``s`` setting both ``seed`` (init, step
rngs) and ``data.shuffle_seed`` (data order), so within a seed the arms see identical initial weights and batches:
  baseline   λ0 = 0 (the same step; the teacher's forward is computed but weighs nothing)
  let        the config as given (late-to-early: teacher final layer -> student block ``let.student_layer``)
  l2l        late-to-late: the student's last block
  constant   λ = λ0 until S_stop (no linear decay)
  large      λ0 = 3
The teacher is pretrained once (``<workdir>/teacher``, an ``lm`` run) and restored params-only by every arm
(``teacher.source='run'``). Reported per seed and as mean ± std over seeds: each arm's final validation CE, and
the steps a non-baseline arm needs to reach the baseline's final validation CE (linear interpolation between
evaluations) with the speedup ``baseline steps / those steps``. Arms already finished in the workdir are reused.
"""
from __future__ import annotations

import ast
import copy
import importlib
import json
import os
import sys

import numpy as np

from lmx.core import metrics
from lmx.core.config import load_config_file

ARMS = ("baseline", "let", "l2l", "constant", "large")


def arm_config(config, arm: str, seed: int, teacher_dir: str):
  """The config of one arm at one seed (see the module docstring)."""
  c = copy.deepcopy(config)
  c.seed = int(seed)
  c.data.shuffle_seed = int(seed)
  c.teacher.source, c.teacher.workdir = "run", teacher_dir
  c.let.with_baseline = False  # the driver trains the baseline arm itself
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


def eval_curve(workdir: str) -> tuple[np.ndarray, np.ndarray]:
  """``(steps, eval CE)`` from a run's metrics.jsonl (last record per step)."""
  return metrics.curves(os.path.join(workdir, "metrics.jsonl"))["ce"]


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
  """``per_seed[seed][arm] = (steps, eval_ce)`` -> the table (per seed and mean/std over seeds)."""
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
      vals = [v for v in vals if v is not None]
      if vals:
        table["mean"].setdefault(arm, {})[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)),
                                                  "n": len(vals)}
    if arm != "baseline":
      reached = sum(table["per_seed"][str(s)][arm]["speedup"] is not None for s in per_seed)
      table["mean"].setdefault(arm, {})["seeds_reaching_baseline"] = f"{reached}/{len(per_seed)}"
  return table


def compare(config, workdir: str, seeds, arms=("baseline", "let")) -> dict:
  """Runs (or reuses) every arm × seed and writes ``<workdir>/compare.json`` and ``compare_eval_ce.png``."""
  from lmx.core import plots
  from lmx.train.lm import pretrain
  from lmx.methods.let import driver as let_run
  if "baseline" not in arms:
    arms = ("baseline",) + tuple(arms)
  os.makedirs(workdir, exist_ok=True)
  teacher_dir = pretrain(let_run.teacher_lm_config(config), os.path.join(workdir, "teacher"))
  per_seed, results = {}, {}
  for seed in seeds:
    per_seed[seed] = {}
    for arm in arms:
      wd = os.path.join(workdir, f"{arm}-s{seed}")
      if not os.path.exists(os.path.join(wd, "results.json")):
        c = arm_config(config, arm, seed, teacher_dir)
        let_run.validate(c)
        let_run.run(c, wd)
      results[f"{arm}-s{seed}"] = json.load(open(os.path.join(wd, "results.json")))
      per_seed[seed][arm] = eval_curve(wd)
  table = summarize(per_seed, arms, int(config.train.steps))
  out = {"config_variant": config.variant, "seeds": list(seeds), "arms": list(arms),
         "steps": int(config.train.steps), "s_stop": let_run.s_stop(config), "table": table,
         "teacher_eval_ce": results[f"let-s{seeds[0]}"]["teacher"]["eval_ce"] if "let" in arms else None,
         "teacher_step_overhead": {k: r.get("teacher_step_overhead") for k, r in results.items()}}
  out["curves"] = mean_curves(per_seed, arms)
  series = {arm: (c["steps"], c["mean"]) for arm, c in out["curves"].items()}
  bands = {arm: c["std"] for arm, c in out["curves"].items()} if len(seeds) > 1 else None
  plots.curves(os.path.join(workdir, "compare_eval_ce.png"), series, bands=bands, ylabel="validation CE (nats)",
               title=f"LET arms, mean ± std over {len(seeds)} seed(s) ({config.variant or 'default'})")
  out["delta_curves"] = delta_curves(per_seed, arms)
  if out["delta_curves"]:
    plots.curves(os.path.join(workdir, "compare_delta_ce.png"),
                 {arm: (c["steps"], c["mean"]) for arm, c in out["delta_curves"].items()},
                 bands={arm: c["std"] for arm, c in out["delta_curves"].items()} if len(seeds) > 1 else None,
                 ylabel="validation CE − baseline's (nats)",
                 title=f"paired difference to the baseline, mean ± std over {len(seeds)} seed(s)")
  with open(os.path.join(workdir, "compare.json"), "w") as f:
    json.dump(out, f, indent=1)
  return out


def delta_curves(per_seed: dict, arms) -> dict:
  """Per non-baseline arm: mean and std over seeds of (arm's validation CE − the same seed's baseline's) at the
  evaluation steps every run shares; < 0 where the arm is ahead."""
  out = {}
  for arm in arms:
    if arm == "baseline":
      continue
    runs = [(per_seed[s][arm], per_seed[s]["baseline"]) for s in per_seed]
    common = sorted(set.intersection(*(set(map(int, c[0])) & set(map(int, b[0])) for c, b in runs)))
    vals = np.array([[dict(zip(map(int, c[0]), c[1]))[k] - dict(zip(map(int, b[0]), b[1]))[k] for k in common]
                     for c, b in runs])
    out[arm] = {"steps": common, "mean": vals.mean(0).tolist(), "std": vals.std(0).tolist()}
  return out


def mean_curves(per_seed: dict, arms) -> dict:
  """Per arm: the validation-CE curve's mean and std over seeds at the evaluation steps all seeds share."""
  out = {}
  for arm in arms:
    curves = [per_seed[s][arm] for s in per_seed]
    common = sorted(set.intersection(*(set(int(x) for x in c[0]) for c in curves)))
    vals = np.array([[dict(zip(map(int, c[0]), c[1]))[k] for k in common] for c in curves])
    out[arm] = {"steps": common, "mean": vals.mean(0).tolist(), "std": vals.std(0).tolist()}
  return out


def main(argv=None) -> int:
  import argparse

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/let.py")
  p.add_argument("--workdir", required=True)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--arms", default="baseline,let")
  p.add_argument("--steps", type=int, default=0, help="override train.steps")
  p.add_argument("--eval_every", type=int, default=0, help="override train.eval_every (curve resolution)")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="override any config field, e.g. --set data.global_batch=16 (repeatable)")
  a = p.parse_args(argv)
  config = load_config_file(a.config)
  for item in a.set:
    field, eq, value = item.partition("=")
    if not eq:
      p.error(f"--set {item!r}: expected FIELD=VALUE")
    *parents, leaf = field.split(".")
    node = config
    for name in parents:
      node = node[name]
    if leaf not in node:
      p.error(f"--set {item!r}: the config has no field {field!r}")
    old = node[leaf]
    node[leaf] = type(old)(ast.literal_eval(value)) if not isinstance(old, str) else value
  if a.steps:
    config.train.steps = a.steps
  if a.eval_every:
    config.train.eval_every = a.eval_every
  seeds = [int(s) for s in a.seeds.split(",") if s]
  arms = tuple(x for x in a.arms.split(",") if x)
  for arm in arms:
    if arm not in ARMS:
      p.error(f"unknown arm {arm!r}; valid: {list(ARMS)}")
  out = compare(config, a.workdir, seeds, arms)
  print(json.dumps(out["table"]["mean"], indent=1))
  return 0


if __name__ == "__main__":
  from absl import flags

  flags.FLAGS(sys.argv[:1])  # Grain reads absl flags
  sys.exit(main(sys.argv[1:]))
