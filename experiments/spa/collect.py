"""Collects a stopped SPA run's finished seeds from its console log and per-arm metrics.jsonl files.

  python experiments/spa/collect.py --log runs/spa.log --workdir runs/spa --out experiments/spa/results

The driver writes results.json after every seed; a run started before that change (or killed inside a seed)
leaves only its log lines ``[spa sS] ARM: held-out success X, grounding Y after N env steps`` and the per-arm
``<workdir>/<arm>-s<seed>/metrics.jsonl`` (``<arm>/eval_success`` at each evaluation). This script rebuilds the
per-arm mean ± std over the seeds whose five arms all finished, and the learning curves, from those files.
"""
from __future__ import annotations

import argparse
import json
import os
import re

import numpy as np

LINE = re.compile(r"\[spa s(\d+)\] (\w+): held-out success ([\d.]+), grounding ([\d.]+) after (\d+) env steps")
EST = re.compile(r"\[spa s(\d+)\] estimator: train mse ([\d.]+) -> ([\d.]+); held-out corr\(Σĉ, R\) ([-\d.na]+), "
                 r"ĉ progress ([-\d.na]+) vs other ([-\d.na]+)")
SFT = re.compile(r"\[spa s(\d+)\] SFT on (\d+) expert steps: \{'acc': ([\d.]+)")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--log", required=True)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--out", required=True)
  ap.add_argument("--arms", default="sft,outcome,grounding,spa,rloo")
  a = ap.parse_args()
  arms = a.arms.split(",")
  text = open(a.log).read()
  per = {}
  for s, arm, succ, gr, steps in LINE.findall(text):
    per.setdefault(int(s), {})[arm] = {"success": float(succ), "grounding": float(gr), "env_steps": int(steps)}
  seeds = sorted(s for s, d in per.items() if all(x in d for x in arms))
  est = {int(m[0]): {"train_mse_first": float(m[1]), "train_mse_last": float(m[2]), "corr_sum_vs_R": m[3],
                     "mean_c_progress": float(m[4]), "mean_c_nonprogress": float(m[5])} for m in EST.findall(text)}
  sft = {int(m[0]): {"expert_steps": int(m[1]), "train_acc_last_batch": float(m[2])} for m in SFT.findall(text)}

  def ms(xs):
    xs = np.asarray(xs, float)
    return {"mean": float(xs.mean()), "std": float(xs.std(ddof=1)) if len(xs) > 1 else None, "n": len(xs),
            "values": xs.tolist()}

  out = {"method": "spa", "source": "collected from the console log and metrics.jsonl of a stopped run",
         "seeds": seeds, "arms": {}, "paired": {}, "estimator": {str(s): est[s] for s in seeds if s in est},
         "sft": {str(s): sft[s] for s in seeds if s in sft}, "per_seed": {str(s): per[s] for s in seeds}}
  for arm in arms:
    out["arms"][arm] = {k: ms([per[s][arm][k] for s in seeds]) for k in ("success", "grounding", "env_steps")}
  for arm in arms:
    if arm != "spa":
      out["paired"][f"spa_minus_{arm}_success"] = ms([per[s]["spa"]["success"] - per[s][arm]["success"]
                                                      for s in seeds])
  curves = {}
  for arm in arms:
    cs = []
    for s in seeds:
      pts = [(0, per[s]["sft"]["success"])]
      path = os.path.join(a.workdir, f"{arm}-s{s}", "metrics.jsonl")
      if arm != "sft" and os.path.exists(path):
        for line in open(path):
          d = json.loads(line)
          if f"{arm}/eval_success" in d:
            pts.append((d["step"], d[f"{arm}/eval_success"]))
      else:
        pts.append((per[s][arm]["env_steps"] or per[s]["outcome"]["env_steps"], per[s][arm]["success"]))
      cs.append(pts)
    curves[arm] = cs
  out["curves"] = curves
  os.makedirs(a.out, exist_ok=True)
  with open(os.path.join(a.out, "results.json"), "w") as f:
    json.dump(out, f, indent=1)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for arm, cs in curves.items():
    n = min(len(c) for c in cs)
    xs = np.mean([[p[0] for p in c[:n]] for c in cs], 0)
    ys = np.array([[p[1] for p in c[:n]] for c in cs])
    ax.plot(xs, ys.mean(0), marker="o", label=arm)
    if len(cs) > 1:
      ax.fill_between(xs, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), alpha=0.15)
  ax.set(xlabel="environment steps (SPA's include its exploration)", ylabel="held-out success (greedy)",
         title=f"TextWorld held-out games, seeds {seeds}")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.savefig(os.path.join(a.out, "learning_curves.png"), dpi=120, bbox_inches="tight")
  print(json.dumps({k: v for k, v in out.items() if k in ("seeds", "arms", "paired", "estimator")}, indent=1))


if __name__ == "__main__":
  main()
