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


def _launch(workdir, steps):
  port = _free_port()
  procs = []
  for pid in range(2):
    env = dict(os.environ, LMX_DISTRIBUTED="1", LMX_COORDINATOR=f"localhost:{port}", LMX_NUM_PROCESSES="2",
               LMX_PROCESS_ID=str(pid), JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu", LMX_NO_PROGRESS="1")
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, os.path.join(ROOT, "launch", "run.py"), "--config=configs/lm.py:smoke",
           f"--workdir={workdir}", f"--config.train.steps={steps}", "--config.train.ckpt_every=6",
           "--config.train.eval_every=6", "--config.train.log_every=3", "--config.mesh.fsdp=2"]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=400)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outs.append((p.returncode, out, err))
  for rc, out, err in outs:
    assert rc == 0, err[-3000:]
  return outs


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
