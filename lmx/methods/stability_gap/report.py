"""Stability-gap statistics of evaluation curves, and their mean ± std over seeds.

For a metric that should stay low (a loss) the *drop* is its rise above the start value; for one that should stay
high (a probe accuracy) it is the fall below it. ``steps to recover``: the first evaluation after the worst point
at which the metric is back to (within) its start value, None when it never is.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


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


def mean_std(values: Sequence[float | None]) -> dict:
  """``{mean, std, n}`` over the non-None values (population std, as the other experiment pages report)."""
  x = [float(v) for v in values if v is not None]
  if not x:
    return {"mean": None, "std": None, "n": 0}
  return {"mean": float(np.mean(x)), "std": float(np.std(x)), "n": len(x)}


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
  whether the difference of the means exceeds the seeds' noise (the larger of the two stds)."""
  a = np.array([per_seed[s][reference][key] for s in per_seed], float)
  b = np.array([per_seed[s][strategy][key] for s in per_seed], float)
  per = [float(1 - y / x) if x > 0 else None for x, y in zip(a, b)]
  ma, mb = float(a.mean()), float(b.mean())
  noise = float(max(a.std(), b.std()))
  return {"per_seed": per, "of_means": float(1 - mb / ma) if ma > 0 else None, "reference_mean": ma,
          "strategy_mean": mb, "difference": ma - mb, "noise_std": noise,
          "beyond_noise": bool(len(a) > 1 and abs(ma - mb) > noise)}
