"""Dense and MoE train steps sharded on 8 fake devices equal the unsharded step (fp32), with parameter
shardings from the logical-axis rules and no recompilation across steps; activations follow the rules' batch
axes."""
import functools

import chex
import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from lmx.core import mesh as mesh_lib
from lmx.models.transformer import Transformer, TransformerConfig

STEPS = 3
B, T = 8, 16


def _cfg(moe: bool, **kw):
  base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)
  if moe:
    base.update(moe_every=1, n_experts=4, top_k=2, moe_d_ff=32)
  base.update(kw)
  return TransformerConfig.from_config(base)


def _train(mcfg, mesh=None):
  """Runs STEPS AdamW steps; sharded over ``mesh`` when given. Returns (losses, metrics, final params)."""
  abstract = nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract, nnx.Param)
  params = nnx.to_pure_dict(nnx.split(Transformer(mcfg, rngs=nnx.Rngs(0)), nnx.Param)[1])
  tx = optax.adamw(3e-3)

  def loss_fn(params, batch_BT):
    logits, aux = nnx.merge(graphdef, params)(batch_BT[:, :-1], return_aux=True)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch_BT[:, 1:]).mean()
    return ce + aux["aux_loss"], aux["metrics"]

  def step(params, opt_state, batch_BT):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_BT)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, metrics

  batches = [jax.random.randint(jax.random.key(10 + i), (B, T + 1), 0, mcfg.vocab_size) for i in range(STEPS)]
  chex.clear_trace_counter()  # counters are keyed by the function's code, shared by the two runs
  step = chex.assert_max_traces(step, n=1)
  if mesh is None:
    fn = jax.jit(step)
    opt_state = tx.init(params)
  else:
    mcfg.check_mesh(mesh.shape)
    p_sh = mesh_lib.param_shardings(abstract_params, mesh, mesh_lib.DEFAULT_AXIS_RULES)
    rep = mesh_lib.replicated(mesh)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params), p_sh,
                                   transform_non_params=lambda _: rep)
    b_sh = mesh_lib.batch_sharding(mesh, mesh_lib.DEFAULT_AXIS_RULES)
    with jax.set_mesh(mesh):
      params = jax.device_put(params, p_sh)
      opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    batches = [jax.device_put(b, b_sh) for b in batches]
    fn = jax.jit(step, in_shardings=(p_sh, opt_sh, b_sh), out_shardings=(p_sh, opt_sh, rep, rep))
  losses, metrics = [], None
  with jax.set_mesh(mesh) if mesh is not None else _null():
    for b in batches:
      params, opt_state, loss, metrics = fn(params, opt_state, b)
      losses.append(float(loss))
  return losses, metrics, params


class _null:
  def __enter__(self):
    return None

  def __exit__(self, *a):
    return False


@functools.lru_cache(maxsize=None)
def _reference(moe: bool):
  """Unsharded run, shared by the mesh cases of one model."""
  return _train(_cfg(moe))


def _mesh(**sizes):
  return mesh_lib.make_mesh(dict(dict(data=1, fsdp=1, model=1, expert=1), **sizes))


@pytest.mark.parametrize("moe,mesh_sizes", [
    (False, dict(data=2, fsdp=2, model=2)),
    (True, dict(data=2, fsdp=2, model=2)),
    (True, dict(data=2, expert=4)),
])
def test_sharded_train_step_equals_unsharded(moe, mesh_sizes):
  mcfg = _cfg(moe)
  mesh = _mesh(**mesh_sizes)
  ref_losses, ref_metrics, ref_params = _reference(moe)
  losses, metrics, params = _train(mcfg, mesh)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  if moe:
    assert metrics.keys() == ref_metrics.keys()
    for k in ("moe/lb_loss", "moe/z_loss", "moe/layer0/load/e0", "moe/cv"):
      np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-4, atol=1e-6)
    w1 = params["blocks"][0]["ffn"]["w1"]
    if mesh_sizes.get("expert", 1) > 1:
      assert w1.sharding.spec == P("expert", None, None)  # (expert, embed, mlp) on data x expert
    else:
      assert w1.sharding.spec == P(None, "fsdp", "model")
  else:
    assert params["blocks"][0]["ffn"]["w1"].sharding.spec == P("fsdp", "model")


def test_expert_axis_must_divide_experts():
  from lmx.core.config import ConfigError
  with pytest.raises(ConfigError, match=r"model.n_experts=6 is not divisible by .*mesh.expert=4"):
    _cfg(True, n_experts=6).check_mesh(_mesh(data=2, expert=4).shape)


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
