"""lmx.core.stages (named resumable stages, sweeps, the one mean ± std), ArrayBatches, the loop's host batches and
early stop, and lmx.rl.update's minibatch update, each against an independent reference."""
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmx.core import interrupt, loop, stages
from lmx.core.data import ArrayBatches
from lmx.core.metrics import Writer
from lmx.rl.update import minibatch_update


# ------------------------------------------------------------------------------------------ mean ± std


def test_mean_std_is_the_sample_std_with_n():
  ms = stages.mean_std([1.0, 2.0, 4.0])
  assert ms["n"] == 3 and ms["mean"] == pytest.approx(7 / 3)
  # by hand: deviations -4/3, -1/3, 5/3 → squares 16/9 + 1/9 + 25/9 = 42/9, over n - 1 = 2
  assert ms["std"] == pytest.approx(np.sqrt(42 / 9 / 2))
  one = stages.mean_std([0.5])
  assert one["n"] == 1 and one["std"] is None and one["mean"] == 0.5
  assert stages.mean_std([1.0, None, float("nan"), 3.0])["n"] == 2
  assert stages.fmt_mean_std(stages.mean_std([0.25, 0.75])) == "0.500 ± 0.354 (n=2)"


# ------------------------------------------------------------------------------------------ stage outputs


def test_stage_runs_once_and_reads_back_the_same_outputs(tmp_path):
  calls = []
  out = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "curve": [(0, 0.5), (10, 0.75)], "name": "x",
         "none": None, "nan": float("nan"), "n": np.int64(3), "flag": True}

  def fn():
    calls.append(1)
    return out

  first = stages.run_stage(str(tmp_path), "a/s0", fn)
  again = stages.run_stage(str(tmp_path), "a/s0", fn)
  assert len(calls) == 1
  for got in (first, again):
    np.testing.assert_array_equal(got["params"]["w"], np.arange(6.0).reshape(2, 3))
    assert got["curve"] == [(0, 0.5), (10, 0.75)] and got["name"] == "x" and got["none"] is None
    assert np.isnan(got["nan"]) and got["n"] == 3 and got["flag"] is True
  rec = json.load(open(tmp_path / "stages" / "a" / "s0" / "stage.json"))
  assert rec["status"] == "finished" and rec["wall_s"] >= 0


def test_altered_outputs_rerun_the_stage_and_keep_the_old_files(tmp_path, capsys):
  stages.run_stage(str(tmp_path), "st", lambda: {"x": np.ones(3)})
  npz = tmp_path / "stages" / "st" / "outputs.npz"
  data = bytearray(npz.read_bytes())
  data[-20] ^= 0xFF
  npz.write_bytes(bytes(data))
  out = stages.run_stage(str(tmp_path), "st", lambda: {"x": np.zeros(3)})
  np.testing.assert_array_equal(out["x"], np.zeros(3))
  assert "checksum" in capsys.readouterr().out
  assert [d for d in os.listdir(tmp_path / "stages") if d.startswith("st.unreadable-")]


def test_a_stop_request_stops_before_the_next_stage(tmp_path):
  with interrupt.handling():
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(interrupt.Interrupted) as e:
      stages.run_stage(str(tmp_path), "later", lambda: pytest.fail("the stage must not start"))
  assert e.value.exit_code == 143 and "before stage later" in str(e.value)
  assert not stages.is_finished(str(tmp_path), "later")


