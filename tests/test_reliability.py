"""What a user's mistakes and accidents do to a run (subprocesses of launch/run.py on small LM configs).

Each test asserts the exit status, that the message is short and names the problem (no traceback from jax,
orbax, grain, absl, protobuf or numpy), and that nothing already in the workdir changed (checksums).
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests import resume_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = [sys.executable, os.path.join(ROOT, "launch", "run.py")]
LM = ["--config=configs/lm.py:smoke", "--config.train.ckpt_every=10", "--config.train.eval_every=10",
      "--config.train.log_every=5", "--config.train.plot=False"]


def _env():
  env = resume_check.env()  # the test process's compilation cache: each lm smoke program is compiled once
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user's machine
  return env


def _run(*args, timeout=240):
  return subprocess.run(RUN + list(args), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _popen(*args):
  return subprocess.Popen(RUN + list(args), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True)  # its own process group, as a terminal's job


def _checksums(d):
  out = {}
  for root, _, files in os.walk(d):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, d)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def _short_error(r, *needles, max_lines=2):
  err = r.stderr.strip()
  assert "Traceback" not in err, err[-3000:]
  assert len(err.splitlines()) <= max_lines, err[-3000:]
  for n in needles:
    assert n in err, err[-3000:]


def _strict_json(path):
  def no_nan(x):
    raise AssertionError(f"{path} holds {x}: not valid JSON")
  with open(path) as f:
    return json.load(f, parse_constant=no_nan)


def _wait_for_step(w, step, proc, timeout=120):
  path = os.path.join(w, "metrics.jsonl")
  t0 = time.time()
  while time.time() - t0 < timeout:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    if os.path.exists(path):
      steps = [json.loads(line).get("step", 0) for line in open(path) if line.strip().endswith("}")]
      if steps and max(steps) >= step:
        return
    time.sleep(0.2)
  raise AssertionError(f"no step {step} in {path} after {timeout}s")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished 20-step LM run (checkpoints at 10 and 20); tests copy it."""
  w = str(tmp_path_factory.mktemp("finished") / "w")
  r = _run(*LM, f"--workdir={w}", "--config.train.steps=20")
  assert r.returncode == 0, r.stderr[-3000:]
  return w


@pytest.fixture
def done(finished, tmp_path):
  w = str(tmp_path / "w")
  shutil.copytree(finished, w)
  return w


# ------------------------------------------------------------------------------ a finished run is never damaged


def test_rerun_of_a_finished_run_says_so_and_changes_nothing(done):
  before = _checksums(done)
  res = _strict_json(os.path.join(done, "results.json"))
  assert res["final_eval"] and res["steps"] == 20
  r = _run(*LM, f"--workdir={done}", "--config.train.steps=20")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "finished" in r.stdout and os.path.join(done, "results.json") in r.stdout
  assert _checksums(done) == before


def test_fewer_steps_than_saved_refuses_and_changes_nothing(done):
  before = _checksums(done)
  r = _run(*LM, f"--workdir={done}", "--config.train.steps=10")
  assert r.returncode == 2
  _short_error(r, "train.steps=10", "20")
  assert _checksums(done) == before


def test_fewer_steps_than_the_newest_checkpoint_of_an_unfinished_run_refuses(done):
  rec = json.load(open(os.path.join(done, "run.json")))
  rec["status"] = "interrupted"
  json.dump(rec, open(os.path.join(done, "run.json"), "w"))
  before = _checksums(done)
  r = _run(*LM, f"--workdir={done}", "--config.train.steps=15")
  assert r.returncode == 2
  _short_error(r, "train.steps=15", "20")
  assert _checksums(done) == before


# ------------------------------------------------------------------------------ config changes on resume


@pytest.mark.parametrize("override,field", [("--config.data.global_batch=8", "data.global_batch"),
                                            ("--config.data.seq_len=32", "data.seq_len"),
                                            ("--config.seed=3", "seed")])
def test_resume_with_another_config_refuses_naming_the_field(done, override, field):
  before = _checksums(done)
  r = _run(*LM, f"--workdir={done}", "--config.train.steps=30", override)
  assert r.returncode == 2
  _short_error(r, field, "new --workdir")
  assert _checksums(done) == before


def test_resume_with_another_corpus_refuses(done):
  rec = json.load(open(os.path.join(done, "run.json")))
  rec["config"]["data"]["corpus"] = "wikitext"  # as if it had been started on another corpus
  json.dump(rec, open(os.path.join(done, "run.json"), "w"))
  before = _checksums(done)
  r = _run(*LM, f"--workdir={done}", "--config.train.steps=30")
  assert r.returncode == 2
  _short_error(r, "data.corpus: 'wikitext' → 'python_docs'")
  assert _checksums(done) == before


