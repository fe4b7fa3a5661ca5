"""Sharding on the 8 fake devices: parameters and batches land where the logical-axis rules say (the actual
``.sharding.spec`` and each device's slice against the single-device array), and the sharded forward, loss and
gradients equal a single-device run, with the loss checked against NumPy cross-entropy."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from lmx.core import config as config_lib
from lmx.core import mesh as mesh_lib
from lmx.models.transformer import Transformer, TransformerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = mesh_lib.DEFAULT_AXIS_RULES


def _smoke_model():
  """The configs/lm.py:smoke transformer: (config, model config, graphdef, abstract params, init)."""
  cfg = config_lib.load_config_file(f"{ROOT}/configs/lm.py:smoke")
  mcfg = TransformerConfig.from_config(cfg.model, axis_rules=cfg.axis_rules)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0))), nnx.Param)

  def init_params(key):
    return nnx.to_pure_dict(nnx.split(Transformer(mcfg, rngs=nnx.Rngs(params=key)), nnx.Param)[1])

  return cfg, mcfg, graphdef, abstract, init_params


def _on_one_device(tree):
  return jax.device_put(tree, jax.devices()[0])


def _assert_shards_are_slices(x, full):
  """Every device's shard of ``x`` is the slice of the single-device array ``full`` at its index."""
  full = np.asarray(full)
  for shard in x.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])


def test_param_shardings_follow_rules():
  cfg, _, _, abstract, init_params = _smoke_model()
  assert cfg.axis_rules == RULES
  mesh = mesh_lib.make_mesh(dict(data=2, fsdp=2, model=2))
  shardings = mesh_lib.param_shardings(abstract, mesh, RULES)
  expected = {
      ("blocks", 0, "ffn", "w1"): P("fsdp", "model"),  # (embed, mlp)
      ("blocks", 0, "ffn", "w2"): P("model", "fsdp"),  # (mlp, embed)
      ("embed",): P("model", "fsdp"),  # (vocab, embed)
      ("unembed",): P("fsdp", "model"),  # (embed, vocab)
      ("blocks", 0, "attn", "wq"): P("fsdp", "model", None),  # (embed, heads, head_dim)
      ("blocks", 1, "attn", "wo"): P("model", None, "fsdp"),  # (heads, head_dim, embed)
      ("final_norm", "scale"): P("fsdp"),  # (embed,)
  }
  with jax.set_mesh(mesh):
    params = jax.jit(init_params, out_shardings=shardings)(jax.random.key(0))
  single = init_params(jax.random.key(0))  # eager, one device
  for path, spec in expected.items():
    sh, p, ref = shardings, params, single
    for k in path:
      sh, p, ref = sh[k], p[k], ref[k]
    assert sh.spec == spec, path
    assert p.sharding.spec == spec, path
    assert len(p.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(p), np.asarray(ref), rtol=1e-6, atol=1e-8)  # jit vs eager fusion
    for shard in p.addressable_shards:  # each device holds its own block, not a copy of the whole
      assert shard.data.size == p.size // np.prod([mesh.shape[a] for a in spec if a])
  # A dimension that the mesh axes do not divide is replicated rather than failing; a mesh axis is used once.
  assert mesh_lib.logical_to_spec(("vocab", "embed"), (259, 64), mesh, RULES) == P(None, "fsdp")
  assert mesh_lib.logical_to_spec(("heads", "mlp"), (4, 8), mesh, RULES) == P("model", None)