def test_sweep_writes_results_after_each_cell_and_skips_finished_ones(tmp_path):
  seen = []

  def fn(cell):
    arm, seed = cell
    seen.append(cell)
    return {"acc": float(seed) + (0.5 if arm == "b" else 0.0)}

  def summarize(done):
    return {"cells": len(done), "b": stages.mean_std([v["acc"] for (a, _), v in done.items() if a == "b"])}

  cells = [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
  stages.sweep(str(tmp_path), cells[:3], fn, summarize)
  assert json.load(open(tmp_path / "results.json"))["cells"] == 3
  stages.sweep(str(tmp_path), cells, fn, summarize)
  assert seen == cells  # the first three ran once
  res = json.load(open(tmp_path / "results.json"))
  assert res["b"]["values"] == [0.5, 1.5] and res["b"]["n"] == 2
  assert sorted(os.listdir(tmp_path / "stages")) == ["a", "b"]


# ------------------------------------------------------------------------------------------ ArrayBatches


def test_array_batches_are_a_function_of_seed_and_position():
  arrays = {"x": np.arange(10), "y": np.arange(10) * 2}
  a = ArrayBatches(arrays, 4, seed=0, name="b", replace=False)
  first = [next(a) for _ in range(5)]
  for b in first:
    np.testing.assert_array_equal(b["y"], 2 * b["x"])
  # epochs of 10 // 4 = 2 batches: each epoch's 8 rows are distinct
  assert len(set(np.concatenate([first[0]["x"], first[1]["x"]]))) == 8
  b = ArrayBatches(arrays, 4, seed=0, name="b", replace=False)
  b.set_state(json.loads(json.dumps(a.get_state())))
  np.testing.assert_array_equal(next(b)["x"], next(a)["x"])
  c = ArrayBatches(arrays, 4, seed=0, name="b", replace=False)
  c.set_state({"k": 3})
  np.testing.assert_array_equal(next(c)["x"], first[3]["x"])
  assert not np.array_equal(ArrayBatches(arrays, 4, seed=1, name="b")._np_stream(1, "b", 0).integers(0, 10, 4),
                            ArrayBatches(arrays, 4, seed=0, name="b")._np_stream(0, "b", 0).integers(0, 10, 4))


# ------------------------------------------------------------------------------------------ loop: batch_fn, stop_fn


def _linear_problem():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32, 3)).astype(np.float32)
  y = x @ np.array([1.0, -2.0, 0.5], np.float32)
  return x, y


def _sq_loss(p, frozen, b, rng):
  del frozen, rng
  return jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2), {}


def test_batch_fn_sees_the_current_state_and_stop_fn_ends_early_with_a_checkpoint(tmp_path):
  x, y = _linear_problem()
  tx = optax.sgd(0.05)
  seen_w = []

  def batch_fn(step, state):
    seen_w.append(np.asarray(state["params"]["w"]).copy())
    idx = np.random.default_rng(step).integers(0, 32, 8)  # a pure function of the step
    return {"x": x[idx], "y": y[idx], "n": np.int32(len(idx))}

  def step_fn(state, frozen, batch, rng):
    new, m = loop.optax_step(_sq_loss, tx)({**state}, frozen, batch, rng)
    return dict(new, seen=state["seen"] + batch["n"]), m

  init = lambda key: {**loop.optax_state({"w": jnp.zeros(3)}, tx), "seen": jnp.int32(0)}  # noqa: E731
  w = Writer(str(tmp_path), enabled=False)
  res = stages.train(str(tmp_path), "fit", writer=w, total_steps=50, step_fn=step_fn, init_fn=init, seed=0,
                     batch_fn=batch_fn, stop_fn=lambda s, st: int(st["seen"]) >= 60, ckpt_every=0)
  assert res.steps == 8 and int(res.state["seen"]) == 64  # 8 rows a step: the 8th step passes 60
  # the reference: the same SGD steps by hand, each on the batch of the state before it
  wref = np.zeros(3, np.float32)
  for k in range(8):
    np.testing.assert_allclose(seen_w[k], wref, atol=1e-6)
    idx = np.random.default_rng(k).integers(0, 32, 8)
    g = 2 * x[idx].T @ (x[idx] @ wref - y[idx]) / 8
    wref = wref - 0.05 * g
  np.testing.assert_allclose(np.asarray(res.state["params"]["w"]), wref, atol=1e-5)


def test_early_stop_is_checkpointed_and_a_rerun_does_not_train_past_it(tmp_path):
  x, y = _linear_problem()
  tx = optax.sgd(0.05)
  kw = dict(writer=Writer(str(tmp_path), enabled=False), total_steps=40, seed=0,
            step_fn=loop.optax_step(_sq_loss, tx), init_fn=lambda key: loop.optax_state({"w": jnp.zeros(3)}, tx),
            data=ArrayBatches({"x": x, "y": y}, 8, seed=0, name="fit"), stop_fn=lambda s, st: s >= 13)
  first = stages.train(str(tmp_path), "fit", **kw)
  assert first.steps == 13 and os.listdir(stages.checkpoint_dir(str(tmp_path), "fit")) == ["13"]
  kw["data"] = ArrayBatches({"x": x, "y": y}, 8, seed=0, name="fit")
  again = stages.train(str(tmp_path), "fit", **kw)
  assert again.steps == 13 and again.resumed_from == 13
  np.testing.assert_array_equal(np.asarray(again.state["params"]["w"]), np.asarray(first.state["params"]["w"]))


