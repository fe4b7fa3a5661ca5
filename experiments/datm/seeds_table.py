r"""Summarises DATM runs over seeds: each arm's mean ± std over the K evaluation networks, the paired difference
of two arms (per network: same initialisation, order and augmentation streams), and the mean ± std over seeds (all
``lmx.core.stages.mean_std``: the sample std, n stated).

  PYTHONPATH=. python experiments/datm/seeds_table.py runs/datm_s0 runs/datm_s1 runs/datm_s2 \
      --out=experiments/datm/results/ipc10_seeds.json
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from lmx.core.stages import mean_std

ARMS = ("distilled", "initial", "images_only", "labels_only", "random", "full")


def paired(a: list[float], b: list[float]) -> dict:
  """Per-network differences a − b (networks k of both arms share their random streams), with the paired t-test:
  t = mean(d) / (std(d, ddof=1) / √K) and its two-sided p-value on K − 1 degrees of freedom."""
  from scipy import stats

  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  k = len(d)
  sd = float(d.std(ddof=1)) if k > 1 else float("nan")
  if k < 2:
    t = p = None
  elif sd == 0:
    t, p = (None, 1.0) if d.mean() == 0 else (float("inf") * np.sign(d.mean()), 0.0)
  else:
    t = float(d.mean() / (sd / np.sqrt(k)))
    p = float(2 * stats.t.sf(abs(t), df=k - 1))
  return {**mean_std(d.tolist()), "min": float(d.min()), "t": t, "p_two_sided": p}


def _pct(ms: dict, digits: int = 1, sign: str = "") -> str:
  """``"94.1 ± 0.7 (n=5)"`` in percent."""
  std = "n/a" if ms["std"] is None else f"{100 * ms['std']:.{digits}f}"
  return f"{100 * ms['mean']:{sign}.{digits}f} ± {std} (n={ms['n']})"


def one(workdir: str) -> dict:
  r = json.load(open(os.path.join(workdir, "results.json")))
  out = {"workdir": workdir, "seed": r.get("seed"), "wall_s": r["wall_s"],
         "seconds_per_iteration": r["seconds_per_iteration"], "compile_wall_s": r["compile_wall_s"],
         "eval_wall_s": r["eval_wall_s"], "experts_wall_s": r["experts_wall_s"],
         "peak_rss_bytes": r["peak_rss_bytes"]}
  for arm in ARMS:
    if arm in r:
      out[arm] = {k: r[arm][k] for k in ("mean", "std", "n", "values")}
  for other in ("random", "initial"):
    if other in r:
      out[f"distilled_minus_{other}"] = paired(r["distilled"]["values"], r[other]["values"])
      comb = float(np.hypot(r["distilled"]["std"], r[other]["std"]))
      out[f"distilled_minus_{other}"]["combined_std_quadrature"] = comb
      # the margin of the means in units of the combined std (the bar: > 2 over random, > 0 over initial)
      x = out[f"distilled_minus_{other}"]
      x["in_combined_stds"] = float((r["distilled"]["mean"] - r[other]["mean"]) / comb) if comb > 0 else None
      # issue 29's bar: above the other arm by ≥ 2 combined stds, or a paired t-test over the nets at p < 0.05
      x["beyond_noise"] = bool(x["mean"] > 0 and ((x["in_combined_stds"] or 0) >= 2
                                                  or (x["p_two_sided"] is not None and x["p_two_sided"] < 0.05)))
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("workdirs", nargs="+")
  ap.add_argument("--out", default="")
  a = ap.parse_args(argv)
  runs = [one(w) for w in a.workdirs]
  over = {}
  for key in ARMS + ("distilled_minus_random", "distilled_minus_initial"):
    vals = [r[key]["mean"] for r in runs if key in r]
    if vals:
      over[key] = mean_std(vals)
  res = {"runs": runs, "over_seeds": over,
         "beyond_noise_over_initial": [r["distilled_minus_initial"]["beyond_noise"] for r in runs
                                       if "distilled_minus_initial" in r]}
  for r in runs:
    line = " | ".join(f"{k} {_pct(r[k])}" for k in ARMS if k in r)
    dr = r.get("distilled_minus_random")
    di = r.get("distilled_minus_initial")
    print(f"seed {r['seed']}: {line} | d−r {_pct(dr, 2, '+')} (paired; combined std "
          f"{100 * dr['combined_std_quadrature']:.2f}, {dr['in_combined_stds']:.2f}×) | "
          f"d−i {_pct(di, 2, '+')} (paired t-test p = {di['p_two_sided']:.2g}; beyond noise: {di['beyond_noise']}) | "
          f"{r['wall_s']:.0f} s")
  print("over seeds:", {k: _pct(v, 2) for k, v in over.items()})
  if a.out:
    with open(a.out, "w") as f:
      json.dump(res, f, indent=1)
  return res


if __name__ == "__main__":
  main()
