"""The shared loop on 8 fake devices: bitwise resume (Grain, Grain workers, on-device data), a frozen teacher
swapped without recompiling, hook cadence, the NaN guard. References are NumPy re-computations or an
uninterrupted run of the same loop."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lmx.core import checkpoint as ckpt_lib
from lmx.core import config as config_lib
from lmx.core import data as data_lib
from lmx.core import loop
from lmx.core import mesh as mesh_lib
from lmx.core.rng import np_stream
from lmx.methods import lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lm_config(steps=12):
  cfg = config_lib.load_config_file(f"{ROOT}/configs/lm.py:smoke")
  cfg.mesh.update(data=2, fsdp=2, model=2)
  cfg.model.update(d_model=32, d_ff=64, n_layers=1)
  cfg.data.update(seq_len=32, global_batch=8)
  cfg.train.update(steps=steps, log_every=2, eval_every=6, ckpt_every=4, plot=False, async_checkpointing=True)
  return cfg


def _saved_state(workdir, step):
  return ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def _assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and la
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _records(workdir):
  out = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    r = json.loads(line)
    for k, v in r.items():
      if k not in ("step", "time") and "per_sec" not in k and "resumed" not in k:
        out[(r["step"], k)] = v
  return out


class Interrupt(Exception):
  pass


def _die_at(n):
  def hook(step, state, writer):
    raise Interrupt()
  return loop.every(n, hook, name="die", at_end=False)


def _uninterrupted_and_resumed(make, tmp_path, die_at):
  """Results of ``make(workdir).run()`` in one go, and after a crash at ``die_at`` plus a rerun."""
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  ref = make(a).run()
  with pytest.raises(Interrupt):
    make(b, hooks=[_die_at(die_at)]).run()
  return ref, make(b).run()


def test_lm_resume_is_bitwise_equal(tmp_path, monkeypatch):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  lm.run(_lm_config(), a)

  seen = {"n": 0}
  orig = data_lib.GlobalBatches.__next__

  def flaky(self):
    seen["n"] += 1
    if seen["n"] > 6:  # dies after step 6; the last checkpoint is at step 4
      raise Interrupt()
    return orig(self)

  monkeypatch.setattr(data_lib.GlobalBatches, "__next__", flaky)
  with pytest.raises(Interrupt):
    lm.run(_lm_config(), b)
  monkeypatch.setattr(data_lib.GlobalBatches, "__next__", orig)
  res = lm.run(_lm_config(), b)
  assert res["resumed_from"] == 4

  _assert_trees_equal(_saved_state(a, 12), _saved_state(b, 12))
  ra, rb = _records(a), _records(b)
  after = {k: v for k, v in ra.items() if k[0] > 6}
  assert after and all(rb[k] == v for k, v in after.items())  # same losses, same data order


def test_signal_checkpoints_at_the_interrupt_and_the_resume_is_bitwise_equal(tmp_path, monkeypatch):
  """SIGINT during step 7 (no checkpoint due there): the loop finishes the step, checkpoints step 7, raises
  Interrupted; the rerun starts at 7 and ends bitwise equal to an uninterrupted run."""
  import signal
  import threading

  from lmx.core import interrupt

  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signal handlers need the main thread")
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  lm.run(_lm_config(), a)
  orig = data_lib.GlobalBatches.__next__
  seen = {"n": 0}

  def signalling(self):
    seen["n"] += 1
    if seen["n"] == 7:  # the signal arrives while step 7's batch is fetched
      os.kill(os.getpid(), signal.SIGINT)
    return orig(self)

  monkeypatch.setattr(data_lib.GlobalBatches, "__next__", signalling)
  with pytest.raises(interrupt.Interrupted, match=r"SIGINT at step 7/12 .*checkpoint saved at step 7") as e:
    lm.run(_lm_config(), b)
  assert e.value.exit_code == 130
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
  monkeypatch.setattr(data_lib.GlobalBatches, "__next__", orig)
  with ckpt_lib.Checkpointer(os.path.join(b, "checkpoints")) as ck:
    assert ck.all_steps() == [4, 7]
  res = lm.run(_lm_config(), b)
  assert res["resumed_from"] == 7
  _assert_trees_equal(_saved_state(a, 12), _saved_state(b, 12))
  ra, rb = _records(a), _records(b)
  after = {k: v for k, v in ra.items() if k[0] > 8}
  assert after and all(rb[k] == v for k, v in after.items())


def test_resumed_at_the_end_finishes_outputs_and_past_the_end_is_refused(tmp_path):
  w = str(tmp_path)
  first = lm.run(_lm_config(12), w)
  again = lm.run(_lm_config(12), w)  # e.g. a crash after the last checkpoint, before results.json
  assert again["resumed_from"] == 12 and again["final_eval"] == first["final_eval"] and first["final_eval"]
  with pytest.raises(config_lib.ConfigError, match=r"step 12, past this run's 8 steps"):
    lm.run(_lm_config(8), w)


# ----------------------------------------------------------------------------------------- a two-model step


def _teacher_step(counter):
  def step(state, frozen, x_BD, rng):
    counter["traces"] += 1  # runs at trace time only: counts compilations of the step
    del rng

    def loss_fn(w):
      return jnp.mean((x_BD @ w - x_BD @ frozen["w_teacher"]) ** 2)

    loss, g = jax.value_and_grad(loss_fn)(state["w"])
    return dict(state, w=state["w"] - 0.1 * g), {"loss": loss}
  return step


class Batches:
  """A resumable host iterator (not Grain): batch i is a pure function of i."""

  def __init__(self, b=8, d=8):
    self.i, self.b, self.d = 0, b, d

  def __next__(self):
    x = np_stream(0, "x", self.i).standard_normal((self.b, self.d)).astype(np.float32)
    self.i += 1
    return x

  def get_state(self):
    return {"i": self.i}

  def set_state(self, s):
    self.i = s["i"]


def test_frozen_teacher_is_an_argument_swapped_without_recompiling(tmp_path):
  mesh = mesh_lib.make_mesh(dict(data=4, model=2))
  col = NamedSharding(mesh, P(None, "model"))
  rng = np.random.default_rng(0)
  t1, t2 = rng.standard_normal((8, 4)).astype(np.float32), rng.standard_normal((8, 4)).astype(np.float32)
  counter = {"traces": 0}
  holder = {}

  def swap(step, state, writer):
    assert int(state["step"]) == step
    if step == 3:
      holder["loop"].set_frozen({"w_teacher": t2})

  lp = loop.Loop(step_fn=_teacher_step(counter), init_fn=lambda k: {"w": jnp.zeros((8, 4))},
                 state_shardings={"w": col}, frozen={"w_teacher": t1}, frozen_shardings={"w_teacher": col},
                 data=Batches(), mesh=mesh, workdir=str(tmp_path), total_steps=6, seed=0, log_every=1,
                 ckpt_every=100, hooks=[loop.every(3, swap, at_end=False)])
  holder["loop"] = lp
  res = lp.run()
  assert counter["traces"] == 1  # one compilation for both teachers
  assert lp.frozen["w_teacher"].sharding.spec == P(None, "model")
  assert res.state["w"].sharding.spec == P(None, "model")
  # NumPy reference: 3 SGD steps towards teacher 1, then 3 towards teacher 2, on the same data stream.
  w, src = np.zeros((8, 4)), Batches()
  for i in range(6):
    x = next(src).astype(np.float64)
    wt = t1 if i < 3 else t2
    w = w - 0.1 * 2 * x.T @ (x @ w - x @ wt) / (8 * 4)
  np.testing.assert_allclose(np.asarray(res.state["w"]), w, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="shapes"):
    lp.set_frozen({"w_teacher": np.zeros((4, 4), np.float32)})


def test_resumable_host_iterator_resumes_its_position(tmp_path):
  """A plain iterator with get_state/set_state (not Grain) is checkpointed with the state: the crashed and resumed
  run sees the same batches as the uninterrupted one."""
  mesh = mesh_lib.make_mesh(dict(data=4, model=2))
  col = NamedSharding(mesh, P(None, "model"))
  teacher = np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)

  def make(workdir, hooks=()):
    return loop.Loop(step_fn=_teacher_step({"traces": 0}), init_fn=lambda k: {"w": jnp.zeros((8, 4))},
                     state_shardings={"w": col}, frozen={"w_teacher": teacher}, data=Batches(), mesh=mesh,
                     workdir=workdir, total_steps=8, seed=0, log_every=2, ckpt_every=3, hooks=hooks)

  ref, res = _uninterrupted_and_resumed(make, tmp_path, die_at=5)
  assert res.resumed_from == 3
  _assert_trees_equal(ref.state, res.state)


# ----------------------------------------------------------------------------------------- on-device data


def _producer_loop(workdir, *, total=12, hooks=()):
  """Linear regression whose data the step draws from its rng (no data source), Adam on a sharded w."""
  mesh = mesh_lib.make_mesh(dict(data=2, fsdp=4))
  sh = NamedSharding(mesh, P("fsdp"))
  w_true = jnp.linspace(-1.0, 1.0, 16)
  tx = optax.adam(0.1)

  def loss_fn(params, frozen, batch, rng):
    assert batch is None and frozen is None
    x_BD = jax.random.normal(rng, (32, 16))
    return jnp.mean((x_BD @ params["w"] - x_BD @ w_true) ** 2), {}

  shardings = loop.optax_shardings({"w": sh}, tx, {"w": jax.ShapeDtypeStruct((16,), jnp.float32)}, mesh)
  return loop.Loop(step_fn=loop.optax_step(loss_fn, tx), init_fn=lambda k: loop.optax_state({"w": jnp.zeros(16)}, tx),
                   state_shardings=shardings, mesh=mesh, workdir=workdir, total_steps=total, seed=3, log_every=2,
                   ckpt_every=4, async_checkpointing=True, hooks=hooks)


def test_on_device_producer_resumes_bitwise(tmp_path):
  ref, res = _uninterrupted_and_resumed(_producer_loop, tmp_path, die_at=7)
  assert res.resumed_from == 4
  _assert_trees_equal(ref.state, res.state)
  losses = [json.loads(line)["train/loss"] for line in open(tmp_path / "a" / "metrics.jsonl")]
  assert losses[-1] < 0.2 * losses[0]  # it learns: the data really comes from the step's rng
  assert res.state["params"]["w"].sharding.spec == P("fsdp")


def test_grain_workers_resume_bitwise(tmp_path):
  """Grain with 2 worker processes: the checkpointed iterator state continues the same data order."""
  mesh = mesh_lib.make_mesh(dict(data=-1))
  xs = np.random.default_rng(0).standard_normal((200, 4)).astype(np.float32)

  def make(workdir, hooks=()):
    ds = data_lib.make_dataset(xs, global_batch=8, seed=1)
    batches = data_lib.GlobalBatches(data_lib.make_iterator(ds, worker_count=2),
                                     mesh_lib.batch_sharding(mesh, ()))

    def step(state, frozen, x_BD, rng):  # a running sum of everything seen: any reordering changes it
      return dict(state, s=state["s"] + jnp.sum(x_BD, 0) * (state["step"] + 1)), {"loss": jnp.sum(x_BD)}

    return loop.Loop(step_fn=step, init_fn=lambda k: {"s": jnp.zeros(4)}, data=batches, mesh=mesh,
                     workdir=workdir, total_steps=10, seed=0, log_every=5, ckpt_every=3, hooks=hooks)

  ref, res = _uninterrupted_and_resumed(make, tmp_path, die_at=5)
  assert res.resumed_from == 3
  # NumPy reference of the same order: Grain's seeded shuffle, batches of 8 in sequence.
  it = data_lib.make_iterator(data_lib.make_dataset(xs, global_batch=8, seed=1))
  expect = sum(np.asarray(next(it)).sum(0) * (i + 1) for i in range(10))
  np.testing.assert_allclose(np.asarray(res.state["s"]), expect, rtol=1e-5)
  _assert_trees_equal(ref.state, res.state)


# ----------------------------------------------------------------------------------------- hooks and the guard


def test_hooks_run_on_their_cadence_with_the_current_state(tmp_path):
  mesh = mesh_lib.make_mesh(dict(data=-1), devices=jax.devices()[:1])
  seen = {"a": [], "b": []}

  def step(state, frozen, batch, rng):
    return dict(state, x=state["x"] + 1.0), {"loss": state["x"]}

  def hook_a(step, state, writer):
    seen["a"].append((step, int(state["step"]), float(state["x"])))
    return {"x": state["x"]}

  def hook_b(step, state, writer):
    seen["b"].append(step)

  res = loop.train(step_fn=step, init_fn=lambda k: {"x": jnp.zeros(())}, mesh=mesh, workdir=str(tmp_path),
                   total_steps=10, seed=0, log_every=4, ckpt_every=100,
                   hooks=[loop.every(3, hook_a, name="a"), loop.every(4, hook_b, at_end=False)])
  assert seen["a"] == [(3, 3, 3.0), (6, 6, 6.0), (9, 9, 9.0), (10, 10, 10.0)]
  assert seen["b"] == [4, 8]
  assert res.hook_metrics["a"] == {"a/x": 10.0}
  recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in recs if "a/x" in r] == [3, 6, 9, 10]
  assert [r["train/loss"] for r in recs if "train/loss" in r] == [1.5, 5.5, 8.5]  # window means of 0..3, 4..7, 8..9


def test_nan_loss_stops_clearly_and_keeps_last_good_checkpoint(tmp_path):
  mesh = mesh_lib.make_mesh(dict(data=-1), devices=jax.devices()[:1])
  xs = np.ones((40, 1), np.float32)
  xs[13] = np.nan  # batch 6 (batch size 2), the 7th step, holds a NaN; steps count from 1 like checkpoints
  ds = data_lib.make_dataset(xs, global_batch=2, seed=0, shuffle=False)
  batches = data_lib.GlobalBatches(data_lib.make_iterator(ds), mesh_lib.batch_sharding(mesh, ()))

  def loss_fn(params, frozen, batch, rng):
    return jnp.mean((batch * params["w"] - 1.0) ** 2), {}

  tx = optax.sgd(0.1)
  with pytest.raises(loop.NonFiniteLossError, match=r"NaN/Inf at step 7 .*last good checkpoint \(step 6\)"):
    loop.train(step_fn=loop.optax_step(loss_fn, tx), init_fn=lambda k: loop.optax_state({"w": jnp.zeros(1)}, tx),
               data=batches, mesh=mesh, workdir=str(tmp_path), total_steps=20, seed=0, log_every=1, ckpt_every=2,
               async_checkpointing=False)
  with ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")) as ck:
    assert ck.all_steps() == [2, 4, 6]
  w6 = np.asarray(_saved_state(str(tmp_path), 6)["params"]["w"])
  assert np.isfinite(w6).all() and w6[0] == pytest.approx(1 - 0.8 ** 6)  # SGD on (w - 1)^2 from 0, lr 0.1


def test_nan_patience_tolerates_a_short_run_of_bad_steps(tmp_path):
  """patience 3: two isolated NaN steps are skipped (params unchanged there), training goes on."""
  mesh = mesh_lib.make_mesh(dict(data=-1), devices=jax.devices()[:1])

  def step(state, frozen, batch, rng):
    bad = (state["step"] == 2) | (state["step"] == 3)
    return dict(state, x=state["x"] + 1.0), {"loss": jnp.where(bad, jnp.nan, 0.0)}

  res = loop.train(step_fn=step, init_fn=lambda k: {"x": jnp.zeros(())}, mesh=mesh, workdir=str(tmp_path),
                   total_steps=8, seed=0, log_every=1, ckpt_every=100, nan_patience=3)
  assert float(res.state["x"]) == 6.0 and int(res.state["guard"]["bad"]) == 2
  assert int(res.state["guard"]["max_run"]) == 2 and int(res.state["guard"]["first"]) == 2


def test_at_steps_hook_runs_on_its_schedule_only():
  h = loop.at_steps([10, 20, 40], lambda *a: None)
  assert [s for s in range(1, 61) if h.due(s, 60)] == [10, 20, 40]  # not at the end unless asked
  h_end = loop.at_steps([10], lambda *a: None, at_end=True)
  assert [s for s in range(1, 31) if h_end.due(s, 30)] == [10, 30]
  assert [s for s in range(1, 31) if loop.every(10, lambda *a: None).due(s, 30)] == [10, 20, 30]
  with pytest.raises(ValueError):
    loop.at_steps([0, 5], lambda *a: None)


def test_compile_cache_shares_one_compilation_and_init_state_starts_from_given_parts(tmp_path):
  """Loops with the same step object and shapes compile once through a shared ``compile_cache``, whatever their
  seed (the step's base key is an argument of the compiled step, so each seed still gets its own rngs: the same
  for the same seed); ``init_state`` starts from the given parts, which stay the caller's (the state is donated,
  the given arrays are not)."""
  mesh = mesh_lib.make_mesh(dict(data=-1), devices=jax.devices()[:1])
  traces = {"n": 0}

  def step(state, frozen, batch, rng):
    traces["n"] += 1
    return dict(state, w=state["w"] + frozen["d"]), {"loss": jnp.sum(state["w"]), "u": jax.random.uniform(rng)}

  cache, outs, given, us = {}, [], [], []
  for i, seed in enumerate((0, 0, 1)):
    start = np.full((3,), float(i), np.float32)
    given.append(start)
    lp = loop.Loop(step_fn=step, init_state={"w": start}, frozen={"d": np.full((3,), i + 1.0, np.float32)},
                   mesh=mesh, workdir=str(tmp_path / f"run{i}"), total_steps=2, seed=seed, ckpt_every=0,
                   log_console=False, compile_cache=cache)
    res = lp.run()
    outs.append(np.asarray(res.state["w"]))
    us.append(res.last_metrics["train/u"])
  assert traces["n"] == 1 and len(cache) == 1  # one compilation for the three loops
  assert us[0] == us[1] and us[2] != us[0]  # the step rngs are the seed's
  # the reference: the mean over the 2 steps of uniform(fold_in(rng_stream(seed, "step"), step))
  from lmx.core.rng import rng_stream
  want = [float(np.mean([jax.random.uniform(jax.random.fold_in(rng_stream(s, "step"), k)) for k in range(2)]))
          for s in (0, 1)]
  np.testing.assert_allclose([us[0], us[2]], want, rtol=1e-6)
  for i, w in enumerate(outs):
    np.testing.assert_allclose(w, i + 2 * (i + 1.0))
    np.testing.assert_allclose(given[i], float(i))
  with pytest.raises(ValueError, match="not both"):
    loop.Loop(step_fn=step, init_fn=lambda k: {"w": jnp.zeros(3)}, init_state={"w": np.zeros(3)}, mesh=mesh,
              workdir=str(tmp_path / "both"), total_steps=1, seed=0)
