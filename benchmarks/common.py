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


# Dense peak FLOP/s per device by (device_kind substring, matmul precision): public spec-sheet numbers, without
# sparsity. Matched in order, so longer names come before their prefixes ("TPU v5 lite" before "TPU v5").
SPEC_PEAK_FLOPS = (
    ("H200", {"bfloat16": 989e12, "float16": 989e12, "tf32": 494.7e12, "float32": 66.9e12}),
    ("H100", {"bfloat16": 989e12, "float16": 989e12, "tf32": 494.7e12, "float32": 66.9e12}),
    ("A100", {"bfloat16": 312e12, "float16": 312e12, "tf32": 156e12, "float32": 19.5e12}),
    ("TPU v6", {"bfloat16": 918e12}),
    ("TPU v5 lite", {"bfloat16": 197e12}),
    ("TPU v5e", {"bfloat16": 197e12}),
    ("TPU v5", {"bfloat16": 459e12}),
    ("TPU v4", {"bfloat16": 275e12}),
)
# TPUs run float32 matmuls as several bfloat16 passes: 3 for "high" (bf16_3x), 6 for "highest" (bf16_6x).
_TPU_PASSES = {"bf16_3x": 3, "bf16_6x": 6}


def matmul_precision(dtype, backend: str | None = None, default_precision: str | None = None) -> str:
  """The arithmetic a matmul of ``dtype`` inputs really runs in on ``backend`` under JAX's default precision.

  16-bit inputs run in their own type. float32 follows ``jax_default_matmul_precision`` (``default_precision``,
  default: the current config value): by default JAX leans to speed, TF32 tensor cores on GPUs and one bfloat16
  pass on TPUs; "high"/"tensorfloat32" is TF32 on GPU and 3 bfloat16 passes on TPU; "highest"/"float32" is
  true float32 on GPU and 6 passes on TPU. CPUs compute float32 as float32.
  """
  import jax.numpy as jnp
  backend = backend or jax.default_backend()
  backend = {"cuda": "gpu", "rocm": "gpu"}.get(backend, backend)
  dt = jnp.dtype(dtype)
  if dt in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return dt.name
  if default_precision is None:
    default_precision = jax.config.jax_default_matmul_precision
  level = str(default_precision or "default").lower()
  if backend == "cpu":
    return "float32"
  if level in ("default", "fastest", "bfloat16"):
    return "bfloat16" if backend == "tpu" else "tf32"
  if level in ("high", "tensorfloat32", "bfloat16_3x"):
    return "bf16_3x" if backend == "tpu" else "tf32"
  return "bf16_6x" if backend == "tpu" else "float32"


def spec_peak_flops(device_kind: str, precision: str) -> float | None:
  """Spec-sheet dense peak FLOP/s of one ``device_kind`` device at ``precision`` (:func:`matmul_precision`);
  None when the device is not in :data:`SPEC_PEAK_FLOPS` (e.g. CPUs: use :func:`measured_matmul_peak`)."""
  for name, peaks in SPEC_PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      if precision in _TPU_PASSES and "bfloat16" in peaks:
        return peaks["bfloat16"] / _TPU_PASSES[precision]
      return peaks.get(precision)
  return None


def measured_matmul_peak(dtype="float32", n: int | None = None, steps: int = 5) -> dict:
  """FLOP/s of a jitted [n, n] @ [n, n] matmul in ``dtype`` on the default device, median of ``steps`` timed
  calls after a warm-up: the matmul peak this machine reaches in this run, to compare a step's FLOP/s against
  (spec sheets have no number for CPUs, and a shared CPU's speed changes between runs)."""
  import time
  import jax.numpy as jnp
  import numpy as np
  n = n or (1024 if jax.default_backend() == "cpu" else 8192)
  x = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(x))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(x))
    times.append(time.perf_counter() - t0)
  med = float(np.median(times))
  return {"n": n, "dtype": jnp.dtype(dtype).name, "seconds_median": med, "flops_per_sec": 2.0 * n ** 3 / med}
