r"""Where one DATM meta-step spends its time, by XLA op category: a ``jax.profiler`` trace of one iteration of
``benchmarks/datm_step.py``'s build (rolled scan, per-step remat, hoisted DSA, im2col by default), its per-op
events summed by fusion kind (``ynn_fusion.12`` → ``ynn_fusion``; on XLA:CPU ``ynn_fusion`` are the matmuls).

    PYTHONPATH=. python benchmarks/datm_op_profile.py [--shape=w32_ipc10] [--out=benchmarks/results/datm_op_profile.json]

Times are summed over the threads that ran the ops, so they add to more than the wall time when ops overlap.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile

import jax

from benchmarks.common import environment, record
from benchmarks.datm_step import SHAPES, build


def op_totals(trace_dir: str) -> dict[str, float]:
  """Microseconds per op kind in the perfetto trace under ``trace_dir`` (runtime and Python events left out)."""
  path = glob.glob(trace_dir + "/**/*.trace.json.gz", recursive=True)[0]
  ev = json.load(gzip.open(path))
  tot = collections.Counter()
  for e in ev["traceEvents"] if isinstance(ev, dict) else ev:
    if e.get("ph") == "X" and not e["name"].startswith(("Thunk", "$")):
      tot[re.sub(r"\.\d+$", "", e["name"])] += e.get("dur", 0)
  return dict(tot)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shape", default="w32_ipc10", choices=sorted(SHAPES))
  ap.add_argument("--conv", default="im2col")
  ap.add_argument("--out", default="benchmarks/results/datm_op_profile.json")
  args = ap.parse_args()
  b = build(SHAPES[args.shape], unroll=False, remat=True, conv=args.conv, hoist=True)
  state, p0, p1, key = b["args"]
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d, create_perfetto_trace=True)
    jax.block_until_ready(b["compiled"](state, p0, p1, key))
    jax.profiler.stop_trace()
    tot = op_totals(d)
  total = sum(tot.values())
  top = sorted(tot.items(), key=lambda kv: -kv[1])[:20]
  results = environment(shape=args.shape, **b["info"])
  record(results, {"total_op_ms": round(total / 1e3, 1),
                   "by_kind": [{"kind": k, "ms": round(v / 1e3, 1), "fraction": round(v / total, 3)} for k, v in top]},
         args.out)
  for k, v in top[:12]:
    print(f"{v / 1e3:9.1f} ms {100 * v / total:5.1f} %  {k}")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
