"""Train loop: resume after k steps is bitwise equal to an uninterrupted run; NaN guard keeps the last good ckpt."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from lmx.core import checkpoint as ckpt_lib
from lmx.core import config as config_lib
from lmx.core import data as data_lib
from lmx.core import loop
from lmx.core import mesh as mesh_lib
from lmx.methods import lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lm_config(steps=12):
  cfg = config_lib.load_config_file(f"{ROOT}/configs/lm.py:smoke")
  cfg.mesh.update(data=2, fsdp=2, model=2)
  cfg.model.update(d_model=32, d_ff=64, n_layers=1)
  cfg.data.update(seq_len=32, global_batch=8)
  cfg.train.update(steps=steps, log_every=2, eval_every=6, ckpt_every=4, plot=False, async_checkpointing=True)
  return cfg


def _final_state(workdir, step):
  return ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))


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


def test_resume_is_bitwise_equal(tmp_path, monkeypatch):
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

  sa, sb = _final_state(a, 12), _final_state(b, 12)
  for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  ra, rb = _records(a), _records(b)
  after = {k: v for k, v in ra.items() if k[0] > 6}
  assert after and all(rb[k] == v for k, v in after.items())  # same losses, same data order


def test_nan_loss_stops_clearly_and_keeps_last_good_checkpoint(tmp_path):
  cfg = ml_collections.ConfigDict(dict(
      method="toy", seed=0, train=dict(log_every=1, ckpt_every=2, ckpt_keep=3, async_checkpointing=False)))
  mesh = mesh_lib.make_mesh(dict(data=-1), devices=jax.devices()[:1])
  xs = np.ones((40, 1), np.float32)
  xs[13] = np.nan  # batch 6 (batch size 2) holds a NaN
  ds = data_lib.make_dataset(xs, global_batch=2, seed=0, shuffle=False)
  batches = data_lib.GlobalBatches(data_lib.make_iterator(ds), mesh_lib.batch_sharding(mesh, ()))

  def loss_fn(params, batch, rng):
    return jnp.mean((batch * params["w"] - 1.0) ** 2), {}

  tx = optax.sgd(0.1)
  with pytest.raises(loop.NonFiniteLossError, match=r"NaN/Inf at step 6 .*last good checkpoint \(step 6\)"):
    loop.train(config=cfg, workdir=str(tmp_path), mesh=mesh, init_params=lambda k: {"w": jnp.zeros((1,))},
               loss_fn=loss_fn, params_shardings={"w": mesh_lib.replicated(mesh)}, tx=tx,
               schedule=lambda s: 0.1, batches=batches, total_steps=20)
  with ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")) as ck:
    assert ck.all_steps() == [2, 4, 6]
    state = _final_state(str(tmp_path), 6)
  assert np.isfinite(np.asarray(state["params"]["w"])).all()
