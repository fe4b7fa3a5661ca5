"""What every benchmark writes: the machine it ran on, and its results JSON rewritten after each run."""
from __future__ import annotations

import json
import os
import platform

import jax


def environment(**extra) -> dict:
  """Device, backend, jax version, host and CPU count (plus ``extra``), with an empty ``runs`` list."""
  return {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(), "jax": jax.__version__,
          "host": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), **extra, "runs": []}


def record(results: dict, run: dict, out: str) -> None:
  """Appends ``run``, prints it as one JSON line and rewrites ``out`` (a stopped benchmark keeps what it measured)."""
  results["runs"].append(run)
  print(json.dumps(run), flush=True)
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w") as f:
    json.dump(results, f, indent=1, default=str)