@pytest.mark.parametrize("mesh_sizes,rules,spec,divisor", [
    (dict(data=2, fsdp=2, model=2), RULES, P(("data", "fsdp"), None), 4),
    (dict(data=2, expert=4), RULES, P(("data", "expert"), None), 8),
    (dict(model=8), RULES, P(None, None), 1),  # no batch axis in the mesh: replicated
    (dict(data=2, fsdp=4), (("batch", "fsdp"),), P("fsdp", None), 4),
    (dict(data=8), (), P("data", None), 8),  # rules without "batch": the default rules' batch axes
])
def test_batch_sharding_places_rows_by_the_rules(mesh_sizes, rules, spec, divisor):
  mesh = mesh_lib.make_mesh(mesh_sizes)
  assert mesh_lib.batch_size_divisor(mesh, rules) == divisor
  batch = np.arange(16 * 5, dtype=np.int32).reshape(16, 5)
  x = jax.device_put(batch, mesh_lib.batch_sharding(mesh, rules))
  assert x.sharding.spec == spec
  _assert_shards_are_slices(x, batch)
  # Which rows a device holds follows from its mesh coordinates: block index = row-major over the batch axes.
  axes = [a for a in mesh_lib.batch_axes(rules) if mesh.shape.get(a, 1) > 1]
  rows = len(batch) // divisor
  coords = {d: dict(zip(mesh.axis_names, c)) for c, d in np.ndenumerate(mesh.devices)}
  for shard in x.addressable_shards:
    block = 0
    for a in axes:
      block = block * mesh.shape[a] + coords[shard.device][a]
    np.testing.assert_array_equal(np.asarray(shard.data), batch[block * rows:(block + 1) * rows])
  with jax.set_mesh(mesh):
    np.testing.assert_array_equal(jax.jit(lambda x: jnp.sum(x, axis=0))(x), batch.sum(axis=0))


def test_batch_axes_come_from_the_rules():
  assert mesh_lib.batch_axes(RULES) == ("data", "fsdp", "expert")
  assert mesh_lib.batch_axes(None) == mesh_lib.batch_axes(()) == ("data", "fsdp", "expert")
  assert mesh_lib.batch_axes((("batch", "data"), ("embed", "fsdp"))) == ("data",)
  assert mesh_lib.batch_axes((("batch", None),)) == ()
  cfg = config_lib.load_config_file(f"{ROOT}/configs/lm.py:smoke")
  assert TransformerConfig.from_config(cfg.model).batch_axes == ()  # the default rules' axes at run time
  assert TransformerConfig.from_config(cfg.model, axis_rules=(("batch", ["fsdp"]),)).batch_axes == ("fsdp",)
  with pytest.raises(config_lib.ConfigError, match="model.batch_axes"):
    TransformerConfig.from_config(dict(cfg.model, batch_axes=["data"]), axis_rules=RULES)


def _np_next_token_ce(logits_BTV, targets_BT):
  z = np.asarray(logits_BTV, np.float64)
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -np.mean(np.take_along_axis(logp, np.asarray(targets_BT)[..., None], axis=-1))


def test_sharded_forward_loss_and_grads_equal_single_device():
  cfg, _, graphdef, abstract, init_params = _smoke_model()
  mesh = mesh_lib.make_mesh(dict(data=2, fsdp=2, model=2))
  shardings = mesh_lib.param_shardings(abstract, mesh, cfg.axis_rules)

  def loss(params, batch_BT):
    logits = nnx.merge(graphdef, params)(batch_BT[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch_BT[:, 1:]).mean(), logits

  params = init_params(jax.random.key(0))
  batch = np.asarray(jax.random.randint(jax.random.key(1), (8, 33), 0, 256))
  grad_fn = jax.value_and_grad(loss, has_aux=True)
  (ref_l, ref_logits), ref_g = jax.jit(grad_fn)(_on_one_device(params), _on_one_device(batch))
  assert len(ref_l.sharding.device_set) == 1
  with jax.set_mesh(mesh):
    sp = jax.device_put(params, shardings)
    sb = jax.device_put(batch, mesh_lib.batch_sharding(mesh, cfg.axis_rules))
    (l, logits), g = jax.jit(grad_fn, out_shardings=((mesh_lib.replicated(mesh), None), shardings))(sp, sb)
  assert sb.sharding.spec == P(("data", "fsdp"), None)
  assert logits.sharding.spec[0] == ("data", "fsdp")  # activations stay split over the batch axes
  assert g["blocks"][0]["ffn"]["w1"].sharding.spec == P("fsdp", "model")
  assert g["embed"].sharding.spec == P("model", "fsdp")
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(l), _np_next_token_ce(ref_logits, batch[:, 1:]), rtol=1e-5)
  np.testing.assert_allclose(float(l), float(ref_l), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