def test_injected_nan_stops_with_the_step_and_keeps_the_state(tmp_path, monkeypatch):
  x, y = _linear_problem()
  tx = optax.sgd(0.05)
  monkeypatch.setenv(loop.FAULT_ENV, "nan:fit:5")
  with pytest.raises(loop.NonFiniteLossError, match="NaN/Inf at step 5"):
    stages.train(str(tmp_path), "fit", writer=Writer(str(tmp_path), enabled=False), total_steps=20, seed=0,
                 step_fn=loop.optax_step(_sq_loss, tx), init_fn=lambda key: loop.optax_state({"w": jnp.zeros(3)}, tx),
                 data=ArrayBatches({"x": x, "y": y}, 8, seed=0, name="fit"), ckpt_every=4, log_every=1)
  assert os.listdir(stages.checkpoint_dir(str(tmp_path), "fit")) == ["4"]


# ------------------------------------------------------------------------------------------ minibatch update


def _masked_loss(p, frozen, b, rng):
  del frozen, rng
  err = (b["x"] @ p["w"] - b["y"]) ** 2
  return jnp.sum(b["mask"] * err) / jnp.maximum(jnp.sum(b["mask"]), 1.0), {}


def test_one_full_minibatch_equals_one_gradient_step_on_the_real_rows():
  x, y = _linear_problem()
  buf = {"x": np.concatenate([x, np.full((5, 3), 7.0, np.float32)]),
         "y": np.concatenate([y, np.full(5, -3.0, np.float32)]),
         "mask": np.concatenate([np.ones(32), np.zeros(5)]).astype(np.float32)}
  tx = optax.sgd(0.1)
  state = {"params": {"w": jnp.zeros(3)}, "opt_state": tx.init({"w": jnp.zeros(3)})}
  new, m = jax.jit(minibatch_update(_masked_loss, tx, epochs=1, minibatch=37))(state, {}, buf, jax.random.key(0))
  g = 2 * x.T @ (x @ np.zeros(3) - y) / 32  # padding rows ignored
  np.testing.assert_allclose(np.asarray(new["params"]["w"]), -0.1 * g, rtol=1e-5)
  assert float(m["updates"]) == 1


def test_minibatches_cover_each_real_row_once_per_epoch_and_padding_changes_nothing():
  x, y = _linear_problem()
  tx = optax.adam(0.1)  # a zero-gradient Adam step would still move the params: the update must skip it
  n_pad = 24
  buf = {"x": np.concatenate([x[:8], np.zeros((n_pad, 3), np.float32)]),
         "y": np.concatenate([y[:8], np.zeros(n_pad, np.float32)]),
         "mask": np.concatenate([np.ones(8), np.zeros(n_pad)]).astype(np.float32)}
  state = {"params": {"w": jnp.zeros(3)}, "opt_state": tx.init({"w": jnp.zeros(3)})}
  step = jax.jit(minibatch_update(_masked_loss, tx, epochs=3, minibatch=8))
  new, m = step(state, {}, buf, jax.random.key(1))
  assert float(m["updates"]) == 3  # 4 minibatches per epoch, only the first has real rows
  # the reference: three Adam steps on the 8 real rows (one full minibatch per epoch, any order)
  p, s = {"w": jnp.zeros(3)}, tx.init({"w": jnp.zeros(3)})
  real = {"x": x[:8], "y": y[:8], "mask": np.ones(8, np.float32)}
  for _ in range(3):
    grads = jax.grad(lambda q: _masked_loss(q, None, real, None)[0])(p)
    u, s = tx.update(grads, s, p)
    p = optax.apply_updates(p, u)
  np.testing.assert_allclose(np.asarray(new["params"]["w"]), np.asarray(p["w"]), rtol=1e-5, atol=1e-6)
  empty = dict(buf, mask=np.zeros_like(buf["mask"]))
  same, m0 = step(state, {}, empty, jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(same["params"]["w"]), np.zeros(3))
  assert float(m0["updates"]) == 0
