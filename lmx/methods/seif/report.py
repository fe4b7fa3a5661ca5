"""SEIF's numbers over seeds (mean ± sample std with n, :func:`lmx.core.stages.mean_std`; paired differences to the
random-instruction baseline) and its plots."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from lmx.core import plots as plots_lib
from lmx.core.results import plot_path
from lmx.core.stages import mean_std


def round_metrics(rec: Mapping, levels: Sequence[int]) -> dict:
  """The scalars of one round record (evaluation per level, the pool's difficulty, the Instructor's reward)."""
  e = rec["eval"]
  out = {f"L{lv}/{k}": e.get(f"L{lv}/{k}") for lv in levels for k in ("adherence", "all_followed")}
  out["mean/adherence"] = e.get("mean/adherence")
  pool = rec.get("pool", {})
  for k in ("n_constraints", "filter_reject", "adherence_F0", "adherence_Fprev"):
    out[f"pool/{k}"] = pool.get(k)
  inst = rec.get("instructor", {})
  for k in ("reward_last", "filter_pass_last", "parsed_last", "n_constraints_last"):
    out[f"instructor/{k}"] = inst.get(k)
  return out


def summarize(per_seed: Mapping, variants: Sequence[str], levels: Sequence[int], n_rounds: int) -> dict:
  """``per_round[variant][metric]`` = list over rounds 0..R of :func:`mean_std` over the seeds that have the
  variant (a sweep in progress has some); ``final`` the last round; ``paired_vs_random[variant][metric]`` the
  per-seed difference to ``random`` at the last round over the seeds that have both."""
  per_round, final, paired = {}, {}, {}
  for v in variants:
    seeds = [s for s in per_seed if v in per_seed[s]["variants"]]
    if not seeds:
      continue
    rows = {s: [round_metrics(r, levels) for r in per_seed[s]["variants"][v]["rounds"]] for s in seeds}
    keys = list(rows[seeds[0]][0])
    per_round[v] = {k: [mean_std([rows[s][t][k] for s in seeds]) for t in range(n_rounds + 1)] for k in keys}
    final[v] = {k: per_round[v][k][-1] for k in keys}
  if "random" in variants:
    for v in variants:
      seeds = [s for s in per_seed if v in per_seed[s]["variants"] and "random" in per_seed[s]["variants"]]
      if v == "random" or not seeds:
        continue
      paired[v] = {}
      for lv in levels:
        k = f"L{lv}/adherence"
        d = [per_seed[s]["variants"][v]["rounds"][-1]["eval"][k] - per_seed[s]["variants"]["random"]["rounds"][-1]
             ["eval"][k] for s in seeds]
        paired[v][k] = {**mean_std(d), "per_seed": d}
  return {"per_round": per_round, "final": final, "paired_vs_random": paired}


def plots(results: Mapping, workdir: str) -> list[str]:
  """Held-out adherence per round (hard level and mean), the pools' difficulty per round, per-level bars."""
  s = results["summary"]["per_round"]
  variants, levels, hard = results["variants"], results["levels"], results["hard_level"]
  out = []
  for key, name, ylabel in ((f"L{hard}/adherence", "heldout_hard", f"held-out L{hard} adherence"),
                            ("mean/adherence", "heldout_mean", "held-out mean adherence"),
                            (f"L{hard}/all_followed", "heldout_hard_strict", f"held-out L{hard} all followed"),
                            ("pool/n_constraints", "proposal_constraints", "constraints per instruction (q_T)"),
                            ("pool/filter_reject", "proposal_conflicts", "share rejected by the Filter (q_T)"),
                            ("pool/adherence_F0", "proposal_difficulty", "F0 adherence on q_T (lower = harder)")):
    series, bands = {}, {}
    for v in variants:
      pts = [(t, m["mean"], m["std"] or 0.0) for t, m in enumerate(s[v][key]) if m["mean"] is not None]
      if pts:
        xs, ys, sd = zip(*pts)
        series[v], bands[v] = (xs, ys), sd
    if series:
      out.append(plots_lib.curves(plot_path(workdir, name), series, bands=bands, xlabel="round", ylabel=ylabel,
                                  title=f"SEIF: {ylabel} (mean ± sample std, n = {len(results['seeds'])} seeds)"))
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  w = 0.8 / max(1, len(variants))
  f = results["summary"]["final"]
  base = s[variants[0]]
  for i, v in enumerate(variants):
    ys = [f[v][f"L{lv}/adherence"]["mean"] for lv in levels]
    es = [f[v][f"L{lv}/adherence"]["std"] or 0.0 for lv in levels]
    ax.bar(np.arange(len(levels)) + i * w, ys, w, yerr=es, label=v)
  ax.plot(np.arange(len(levels)) + 0.4 - w / 2, [base[f"L{lv}/adherence"][0]["mean"] for lv in levels], "k_",
          markersize=20, label="F0 (SFT)")
  ax.set(xticks=np.arange(len(levels)) + 0.4 - w / 2, xticklabels=[f"{lv} constraints" for lv in levels],
         ylabel="held-out adherence (last round)", title="SEIF: held-out adherence per difficulty level")
  ax.legend()
  out.append(plots_lib.save_figure(fig, plot_path(workdir, "heldout_levels")))
  return out


