"""Stability-gap statistics of evaluation curves, and their mean ± std over seeds (:func:`lmx.core.stages.mean_std`:
the sample std, n stated).

For a metric that should stay low (a loss) the *drop* is its rise above the start value; for one that should stay
high (a probe accuracy) it is the fall below it. ``steps to recover``: the first evaluation after the worst point
at which the metric is back to (within) its start value, None when it never is.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from lmx.core.stages import mean_std


def gap_stats(steps: Sequence[int], values: Sequence[float], *, higher_is_better: bool) -> dict:
  """``{start, final, max_drop, worst_step, recover_step}`` of one curve whose first point is the start."""
  s, v = np.asarray(steps, float), np.asarray(values, float)
  if len(v) < 1:
    raise ValueError("an empty curve has no gap")
  sign = -1.0 if higher_is_better else 1.0
  drop = sign * (v - v[0])  # > 0: worse than at the start
  worst = int(np.argmax(drop))
  after = np.nonzero(drop[worst + 1:] <= 0)[0] if drop[worst] > 0 else np.array([], int)
  recover = float(s[worst + 1 + after[0]]) if len(after) else (float(s[0]) if drop[worst] <= 0 else None)
  return {"start": float(v[0]), "final": float(v[-1]), "max_drop": float(max(drop[worst], 0.0)),
          "worst_step": float(s[worst]), "recover_step": recover}


def summarize(per_seed: Mapping[int, Mapping[str, dict]], keys: Sequence[str]) -> dict:
  """``per_seed[seed][strategy][key] = value`` -> ``{strategy: {key: mean_std}}``; ``recover_step`` keys also
  count the seeds that recover (``"<k>/<n>"``)."""
  strategies = list(next(iter(per_seed.values())))
  out = {}
  for st in strategies:
    row = {}
    for k in keys:
      vals = [per_seed[s][st].get(k) for s in per_seed]
      row[k] = mean_std(vals)
      if k.endswith("recover_step"):
        row[k]["recovered"] = f"{sum(v is not None for v in vals)}/{len(vals)}"
    out[st] = row
  return out


def reduction(per_seed: Mapping[int, Mapping[str, dict]], key: str, strategy: str, reference: str) -> dict:
  """``1 − key[strategy] / key[reference]`` per seed and of the seed means (None where the reference is 0), and
  whether the difference of the means exceeds the seeds' noise (the larger of the two sample stds; with one seed
  there is no noise estimate and nothing is beyond it)."""
  a = np.array([per_seed[s][reference][key] for s in per_seed], float)
  b = np.array([per_seed[s][strategy][key] for s in per_seed], float)
  per = [float(1 - y / x) if x > 0 else None for x, y in zip(a, b)]
  ma, mb = float(a.mean()), float(b.mean())
  stds = [mean_std(a)["std"], mean_std(b)["std"]]
  noise = float(max(stds)) if None not in stds else None
  return {"per_seed": per, "of_means": float(1 - mb / ma) if ma > 0 else None, "reference_mean": ma,
          "strategy_mean": mb, "difference": ma - mb, "noise_std": noise,
          "beyond_noise": bool(noise is not None and abs(ma - mb) > noise)}


def _pm(ms: dict, digits: int = 3) -> str:
  if ms.get("mean") is None:
    return "–"
  if ms.get("std") is None:
    return f"{ms['mean']:.{digits}f}"
  return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def markdown(results: dict) -> str:
  """The per-strategy table of a run's results.json (mean ± std over its seeds) as Markdown."""
  s = results["summary"]
  n = len(results["seeds"])
  rows = ["| strategy | max general CE rise | general CE recovered (seeds; mean step) | max general probe acc drop "
          "| max general probe margin drop | margin recovered (seeds; mean step) | final general CE | final domain CE "
          "| final domain probe margin | rel. update bottom/top (first → final eval) |",
          "|---|---|---|---|---|---|---|---|---|---|"]

  def rec(ms):
    return f"{ms['recovered']}" + (f"; {ms['mean']:.0f}" if ms["mean"] is not None else "")

  for st in results["strategies"]:
    r = s[st]
    rows.append(f"| {st} | {_pm(r['general_ce_max_drop'])} | {rec(r['general_ce_recover_step'])} | "
                f"{_pm(r['probe_general_acc_max_drop'])} | {_pm(r['probe_general_margin_max_drop'], 4)} | "
                f"{rec(r['probe_general_margin_recover_step'])} | {_pm(r['general_ce_final'])} | "
                f"{_pm(r['domain_ce_final'])} | {_pm(r['probe_domain_margin_final'], 4)} | "
                f"{_pm(r['relupd_ratio_first'], 2)} → {_pm(r['relupd_ratio_final'], 2)} |")
  out = "\n".join(rows) + f"\n\n(mean ± sample std over n = {n} seed(s); CE in nats per byte)\n"
  for st, red in results.get("drop_reduction_vs_full", {}).items():
    g = red["general_ce"]
    per = ", ".join("–" if v is None else f"{v:.2f}" for v in g["per_seed"])
    of = "–" if g["of_means"] is None else f"{g['of_means']:.2f}"
    noise = "n/a (one seed)" if g["noise_std"] is None else f"{g['noise_std']:.3f}"
    out += (f"\n- {st} vs full, max general CE rise: reduction {of} of the means (per seed {per}); difference "
            f"{g['difference']:.3f} vs seed noise (larger std) {noise}: "
            f"{'beyond' if g['beyond_noise'] else 'NOT beyond'} the noise")
  return out + "\n"