def test_safe_changes_continue_and_say_what_changed(done):
  r = _run(*LM, f"--workdir={done}", "--config.train.steps=30", "--config.train.log_every=2")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "train.log_every: 5 → 2" in r.stdout and "train.steps: 20 → 30" in r.stdout
  res = _strict_json(os.path.join(done, "results.json"))
  assert res["resumed_from"] == 20 and res["steps"] == 30
  assert json.load(open(os.path.join(done, "run.json")))["status"] == "finished"


# ------------------------------------------------------------------------------ one run per workdir


def test_second_run_on_a_busy_workdir_refuses_naming_the_first(tmp_path):
  w = str(tmp_path / "w")
  first = _popen(*LM, f"--workdir={w}", "--config.train.steps=100000", "--config.train.ckpt_every=100000")
  try:
    _wait_for_step(w, 5, first)
    before = {k: v for k, v in _checksums(w).items() if not k.startswith(("tb", "metrics"))}
    r = _run(*LM, f"--workdir={w}", "--config.train.steps=100000", "--config.train.ckpt_every=100000")
    assert r.returncode == 2
    _short_error(r, "in use", f"pid {first.pid}")
    after = {k: v for k, v in _checksums(w).items() if not k.startswith(("tb", "metrics"))}
    assert after == before
  finally:
    os.killpg(first.pid, signal.SIGINT)
    first.communicate(timeout=120)
  assert first.returncode == 130
  steps = [json.loads(line)["step"] for line in open(os.path.join(w, "metrics.jsonl")) if "train/loss" in line]
  assert len(steps) == len(set(steps))  # one writer: no step logged twice


def test_a_lock_left_by_a_killed_run_is_detected_by_pid(tmp_path):
  w = str(tmp_path / "w")
  p = _popen(*LM, f"--workdir={w}", "--config.train.steps=100000")
  _wait_for_step(w, 10, p)
  os.killpg(p.pid, signal.SIGKILL)
  p.communicate(timeout=60)
  assert json.load(open(os.path.join(w, ".lock")))["pid"] == p.pid  # the dead run's lock file is still there
  r = _run(*LM, f"--workdir={w}", "--config.train.steps=20")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"pid {p.pid}) was killed" in r.stdout
  assert json.load(open(os.path.join(w, "run.json")))["status"] == "finished"


# ------------------------------------------------------------------------------ Ctrl-C and SIGTERM


@pytest.mark.parametrize("sig,code,workers", [(signal.SIGINT, 130, 0), (signal.SIGTERM, 143, 0),
                                              (signal.SIGINT, 130, 2)])
