r"""Summarises DATM runs over seeds: each arm's mean ± std over the K evaluation networks, the paired difference
of two arms (per network: same initialisation, order and augmentation streams), and the mean ± std over seeds.

  PYTHONPATH=. python experiments/datm/seeds_table.py runs/datm_s0 runs/datm_s1 runs/datm_s2 \
      --out=experiments/datm/results/ipc10_seeds.json
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

ARMS = ("distilled", "initial", "images_only", "labels_only", "random", "full")


def paired(a: list[float], b: list[float]) -> dict:
  """Per-network differences a − b (networks k of both arms share their random streams)."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  return {"mean": float(d.mean()), "std": float(d.std()), "min": float(d.min()), "all": d.tolist()}


def one(workdir: str) -> dict:
  r = json.load(open(os.path.join(workdir, "results.json")))
  out = {"workdir": workdir, "seed": r.get("seed"), "total_seconds": r["total_seconds"],
         "seconds_per_iteration": r["seconds_per_iteration"], "compile_seconds": r["compile_seconds"],
         "eval_seconds": r["eval_seconds"], "experts_seconds": r["experts"]["seconds_this_run"],
         "peak_rss_bytes": r["peak_rss_bytes"]}
  for arm in ARMS:
    if arm in r:
      out[arm] = {k: r[arm][k] for k in ("mean", "std", "all")}
  for other in ("random", "initial"):
    if other in r:
      out[f"distilled_minus_{other}"] = paired(r["distilled"]["all"], r[other]["all"])
      comb = float(np.hypot(r["distilled"]["std"], r[other]["std"]))
      out[f"distilled_minus_{other}"]["combined_std_quadrature"] = comb
      # the margin of the means in units of the combined std (issue 12's bar: > 2 over random, > 0 over initial)
      out[f"distilled_minus_{other}"]["in_combined_stds"] = (
          float((r["distilled"]["mean"] - r[other]["mean"]) / comb) if comb > 0 else None)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("workdirs", nargs="+")
  ap.add_argument("--out", default="")
  a = ap.parse_args()
  runs = [one(w) for w in a.workdirs]
  over = {}
  for key in ARMS + ("distilled_minus_random", "distilled_minus_initial"):
    vals = [r[key]["mean"] for r in runs if key in r]
    if vals:
      over[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)}
  res = {"runs": runs, "over_seeds": over}
  for r in runs:
    line = " | ".join(f"{k} {100 * r[k]['mean']:.1f}±{100 * r[k]['std']:.1f}" for k in ARMS if k in r)
    dr = r.get("distilled_minus_random")
    di = r.get("distilled_minus_initial")
    print(f"seed {r['seed']}: {line} | d−r {100 * dr['mean']:+.2f}±{100 * dr['std']:.2f} (paired; combined std "
          f"{100 * dr['combined_std_quadrature']:.2f}, {dr['in_combined_stds']:.2f}×) | "
          f"d−i {100 * di['mean']:+.2f}±{100 * di['std']:.2f} | "
          f"{r['total_seconds']:.0f} s")
  print("over seeds:", {k: f"{100 * v['mean']:.2f}±{100 * v['std']:.2f}" for k, v in over.items()})
  if a.out:
    with open(a.out, "w") as f:
      json.dump(res, f, indent=1)
  return res


if __name__ == "__main__":
  main()
