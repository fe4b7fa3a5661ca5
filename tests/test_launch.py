"""launch/run.py end to end (twice: the second run resumes), clear errors, launcher argument building."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = [sys.executable, os.path.join(ROOT, "launch", "run.py")]


def _run(*args, timeout=300):
  env = dict(os.environ, LMX_NO_PROGRESS="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run(RUN + list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_smoke_twice_second_resumes(tmp_path):
  w = str(tmp_path / "w")
  common = ["--config=configs/lm.py:smoke", f"--workdir={w}", "--config.train.ckpt_every=10",
            "--config.train.eval_every=10"]
  r1 = _run(*common, "--config.train.steps=20")
  assert r1.returncode == 0, r1.stderr[-3000:]
  r2 = _run(*common, "--config.train.steps=30")
  assert r2.returncode == 0, r2.stderr[-3000:]
  assert "resumed_from_step=20" in r2.stdout
  steps = [json.loads(line)["step"] for line in open(os.path.join(w, "metrics.jsonl"))]
  assert max(steps) == 30 and 20 in steps
  res = json.load(open(os.path.join(w, "results.json")))
  assert res["resumed_from"] == 20
  assert os.path.exists(os.path.join(w, "plots", "loss.png"))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(w, "tb")))
  losses = [json.loads(line).get("train/loss") for line in open(os.path.join(w, "metrics.jsonl"))]
  losses = [x for x in losses if x is not None]
  assert losses[-1] < losses[0]


@pytest.mark.parametrize("args,needle", [
    (["--config=configs/lm.py:smoke", "--config.no_such_field=1"], "config has no field 'no_such_field'"),
    (["--config=configs/lm.py:smoke", "--config.method=nope"], "valid methods"),
    (["--config=configs/lm.py:smoke", "--workdir=/proc/lmx_cannot_write"], "is not writable"),
    (["--config=configs/lm.py:nope"], "valid variants"),
])
def test_bad_input_gives_a_short_clear_error(args, needle, tmp_path):
  if not any(a.startswith("--workdir") for a in args):
    args = args + [f"--workdir={tmp_path}/w"]
  r = _run(*args, timeout=120)
  assert r.returncode != 0
  assert needle in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  assert len(r.stderr.strip().splitlines()) <= 4


def test_xm_launch_arguments():
  sys.path.insert(0, ROOT)
  from launch import xm_launch

  jobs = xm_launch.parse_sweep("optim.lr=1e-3,3e-3;seed=0,1")
  assert len(jobs) == 4 and jobs[1] == {"optim.lr": "1e-3", "seed": "1"}
  args = xm_launch.job_args("configs/datm.py:smoke", "gs://b/x/", "datm", 3, jobs[1])
  assert args == {"config": "configs/datm.py:smoke", "workdir": "gs://b/x/datm/3", "config.optim.lr": "1e-3",
                  "config.seed": "1"}
  assert xm_launch.requirements_kwargs("A100=2") == {"A100": 2}
  assert xm_launch.parse_sweep("") == [{}]
  with pytest.raises(ValueError):
    xm_launch.parse_sweep("lr")


def test_tpu_vm_script_is_valid_bash():
  assert subprocess.run(["bash", "-n", os.path.join(ROOT, "launch", "tpu_vm.sh")]).returncode == 0
