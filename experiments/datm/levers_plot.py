r"""Bar chart of every evaluation arm (mean ± std over the evaluation networks) for a list of DATM runs: what the
image updates (images_only) and the label updates (labels_only) add to the initial set, per run.

  PYTHONPATH=. python experiments/datm/levers_plot.py --out=experiments/datm/results/levers.png \
      "lr_img 10=experiments/datm/results/levers_lr_img10_seed0.json" ...
"""
from __future__ import annotations

import argparse
import json

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ARMS = ("random", "initial", "images_only", "labels_only", "distilled", "full")


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("runs", nargs="+", help="label=path/to/results.json")
  ap.add_argument("--out", required=True)
  ap.add_argument("--title", default="DATM, MNIST-5k IPC 10: test accuracy by evaluation arm")
  a = ap.parse_args()
  runs = [(s.rsplit("=", 1)[0], json.load(open(s.rsplit("=", 1)[1]))) for s in a.runs]
  width = 0.8 / len(ARMS)
  fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(runs), 4))
  for j, arm in enumerate(ARMS):
    means = [100 * r[arm]["mean"] if arm in r else np.nan for _, r in runs]
    stds = [100 * r[arm]["std"] if arm in r else 0.0 for _, r in runs]
    ax.bar(np.arange(len(runs)) + (j - len(ARMS) / 2 + 0.5) * width, means, width, yerr=stds, capsize=2, label=arm)
  ax.set_xticks(np.arange(len(runs)))
  ax.set_xticklabels([name for name, _ in runs])
  lo = min(100 * r[arm]["mean"] for _, r in runs for arm in ARMS if arm in r)
  ax.set_ylim(lo - 2, None)
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(a.title, fontsize=10)
  ax.legend(fontsize=7, ncol=3)
  fig.tight_layout()
  fig.savefig(a.out, dpi=120)
  print(f"wrote {a.out}")


if __name__ == "__main__":
  main()
