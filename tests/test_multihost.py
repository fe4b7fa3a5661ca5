"""Multi-host on one machine: 2 processes x 4 CPU devices joined by jax.distributed on localhost.

Each process runs launch/run.py (LMX_DISTRIBUTED=1), reads its own data shard, trains, checkpoints; a second
launch restores and continues.
"""
import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(workdir, steps, *extra):
  port = _free_port()
  procs = []
  for pid in range(2):
    env = dict(os.environ, LMX_DISTRIBUTED="1", LMX_COORDINATOR=f"localhost:{port}", LMX_NUM_PROCESSES="2",
               LMX_PROCESS_ID=str(pid), JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu", LMX_NO_PROGRESS="1")
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, os.path.join(ROOT, "launch", "run.py"), "--config=configs/lm.py:smoke",
           f"--workdir={workdir}", f"--config.train.steps={steps}", "--config.train.ckpt_every=6",
           "--config.train.eval_every=6", "--config.train.log_every=3", "--config.mesh.fsdp=2", *extra]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
  return procs


def _wait(procs, codes=(0, 0)):
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=400)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outs.append((p.returncode, out, err))
  for (rc, out, err), code in zip(outs, codes):
    assert rc == code, err[-3000:]
  return outs


def _launch(workdir, steps, *extra):
  return _wait(_start(workdir, steps, *extra))


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_restore(tmp_path):
  w = str(tmp_path / "w")
  outs = _launch(w, 6)
  assert "mesh {'data': 4, 'fsdp': 2" in outs[0][1]  # 8 global devices from 2 processes
  assert os.path.isdir(os.path.join(w, "checkpoints", "6"))
  outs = _launch(w, 12)
  assert "resumed_from_step=6" in outs[0][1]
  steps = [json.loads(line)["step"] for line in open(os.path.join(w, "metrics.jsonl"))]
  assert max(steps) == 12
  assert json.load(open(os.path.join(w, "results.json")))["resumed_from"] == 6


@pytest.mark.slow
def test_sigterm_to_one_host_stops_every_host_at_the_same_step(tmp_path):
  """A preemption notice reaching one worker: all workers agree on the step, checkpoint it and exit 143; the
  relaunch resumes there; relaunching a finished run does nothing on every worker."""
  import signal
  import time

  w = str(tmp_path / "w")
  procs = _start(w, 100000, "--config.train.ckpt_every=100000", "--config.train.eval_every=100000")
  path = os.path.join(w, "metrics.jsonl")
  t0 = time.time()
  while not (os.path.exists(path) and any('"step": 6,' in line for line in open(path))):
    assert time.time() - t0 < 300 and all(p.poll() is None for p in procs)
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)  # only the second host gets the notice
  outs = _wait(procs, codes=(143, 143))
  stops = {err.strip().splitlines()[-1].split(" at step ")[1].split("/")[0] for _, _, err in outs}
  assert len(stops) == 1, outs  # the same step on both hosts
  stop = int(stops.pop())
  assert os.listdir(os.path.join(w, "checkpoints")) == [str(stop)]
  outs = _launch(w, stop + 3, "--config.train.ckpt_every=100000", "--config.train.eval_every=100000")
  assert f"resumed_from_step={stop}" in outs[0][1]
  outs = _launch(w, stop + 3, "--config.train.ckpt_every=100000", "--config.train.eval_every=100000")
  assert "holds a finished run" in outs[0][1]
