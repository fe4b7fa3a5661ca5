r"""Which offline image sets leave room for "lossless" distillation: the test-accuracy gap between a ConvNet trained
on the full training split and on a random 10 % of it (stratified), with DATM's evaluation recipe.

  PYTHONPATH=. python experiments/datm/subset_gap.py --datasets=digits,mnist5k --seeds=0,1 \
      --out=experiments/datm/results/subset_gap.json

A set is useful for DATM's IPC-large claim when the 10 % subset is >= 3 points below full data (issue 29 item 3):
otherwise random real images at that size are already "lossless" and distillation cannot show the difference. Per
dataset and seed: ``eval.num`` nets trained from the seed's named random streams on the full split and on that
seed's random subset (the same inits: paired), ``eval.epochs`` epochs with DSA, lr ``eval.lr_real`` — the datm
config's evaluation (``configs/datm.py``; the digits set uses the smoke variant's smaller ConvNet).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from configs import datm as datm_config  # noqa: E402
from lmx.core.stages import mean_std  # noqa: E402
from lmx.datasets import images  # noqa: E402
from lmx.methods.datm import dsa  # noqa: E402
from lmx.methods.datm.evaluate import random_subset, train_and_test  # noqa: E402


def gap(dataset: str, seed: int, *, fraction: float, nets: int, epochs: int) -> dict:
  c = datm_config.get_config("smoke" if dataset == "digits" else "")
  data = images.get_dataset(dataset)
  k = data.num_classes
  onehot = np.eye(k, dtype=np.float32)
  per_class = int(round(fraction * len(data.y_train_N) / k))
  idx = random_subset(np.random.default_rng(seed), data.y_train_N, k, per_class)
  kw = dict(num_classes=k, model_cfg=c.model, num_nets=nets, epochs=epochs, lr=c.eval.lr_real, batch=c.eval.batch,
            dsa_strategy=dsa.parse_strategy(c.data.dsa_strategy))
  t0 = time.time()
  full = train_and_test(seed, data.x_train_NHWC, onehot[data.y_train_N], data.x_test_NHWC, data.y_test_N, **kw)
  sub = train_and_test(seed, data.x_train_NHWC[idx], onehot[data.y_train_N[idx]], data.x_test_NHWC, data.y_test_N,
                       **kw)
  return dict(dataset=dataset, seed=seed, train_images=int(len(data.y_train_N)), subset_images=int(len(idx)),
              full=mean_std(np.asarray(full).tolist()), subset=mean_std(np.asarray(sub).tolist()),
              paired_gap=mean_std((np.asarray(full) - np.asarray(sub)).tolist()), seconds=time.time() - t0)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--datasets", default="digits,mnist5k")
  ap.add_argument("--seeds", default="0,1")
  ap.add_argument("--fraction", type=float, default=0.1)
  ap.add_argument("--nets", type=int, default=3)
  ap.add_argument("--epochs", type=int, default=150)
  ap.add_argument("--out", default="")
  a = ap.parse_args(argv)
  rows = []
  for name in a.datasets.split(","):
    for s in (int(x) for x in a.seeds.split(",")):
      r = gap(name, s, fraction=a.fraction, nets=a.nets, epochs=a.epochs)
      rows.append(r)
      print(f"{name} seed {s}: full {100 * r['full']['mean']:.1f} ± {100 * (r['full']['std'] or 0):.1f}, "
            f"{r['subset_images']} images {100 * r['subset']['mean']:.1f} ± {100 * (r['subset']['std'] or 0):.1f}, "
            f"gap {100 * r['paired_gap']['mean']:.1f} points ({r['seconds']:.0f} s)", flush=True)
  summary = {}
  for name in a.datasets.split(","):
    gaps = [r["paired_gap"]["mean"] for r in rows if r["dataset"] == name]
    summary[name] = dict(gap_over_seeds=mean_std(gaps), useful=bool(np.mean(gaps) >= 0.03))
  out = dict(fraction=a.fraction, nets=a.nets, epochs=a.epochs, runs=rows, summary=summary)
  if a.out:
    with open(a.out, "w") as f:
      json.dump(out, f, indent=1)
    print(f"wrote {a.out}")
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