def _cell(m, digits=3):
  """A table cell of a :func:`mean_std` dict: ``mean ± std`` (the table states n)."""
  if m is None or m.get("mean") is None:
    return "–"
  return f"{m['mean']:.{digits}f} ± " + ("n/a" if m.get("std") is None else f"{m['std']:.{digits}f}")


def markdown(results: Mapping) -> str:
  """The README tables of a results.json: held-out adherence per level per round per variant, the paired
  difference to ``random``, and the proposals' difficulty per round (mean ± sample std over the n seeds)."""
  s = results["summary"]
  variants, levels = results["variants"], results["levels"]
  n_rounds = len(next(iter(s["per_round"].values()))["mean/adherence"]) - 1
  hard = results["hard_level"]
  n = max(m["n"] for v in s["final"].values() for m in v.values())
  lines = [f"mean ± sample std (ddof = 1) over n = {n} seeds", "", "| variant | round | " + " | ".join(f"L{lv} adherence" for lv in levels) + " | mean | "
           f"L{hard} all followed |", "|---" * (len(levels) + 4) + "|"]
  for v in variants:
    for t in range(n_rounds + 1):
      pr = s["per_round"][v]
      lines.append(f"| {v} | {t} | " + " | ".join(_cell(pr[f'L{lv}/adherence'][t]) for lv in levels) +
                   f" | {_cell(pr['mean/adherence'][t])} | {_cell(pr[f'L{hard}/all_followed'][t])} |")
  out = ["\n".join(lines)]
  if s.get("paired_vs_random"):
    rows = ["| variant − random (last round) | " + " | ".join(f"L{lv}" for lv in levels) + " |",
            "|---" * (len(levels) + 1) + "|"]
    for v, d in s["paired_vs_random"].items():
      rows.append(f"| {v} | " + " | ".join(_cell(d[f'L{lv}/adherence']) for lv in levels) + " |")
    out.append("\n".join(rows))
  rows = ["| variant | round | constraints / instruction | rejected by the Filter | F0 adherence | F_{T-1} adherence "
          "| Instructor reward (last steps) | Instructor proposals passing the Filter |", "|---" * 8 + "|"]
  for v in variants:
    pr = s["per_round"][v]
    for t in range(1, n_rounds + 1):
      rows.append(f"| {v} | {t} | {_cell(pr['pool/n_constraints'][t], 2)} | {_cell(pr['pool/filter_reject'][t], 2)} | "
                  f"{_cell(pr['pool/adherence_F0'][t])} | {_cell(pr['pool/adherence_Fprev'][t])} | "
                  f"{_cell(pr['instructor/reward_last'][t])} | {_cell(pr['instructor/filter_pass_last'][t], 2)} |")
  out.append("\n".join(rows))
  return "\n\n".join(out)
