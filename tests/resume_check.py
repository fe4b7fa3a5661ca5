"""Shared checks of the runtime's promises for any method's config, run as a user runs it (``launch/run.py``).

``check_sigterm_resume``: SIGTERM right after the first checkpoint (the process signals itself through the loop's
``LMX_FAULT=sigterm_after_save:1``, so the timing is deterministic; ``save=n`` for the n-th, e.g. one inside a later
stage) → exit 143, ``run.json`` ``interrupted``, one line on stderr → the same command again → exit 0 and a
results.json equal to an uninterrupted run's, apart from wall-clock fields and the process's peak memory.

``check_nan_stops``: ``LMX_FAULT=nan:<loop name>:<k>`` makes the named loop see a NaN loss at step k → exit 2, one
line naming the step, ``run.json`` ``failed``, and the checkpoints written before it kept.
"""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "launch", "run.py")

# wall-clock fields and the process's peak memory (they differ between any two runs), and where a run resumed from
# (provenance, not a result)
TIMING = re.compile(r"(^|_)(wall|seconds|secs|time|elapsed|per_sec|steps_per_sec|tokens_per_sec|peak)(_|$)|_s$|"
                    r"^t_|^resumed_from")


def env(**extra) -> dict:
  e = dict(os.environ, LMX_NO_PROGRESS="1", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  if os.environ.get("LMX_TEST_XLA_CACHE"):  # one compilation cache per test process (tests/conftest.py)
    e.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ["LMX_TEST_XLA_CACHE"],
                                                           os.environ.get("PYTEST_XDIST_WORKER", "main")))
    e.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # the small programs too, as the launcher does
  e.pop("LMX_FAULT", None)
  e.pop("LMX_ALLOW_FRESH_START", None)
  e.update(extra)
  return e


def run(config: str, workdir, *overrides: str, timeout: int = 900, **env_extra) -> subprocess.CompletedProcess:
  """``python launch/run.py --config=<config> --workdir=<workdir> <overrides>``."""
  cmd = [sys.executable, RUN, f"--config={config}", f"--workdir={workdir}", *overrides]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(**env_extra), cwd=ROOT)


def reference_run(tmp_path_factory, name: str, config: str, *overrides: str, timeout: int = 900):
  """``(workdir, completed process)`` of one uninterrupted run of ``config`` in a fresh ``<tmp>/<name>/uninterrupted``
  (what a module-scoped fixture shares as the reference of its resume tests); fails the test unless it exits 0."""
  work = tmp_path_factory.mktemp(name) / "uninterrupted"
  r = run(config, work, *overrides, timeout=timeout)
  assert r.returncode == 0, fail(r, f"uninterrupted run of {config}")
  return work, r


def without_timing(x):
  """``x`` without the wall-clock and resume-provenance fields (recursively)."""
  if isinstance(x, dict):
    return {k: without_timing(v) for k, v in x.items() if not TIMING.search(str(k))}
  if isinstance(x, list):
    return [without_timing(v) for v in x]
  return x


def results(workdir) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def record(workdir) -> dict:
  with open(os.path.join(workdir, "run.json")) as f:
    return json.load(f)


def checkpoints(workdir) -> list[str]:
  """Every finished checkpoint step directory under ``<workdir>/checkpoints`` (any stage)."""
  return sorted(os.path.dirname(p) for p in glob.glob(os.path.join(str(workdir), "checkpoints", "**",
                                                                   "_CHECKPOINT_METADATA"), recursive=True))


def fail(r: subprocess.CompletedProcess, what: str) -> str:
  return f"{what}: rc={r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"


def check_layout(workdir, *, plots: bool = True) -> None:
  """The files every method's workdir holds."""
  for name in ("run.json", "results.json", "metrics.jsonl"):
    assert os.path.isfile(os.path.join(workdir, name)), f"{name} missing in {workdir}"
  assert glob.glob(os.path.join(str(workdir), "tb", "events.out.tfevents.*")), f"no TensorBoard events in {workdir}"
  assert checkpoints(workdir), f"no checkpoints in {workdir}"
  if plots:
    assert glob.glob(os.path.join(str(workdir), "plots", "*.png")), f"no plots in {workdir}"


def check_sigterm_resume(tmp_path, config: str, *overrides: str, reference=None, timeout: int = 900,
                         save: int = 1) -> dict:
  """See the module docstring; ``reference`` is the workdir of an uninterrupted run with the same command (run
  here when None); ``save``: the checkpoint save after which the process gets SIGTERM. Returns the resumed run's
  results."""
  if reference is None:
    reference = tmp_path / "uninterrupted"
    r = run(config, reference, *overrides, timeout=timeout)
    assert r.returncode == 0, fail(r, "uninterrupted run")
  work = tmp_path / "interrupted"
  r = run(config, work, *overrides, timeout=timeout, LMX_FAULT=f"sigterm_after_save:{save}")
  assert r.returncode == 143, fail(r, f"run with SIGTERM after checkpoint save {save}")
  assert record(work)["status"] == "interrupted", record(work)
  last = [line for line in r.stderr.splitlines() if line.strip()][-1]
  assert "interrupted by SIGTERM" in last and "Traceback" not in r.stderr, fail(r, "the stop message")
  assert checkpoints(work), "no checkpoint was written before the stop"
  r = run(config, work, *overrides, timeout=timeout)
  assert r.returncode == 0, fail(r, "resumed run")
  assert record(work)["status"] == "finished"
  got, want = without_timing(results(work)), without_timing(results(reference))
  assert got == want, f"resumed results differ from the uninterrupted run's:\n{json.dumps(got)[:2000]}\nvs\n" \
                      f"{json.dumps(want)[:2000]}"
  return results(work)


def check_nan_stops(tmp_path, config: str, loop_name: str, step: int, *overrides: str, timeout: int = 900) -> str:
  """See the module docstring; returns the error line."""
  work = tmp_path / f"nan-{loop_name.replace('/', '_')}"
  r = run(config, work, *overrides, timeout=timeout, LMX_FAULT=f"nan:{loop_name}:{step}")
  assert r.returncode == 2, fail(r, f"run with a NaN at step {step} of {loop_name}")
  line = [x for x in r.stderr.splitlines() if x.strip()][-1]
  assert line.startswith("error:") and f"NaN/Inf at step {step}" in line, fail(r, "the NaN message")
  assert "Traceback" not in r.stderr, fail(r, "a traceback")
  assert record(work)["status"] == "failed", record(work)
  return line