def test_signal_stops_with_a_checkpoint_at_the_interrupt(tmp_path, sig, code, workers):
  """workers=2: Grain worker processes share the process group; they must not print KeyboardInterrupts."""
  w = str(tmp_path / "w")
  args = LM + [f"--workdir={w}", "--config.train.steps=100000", "--config.train.ckpt_every=100000",
               "--config.train.eval_every=100000", f"--config.data.worker_count={workers}"]
  p = _popen(*args)
  _wait_for_step(w, 5, p)
  os.killpg(p.pid, sig)  # the whole process group, as a terminal's Ctrl-C or a pod's preemption
  out, err = p.communicate(timeout=120)
  assert p.returncode == code, err[-3000:]
  assert "Traceback" not in err and "KeyboardInterrupt" not in err and "never awaited" not in err, err[-3000:]
  # The last line; with workers Python's resource tracker may add its 2-line note on a shared-memory buffer
  # that was in flight.
  last = [line for line in err.strip().splitlines() if line.startswith("interrupted by")][-1]
  assert f"interrupted by {signal.Signals(sig).name} at step" in last and "rerun the same command" in last, err
  stopped = int(last.split(" at step ")[1].split("/")[0])
  assert stopped >= 5
  assert os.listdir(os.path.join(w, "checkpoints")) == [str(stopped)]  # the interrupt's own checkpoint
  assert json.load(open(os.path.join(w, "run.json")))["status"] == "interrupted"
  r = _run(*LM, f"--workdir={w}", f"--config.train.steps={stopped + 3}", "--config.train.ckpt_every=100000",
           "--config.train.eval_every=100000", f"--config.data.worker_count={workers}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resumed_from_step={stopped}" in r.stdout


# A run of a tiny method through launcher.run_cli: a first Ctrl-C at step 3, its checkpoint slowed down by 2 s, and a
# second Ctrl-C 0.3 s into that save (what an impatient user does while a large checkpoint is being written).
_SECOND_CTRL_C = """
import asyncio, os, signal, sys, threading, types
import jax.numpy as jnp, ml_collections, optax, orbax.checkpoint as ocp
from lmx import launcher
from lmx.core import checkpoint as ckpt_lib, interrupt, loop, mesh as mesh_lib

save_json = ocp.handlers.JsonCheckpointHandler._save_fn
async def slow(self, x, directory):
  await asyncio.sleep(2)
  return await save_json(self, x, directory)
ocp.handlers.JsonCheckpointHandler._save_fn = slow
wait = ckpt_lib.Checkpointer.wait
def wait_and_press_again(self):
  if interrupt.requested() and not hasattr(wait_and_press_again, "pressed"):
    wait_and_press_again.pressed = True
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
  return wait(self)
ckpt_lib.Checkpointer.wait = wait_and_press_again

def press_at_3(step, state, writer):
  if step == 3:
    os.kill(os.getpid(), signal.SIGINT)

def run(config, workdir):
  tx = optax.sgd(0.1)
  loss = lambda p, frozen, batch, rng: (((p["w"] - 1.0) ** 2).sum(), {})
  return loop.train(step_fn=loop.optax_step(loss, tx), init_fn=lambda k: loop.optax_state({"w": jnp.zeros(4)}, tx),
                    mesh=mesh_lib.make_mesh({"data": -1}), workdir=workdir, total_steps=10**6, seed=0,
                    log_every=1, ckpt_every=10**6, hooks=[loop.every(1, press_at_3)], log_console=False)

launcher.method_module = lambda config: types.SimpleNamespace(run=run)
workdir, sys.argv = sys.argv[1], sys.argv[:1]
sys.exit(launcher.run_cli(lambda argv: launcher.main(ml_collections.ConfigDict({"method": "tiny"}), workdir)))
"""


def test_second_ctrl_c_during_the_checkpoint_save_is_one_line_and_interrupted(tmp_path):
  w = str(tmp_path / "w")
  env = dict(_env(), PYTHONPATH=ROOT)
  r = subprocess.run([sys.executable, "-c", _SECOND_CTRL_C, w], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=240)
  assert r.returncode == 130, r.stderr[-3000:]
  assert "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr, r.stderr[-3000:]
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert lines[0].startswith("SIGINT received: stopping after the current step"), lines
  assert lines[1:] == ["interrupted by SIGINT: stopped at once (checkpoints already written are kept); rerun the "
                       "same command to resume"], lines
  rec = json.load(open(os.path.join(w, "run.json")))
  assert rec["status"] == "interrupted" and "stopped at once" in rec["stopped"], rec


# ------------------------------------------------------------------------------ user mistakes: one short message


@pytest.mark.parametrize("args,needles", [
    (["--config=configs/nope.py"], ["configs/nope.py", "configs/lm.py"]),
    (["--config=configs/lm.py.smoke"], ["did you mean --config=configs/lm.py:smoke"]),
    (["--config=configs/lm.py,smoke"], ["did you mean --config=configs/lm.py:smoke"]),
    (["--config=configs/lm:smoke"], ["did you mean --config=configs/lm.py:smoke"]),
    (["--config=configs/lm.py:smoke,smoke"], ["one variant"]),
    (["--config=configs/lm.py:smoke", "--config.optim.lr=-1"], ["optim.lr", "> 0"]),
    (["--config=configs/lm.py:smoke", "--config.data.global_batch=0"], ["data.global_batch", "must be a whole number and >= 1, got 0"]),
    (["--config=configs/lm.py:smoke", "--config.data.seq_len=0"], ["data.seq_len", "must be a whole number and >= 1, got 0"]),
    (["--config=configs/lm.py:smoke", "--config.model.dtype=float7"], ["model.dtype", "float7", "bfloat16"]),
    (["--config=configs/datm.py:smoke", "--config.distill.lr_img=-1"], ["distill.lr_img"]),
])
def test_config_mistakes_give_one_line_and_create_no_workdir(tmp_path, args, needles):
  w = str(tmp_path / "w")
  r = _run(*args, f"--workdir={w}", timeout=120)
  assert r.returncode == 2
  _short_error(r, *needles, max_lines=1)
  assert not os.path.exists(w)


def test_checkpoints_path_that_is_a_file_is_reported_at_once(tmp_path):
  w = tmp_path / "w"
  w.mkdir()
  (w / "checkpoints").write_text("not a directory")
  before = _checksums(str(w))
  t0 = time.time()
  r = _run(*LM, f"--workdir={w}", "--config.train.steps=20")
  assert r.returncode == 2
  _short_error(r, str(w / "checkpoints"), "not a directory", max_lines=1)
  assert time.time() - t0 < 60  # no save timeout
  assert _checksums(str(w)) == before


# ------------------------------------------------------------------------------ checkpoint faults


def test_missing_manifest_falls_back_with_one_full_warning(done):
  os.remove(os.path.join(done, "checkpoints", "20", "state", "manifest.ocdbt"))
  r = _run(*LM, f"--workdir={done}", "--config.train.steps=30")
  assert r.returncode == 0, r.stderr[-3000:]
  warnings = [line for line in (r.stdout + r.stderr).splitlines() if "WARNING" in line]
  assert len(warnings) == 1, warnings
  assert "manifest.ocdbt is missing" in warnings[0] and warnings[0].endswith("(kept, not deleted)")
  assert "Traceback" not in r.stderr and "Event loop is closed" not in r.stderr, r.stderr[-3000:]
  assert _strict_json(os.path.join(done, "results.json"))["resumed_from"] == 10
  assert len(os.listdir(os.path.join(done, "checkpoints_corrupt"))) == 1


def test_no_restorable_checkpoint_asks_before_starting_over(done):
  for s in ("10", "20"):
    os.remove(os.path.join(done, "checkpoints", s, "state", "manifest.ocdbt"))
  r = _run(*LM, f"--workdir={done}", "--config.train.steps=30")
  assert r.returncode == 2
  assert "Traceback" not in r.stderr
  assert "--allow_fresh_start" in r.stderr.strip().splitlines()[-1]
  assert len(os.listdir(os.path.join(done, "checkpoints_corrupt"))) == 2  # kept, not deleted
  results_before = open(os.path.join(done, "results.json")).read()
  r = _run(*LM, f"--workdir={done}", "--config.train.steps=30")  # asks again: nothing restorable yet
  assert r.returncode == 2 and "--allow_fresh_start" in r.stderr
  assert open(os.path.join(done, "results.json")).read() == results_before
  r = _run(*LM, f"--workdir={done}", "--config.train.steps=30", "--allow_fresh_start")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "starting from step 0" in r.stderr
  assert _strict_json(os.path.join(done, "results.json"))["resumed_from"] is None


# ------------------------------------------------------------------------------ DATM's data and expert buffer


DATM = ["--config=configs/datm.py:smoke", "--config.experts.num=2", "--config.experts.epochs=4",
        "--config.distill.ckpt_every=2", "--config.distill.log_every=2", "--config.eval.num=1",
        "--config.eval.epochs=2", "--config.eval.random=False", "--config.eval.init=False"]


def test_corrupt_tfds_dataset_info_is_one_line_naming_the_dir(tmp_path):
  import tensorflow_datasets as tfds

  version = str(tfds.builder_cls("mnist").VERSION)
  info = tmp_path / "tfds" / "mnist" / version / "dataset_info.json"
  info.parent.mkdir(parents=True)
  info.write_text('{"name": "mnist", "splits": [')  # what an interrupted copy leaves
  w = str(tmp_path / "w")
  r = _run(*DATM, "--config.data.dataset=mnist", f"--config.data.data_dir={tmp_path / 'tfds'}", f"--workdir={w}",
           timeout=120)
  assert r.returncode == 2
  _short_error(r, str(info.parent), "prepare it again", max_lines=1)
  assert not os.path.exists(w)  # a data error before any work leaves no workdir behind


def test_truncated_expert_buffer_is_moved_aside_and_retrained(tmp_path):
  w = str(tmp_path / "w")
  r = _run(*DATM, f"--workdir={w}", "--config.distill.iterations=4")
  assert r.returncode == 0, r.stderr[-3000:]
  buf = os.path.join(w, "experts", "buffer.npz")
  original = open(buf, "rb").read()
  with open(buf, "r+b") as f:  # what a crash mid-write of an older, non-atomic save leaves
    f.truncate(len(original) // 2)
  truncated = open(buf, "rb").read()
  r = _run(*DATM, f"--workdir={w}", "--config.distill.iterations=6")
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stdout + r.stderr
  assert "Traceback" not in out
  warnings = [line for line in out.splitlines() if "WARNING" in line]
  assert len(warnings) == 1 and os.path.join(w, "experts") in warnings[0] and "BadZipFile" in warnings[0]
  moved = os.listdir(os.path.join(w, "experts_corrupt"))
  assert len(moved) == 1
  assert open(os.path.join(w, "experts_corrupt", moved[0], "buffer.npz"), "rb").read() == truncated  # kept
  assert open(buf, "rb").read() == original  # the retrained experts are the same experts (seeded streams)
  assert _strict_json(os.path.join(w, "results.json"))["iterations"] == 6
