"""Sharded (data=2, fsdp=2, model=2) loss and gradients equal unsharded; parameter shardings follow the rules."""
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from lmx.core import config as config_lib
from lmx.core import mesh as mesh_lib
from lmx.methods.lm.run import build, next_token_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup(mesh_cfg):
  cfg = config_lib.load_config_file(f"{ROOT}/configs/lm.py:smoke")
  cfg.mesh.update(mesh_cfg)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  _, graphdef, init_params, shardings = build(cfg, mesh)

  def loss(params, batch):
    return next_token_loss(nnx.merge(graphdef, params)(batch[:, :-1]), batch[:, 1:])

  batch = jax.random.randint(jax.random.key(1), (8, 33), 0, 256)
  return cfg, mesh, init_params, shardings, loss, batch


def test_param_shardings_follow_rules():
  cfg, mesh, init_params, shardings, _, _ = _setup(dict(data=2, fsdp=2, model=2))
  assert shardings["blocks"][0]["ffn"]["w1"].spec == P("fsdp", "model")  # (embed, mlp)
  assert shardings["blocks"][0]["ffn"]["w2"].spec == P("model", "fsdp")  # (mlp, embed)
  assert shardings["embed"].spec == P("model", "fsdp")  # (vocab, embed)
  assert shardings["blocks"][0]["attn"]["wq"].spec == P("fsdp", "model", None)  # (embed, heads, head_dim)
  with jax.set_mesh(mesh):
    params = jax.jit(init_params, out_shardings=shardings)(jax.random.key(0))
  assert params["blocks"][0]["ffn"]["w1"].sharding.spec == P("fsdp", "model")
  # A dimension that the mesh axes do not divide is replicated rather than failing.
  assert mesh_lib.logical_to_spec(("vocab", "embed"), (259, 64), mesh, cfg.axis_rules) == P(None, "fsdp")


def test_sharded_loss_and_grads_equal_unsharded():
  _, mesh, init_params, shardings, loss, batch = _setup(dict(data=2, fsdp=2, model=2))
  params = init_params(jax.random.key(0))
  ref_l, ref_g = jax.jit(jax.value_and_grad(loss))(params, batch)
  with jax.set_mesh(mesh):
    sp = jax.device_put(params, shardings)
    sb = jax.device_put(batch, mesh_lib.batch_sharding(mesh, (("batch", ("data", "fsdp")),)))
    l, g = jax.jit(jax.value_and_grad(loss), out_shardings=(mesh_lib.replicated(mesh), shardings))(sp, sb)
  np.testing.assert_allclose(np.asarray(l), np.asarray(ref_l), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
  assert g["blocks"][0]["ffn"]["w1"].sharding.spec == P("fsdp", "model")


def test_single_device_mesh_runs_same_code():
  cfg = config_lib.load_config_file(f"{ROOT}/configs/lm.py:smoke")
  mesh1 = mesh_lib.make_mesh(dict(data=-1), devices=jax.devices()[:1])
  assert mesh1.size == 1
  _, graphdef, init_params, shardings = build(cfg, mesh1)
  assert all(s.spec == P() or all(a is None for a in s.spec) for s in jax.tree.leaves(shardings))
  with jax.set_mesh(mesh1):
    params = jax.jit(init_params, out_shardings=shardings)(jax.random.key(0))
  ref = init_params(jax.random.key(0))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)  # jit vs eager fusion
