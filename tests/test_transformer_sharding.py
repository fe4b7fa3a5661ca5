"""The LM train step users run (``lmx.train.lm.make_step`` on ``configs/lm.py:smoke``, clipped AdamW on
the warmup-cosine schedule, compiled once by :class:`lmx.core.loop.Loop`) gives the same losses, metrics and
parameters on 8 fake devices as on one device (fp32), dense and MoE, with parameter shardings from the
logical-axis rules; activations follow the rules' batch axes."""
import os

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from lmx.core import config as config_lib
from lmx.core import loop as loop_lib
from lmx.core import mesh as mesh_lib
from lmx.train.lm import make_step  # (lmx.methods.lm re-exports the function run, not the module)
from lmx.models.registry import build_model
from lmx.models.transformer import Transformer, TransformerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
B, T = 8, 16
CLIP_NORM = 0.5  # below the initial gradient norm, so that clipping (a global norm over all shards) acts


def _config(moe: bool, **model_kw):
  """configs/lm.py:smoke with a small dense or MoE model; lr warms up over 1 step, then decays (cosine)."""
  cfg = config_lib.load_config_file(f"{ROOT}/configs/lm.py:smoke")
  cfg.model.update(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)
  if moe:
    cfg.model.update(moe_every=1, n_experts=4, top_k=2, moe_d_ff=32)
  cfg.model.update(model_kw)
  cfg.optim.update(warmup_steps=1, clip_norm=CLIP_NORM)
  cfg.train.update(steps=STEPS)
  return cfg


def _mesh(**sizes):
  return mesh_lib.make_mesh(dict(dict(data=1, fsdp=1, model=1, expert=1), **sizes))


def _train(cfg, mesh, workdir):
  """STEPS steps of ``make_step`` through one ``Loop.compile``. Returns (per-step host metrics, final host
  params, final device params, the params' shardings from the rules)."""
  model = build_model(cfg.model, axis_rules=cfg.axis_rules)
  model.cfg.check_mesh(dict(mesh.shape))
  step_fn, init_fn, shardings = make_step(cfg, model, mesh)
  lp = loop_lib.Loop(step_fn=step_fn, init_fn=init_fn, state_shardings=shardings, mesh=mesh, workdir=workdir,
                     total_steps=STEPS, seed=0)
  bsh = mesh_lib.batch_sharding(mesh, cfg.axis_rules)
  batches = [jax.device_put(np.asarray(jax.random.randint(jax.random.key(10 + i), (B, T + 1), 0,
                                                          cfg.model.vocab_size), np.int32), bsh)
             for i in range(STEPS)]
  state = lp.fresh_state()
  history = []
  with jax.set_mesh(mesh):
    compiled = lp.compile(state, batches[0])  # one executable for every step: nothing can recompile
    for batch in batches:
      state, metrics = compiled(state, lp.frozen, batch)
      history.append({k: loop_lib.host(v) for k, v in metrics.items()})
  assert int(loop_lib.host(state["step"])) == STEPS and int(loop_lib.host(state["guard"]["bad"])) == 0
  return history, jax.tree.map(np.asarray, state["params"]), state["params"], shardings["params"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """``reference(moe)``: the same run on a one-device mesh, shared by the mesh cases of one model."""
  cache = {}

  def get(moe: bool):
    if moe not in cache:
      one = mesh_lib.make_mesh(dict(data=1), devices=jax.devices()[:1])
      history, params, dev_params, _ = _train(_config(moe), one, str(tmp_path_factory.mktemp(f"ref_moe{moe}")))
      assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(dev_params))
      cache[moe] = history, params
    return cache[moe]

  return get


@pytest.mark.parametrize("moe,mesh_sizes", [
    (False, dict(data=2, fsdp=2, model=2)),
    (True, dict(data=2, fsdp=2, model=2)),
    (True, dict(data=2, expert=4)),
])
def test_sharded_train_step_equals_unsharded(moe, mesh_sizes, reference, tmp_path):
  cfg = _config(moe)
  mesh = _mesh(**mesh_sizes)
  ref_history, ref_params = reference(moe)
  history, params, dev_params, want_sh = _train(cfg, mesh, str(tmp_path / "sharded"))

  # The run is non-trivial: lr warms up from 0 then decays, and clipping acts on the global gradient norm.
  lrs = [float(m["lr"]) for m in history]
  assert lrs[0] == 0.0 and lrs[1] == pytest.approx(cfg.optim.lr) and lrs[1] > lrs[2] > lrs[3] > 0
  assert max(float(m["grad_norm"]) for m in history) > CLIP_NORM
  np.testing.assert_allclose([m["loss"] for m in history], [m["loss"] for m in ref_history], rtol=1e-5)
  for m, ref in zip(history, ref_history):
    assert m.keys() == ref.keys() and {"loss", "ce", "grad_norm", "lr"} <= m.keys()
    assert ("moe/lb_loss" in m) == moe and ("moe/layer1/load/e3" in m) == moe
    for k in m:
      np.testing.assert_allclose(m[k], ref[k], rtol=1e-4, atol=1e-6, err_msg=k)
  assert jax.tree.structure(params) == jax.tree.structure(ref_params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

  # Every parameter keeps the sharding the logical-axis rules give it through all steps ...
  assert jax.tree.structure(dev_params) == jax.tree.structure(want_sh)
  for x, sh in zip(jax.tree.leaves(dev_params), jax.tree.leaves(want_sh)):
    assert x.sharding.spec == sh.spec
  # ... and those are the rules' mesh axes (written out, so that a wrong rule fails here).
  w1 = dev_params["blocks"][0]["ffn"]["w1"]
  if not moe:
    assert w1.sharding.spec == P("fsdp", "model")  # (embed, mlp)
  elif mesh_sizes.get("expert", 1) > 1:
    assert w1.sharding.spec == P("expert", None, None)  # (expert, embed, mlp) on data x expert
  else:
    assert w1.sharding.spec == P(None, "fsdp", "model")


def test_expert_axis_must_divide_experts():
  from lmx.core.config import ConfigError
  cfg = _config(True, n_experts=6)
  model = build_model(cfg.model, axis_rules=cfg.axis_rules)
  with pytest.raises(ConfigError, match=r"model.n_experts=6 is not divisible by .*mesh.expert=4"):
    model.cfg.check_mesh(dict(_mesh(data=2, expert=4).shape))


@pytest.mark.parametrize("rules,expected", [
    (None, ("data", "fsdp")),  # default rules: data, fsdp, expert (expert=1 here)
    ((("batch", "data"),), "data"),
    ((("batch", ("fsdp", "data")),), ("fsdp", "data")),
])
def test_activations_split_over_the_rules_batch_axes(rules, expected):
  mcfg = TransformerConfig.from_config(dict(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                            d_ff=64, max_seq_len=32), axis_rules=rules)
  assert mcfg.batch_axes == (() if rules is None else mesh_lib.batch_axes(rules))
  graphdef, params = nnx.split(Transformer(mcfg, rngs=nnx.Rngs(0)), nnx.Param)
  tokens = jax.random.randint(jax.random.key(0), (8, 16), 0, 64)
  with jax.set_mesh(_mesh(data=2, fsdp=2, model=2)):
    hidden = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t, return_hidden=True)[1])(params, tokens)
  assert hidden.sharding.spec[1] == expected  # [L+1, B, T, D]: B over the batch axes, nothing else
  assert all(a is None for a in hidden.sharding.spec[2:])
