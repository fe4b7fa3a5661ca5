"""Expert parallelism of the dropless MoE (``lmx.models.moe.expert_parallel_dispatch``) on 8 fake CPU devices:
the compiled layer exchanges tokens with all-to-alls (and gathers no activations), per-device FLOPs fall as
1/ep at a fixed global batch, and outputs and gradients equal the single-device computation (the per-token loop
``dense_reference`` and the unsharded layer / Transformer), also when routing is skewed onto one expert shard."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmx.core import mesh as mesh_lib
from lmx.models import moe as moe_lib
from lmx.models.transformer import Transformer, TransformerConfig

N, D, F, E, K = 64, 16, 32, 8, 2


def _mesh(n_devices=8, **sizes):
  return mesh_lib.make_mesh(dict(dict(data=1, fsdp=1, model=1, expert=1), **sizes),
                            devices=jax.devices()[:n_devices])


def _collectives(hlo: str) -> dict[str, int]:
  ops = re.findall(r" (all-to-all|all-gather|all-reduce|reduce-scatter|collective-permute)(?:-start)?\(", hlo)
  return {o: ops.count(o) for o in set(ops)}


def _weights(seed=0, e=E, d=D, f=F):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (e, d, f)) * 0.3, jax.random.normal(ks[1], (e, d, f)) * 0.3,
          jax.random.normal(ks[2], (e, f, d)) * 0.3)


def _routing(kind: str):
  """(experts_NK, gates_NK): "random" (about balanced); "skewed": 7 of 8 tokens choose expert 0 first; "one_shard":
  every token chooses experts 0 and 1, both on expert shard 0 (each source's n·k rows all go to one shard, the
  worst case the buffer is sized for)."""
  logits = jax.random.normal(jax.random.key(7), (N, E))
  if kind == "skewed":
    logits = logits.at[: N * 7 // 8, 0].add(10.0)
  elif kind == "one_shard":
    logits = logits.at[:, :2].add(jnp.array([20.0, 10.0]))
  experts, gates, _ = moe_lib.route(logits, K)
  return experts, gates


def _loss(fn):
  # A loss whose gradient differs per token and per output dimension.
  c = jax.random.normal(jax.random.key(9), (N, D))
  return lambda x, g, w1, w3, w2: jnp.sum(jnp.sin(fn(x, g, w1, w3, w2)) * c)


@pytest.mark.parametrize("sizes", [dict(data=4, expert=2), dict(data=2, expert=4)])
def test_compiled_layer_exchanges_tokens_with_all_to_all(sizes):
  moe = moe_lib.MoE(D, F, E, K, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(moe)
  mesh = _mesh(**sizes)
  x = jax.random.normal(jax.random.key(1), (8, 8, D))
  with jax.set_mesh(mesh):
    x = jax.device_put(x, mesh_lib.batch_sharding(mesh, None, 3))
    hlo = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0]).lower(state, x).compile().as_text()
  ops = _collectives(hlo)
  # Three exchanges (tokens there, their local expert ids, results back); tokens and router logits are never
  # gathered (the expert weights are already split over ``expert`` only on these meshes).
  assert ops.get("all-to-all", 0) >= 3, ops
  assert "all-gather" not in ops, ops
  # The groups are the devices of one ``expert`` row of the mesh.
  ep = sizes["expert"]
  groups = re.search(r"all-to-all\([^\n]*replica_groups=\{(\{[\d,]+\})", hlo).group(1)
  assert len(groups.strip("{}").split(",")) == ep


def test_per_device_flops_fall_with_expert_axis():
  """At one global batch, data=2 × expert=ep (2·ep devices): each device's share of the tokens is 1/(2·ep) and
  it holds E/ep experts. The per-device layer FLOPs (``cost_analysis`` of the SPMD program, which is per device)
  must then scale as 1/ep -- the global-sort path computes the whole batch on every device instead."""
  n, d, f = 512, 64, 128
  moe = moe_lib.MoE(d, f, E, K, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(moe)
  x = jax.random.normal(jax.random.key(1), (8, n // 8, d))

  def flops(ep):
    mesh = _mesh(2 * ep, data=2, expert=ep)
    with jax.set_mesh(mesh):
      xs = jax.device_put(x, mesh_lib.batch_sharding(mesh, None, 3))
      st = jax.device_put(state, mesh_lib.replicated(mesh))
      return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0]).lower(st, xs).compile().cost_analysis()["flops"]

  single = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0]).lower(state, x).compile().cost_analysis()["flops"]
  got = {ep: flops(ep) for ep in (1, 2, 4)}
  # ragged_dot on CPU is dense over its groups: N·k rows × E experts × 6·D·F on one device.
  assert single == pytest.approx(n * K * E * 6 * d * f, rel=0.05)
  assert got[1] / single == pytest.approx(1 / 2, rel=0.05)  # data=2: half the tokens each, all experts
  assert got[2] / got[1] == pytest.approx(1 / 2, rel=0.05)
  assert got[4] / got[1] == pytest.approx(1 / 4, rel=0.05)


@pytest.mark.parametrize("sizes,routing,impl,buffer_factor", [
    (dict(data=4, expert=2), "random", "ragged", 0.0),
    (dict(data=2, expert=4), "one_shard", "ragged", 0.0),
    (dict(data=2, expert=4), "skewed", "tiled", 0.0),
    (dict(data=2, expert=4), "random", "tiled", 2.0),   # the smaller buffer holds
    (dict(data=2, expert=4), "one_shard", "ragged", 2.0),  # it overflows: the worst-case rerun
    (dict(data=2, model=2, expert=2), "skewed", "ragged", 0.0),  # tokens split over model too
])
def test_dispatch_output_and_grads_equal_dense_reference(sizes, routing, impl, buffer_factor):
  experts, gates = _routing(routing)
  x = jax.random.normal(jax.random.key(1), (N, D))
  w1, w3, w2 = _weights()
  mesh = _mesh(**sizes)
  ref = _loss(lambda x, g, w1, w3, w2: moe_lib.dense_reference(x, experts, g, w1, w3, w2))
  with jax.set_mesh(mesh):
    am = jax.sharding.get_abstract_mesh()
    axes = moe_lib.expert_parallel_axes(am, N, E, mesh_lib.batch_axes())
    assert "expert" in axes and set(axes) == {a for a, s in sizes.items() if s > 1}

    def ep(x, g, w1, w3, w2):
      return moe_lib.expert_parallel_dispatch(x, experts, g, w1, w3, w2, mesh=am, axes=axes, impl=impl,
                                              buffer_factor=buffer_factor)

    out = jax.jit(ep)(x, gates, w1, w3, w2)
    grads = jax.jit(jax.grad(_loss(ep), argnums=(0, 1, 2, 3, 4)))(x, gates, w1, w3, w2)
  want = moe_lib.dense_reference(x, experts, gates, w1, w3, w2)
  # Every token's output is its full gated sum: a dropped assignment would lose a whole expert's term.
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  want_grads = jax.grad(ref, argnums=(0, 1, 2, 3, 4))(x, gates, w1, w3, w2)
  for name, a, b in zip(("x", "gates", "w1", "w3", "w2"), grads, want_grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


def test_buffer_bound():
  # n·min(k, E/ep): a token's k experts are distinct, so at most E/ep of them live on one shard.
  assert moe_lib.ep_buffer_rows(16, 2, 4, 2) == 32
  assert moe_lib.ep_buffer_rows(16, 4, 2, 4) == 32
  assert moe_lib.ep_buffer_rows(16, 2, 2, 4, buffer_factor=2.0) == 16  # 2 · 16·2/4
  assert moe_lib.ep_buffer_rows(16, 2, 4, 2, buffer_factor=4.0) == 32  # capped at the worst case
  # No mesh, one device, experts or tokens not divisible: the global (single-device) path.
  assert moe_lib.expert_parallel_axes(jax.sharding.get_abstract_mesh(), N, E) is None
  assert moe_lib.expert_parallel_axes(_mesh(1), N, E) is None
  assert moe_lib.expert_parallel_axes(_mesh(data=2, expert=4).abstract_mesh, N, 6) is None
  assert moe_lib.expert_parallel_axes(_mesh(data=2, expert=4).abstract_mesh, 12, E) is None
  assert moe_lib.expert_parallel_axes(_mesh(data=2, expert=4).abstract_mesh, N, E) == ("data", "expert")


def test_layer_under_ep_mesh_equals_unsharded_layer():
  """The MoE module (routing, dispatch, aux losses, statistics) and its gradients wrt the input and every
  parameter are the same under data=2 × expert=4 as without a mesh; skewed inputs push most tokens to one
  expert."""
  moe = moe_lib.MoE(D, F, E, K, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(moe)
  router = state["router"][...]
  # Inputs along expert 0's router column, so that most tokens choose expert 0.
  x = jax.random.normal(jax.random.key(1), (8, 8, D)) + 3.0 * router[:, 0] / jnp.linalg.norm(router[:, 0]) ** 2

  def loss(s, x):
    y, info = nnx.merge(graphdef, s)(x)
    return jnp.sum(jnp.sin(y)) + info["lb_loss"] + info["z_loss"], (y, info)

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  (ref_l, (ref_y, ref_info)), ref_g = fn(state, x)
  assert float(ref_info["load"][0]) > 0.3  # skewed: expert 0 takes > 30% of the assignments (balanced: 12.5%)
  mesh = _mesh(data=2, expert=4)
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, mesh_lib.batch_sharding(mesh, None, 3))
    (l, (y, info)), g = fn(state, xs)
    hlo = fn.lower(state, xs).compile().as_text()
  assert _collectives(hlo).get("all-to-all", 0) >= 4  # forward and backward exchanges (XLA fuses some)
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(l, ref_l, rtol=1e-5)
  for k in ("lb_loss", "z_loss", "load", "cv"):
    np.testing.assert_allclose(info[k], ref_info[k], rtol=1e-5, atol=1e-7, err_msg=k)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_transformer_forward_and_grads_under_ep_mesh_equal_unsharded():
  cfg = TransformerConfig.from_config(dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                           d_ff=64, max_seq_len=32, moe_every=1, n_experts=4, top_k=2,
                                           moe_d_ff=32))
  graphdef, abstract = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  params = nnx.to_pure_dict(abstract)
  tokens = jax.random.randint(jax.random.key(0), (8, 17), 0, 64)

  def loss(p, tokens):
    logits, aux = nnx.merge(graphdef, p)(tokens[:, :-1], return_aux=True)
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1))
    return ce + 0.01 * aux["aux_loss"], logits

  grad_fn = jax.value_and_grad(loss, has_aux=True)
  (ref_l, ref_logits), ref_g = jax.jit(grad_fn)(params, tokens)
  mesh = _mesh(data=4, expert=2)
  shardings = mesh_lib.param_shardings(abstract, mesh, mesh_lib.DEFAULT_AXIS_RULES)
  with jax.set_mesh(mesh):
    sp = jax.device_put(params, shardings)
    ts = jax.device_put(tokens, mesh_lib.batch_sharding(mesh, None))
    fn = jax.jit(grad_fn, out_shardings=((mesh_lib.replicated(mesh), None), shardings))
    (l, logits), g = fn(sp, ts)
    hlo = fn.lower(sp, ts).compile().as_text()
  assert sp["blocks"][0]["ffn"]["w1"].sharding.spec == jax.P("expert", None, None)
  assert _collectives(hlo).get("all-to-all", 0) >= 2 * 4  # 2 layers, forward and backward
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(l, ref_l, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_buffer_factor_is_a_model_config_field():
  cfg = TransformerConfig.from_config(dict(n_layers=2, moe_every=2, n_experts=4, moe_ep_buffer_factor=1.5))
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  assert model.blocks[1].ffn.ep_buffer_factor == 1.5
  with pytest.raises(Exception, match="moe_ep_buffer_factor"):
    TransformerConfig.from_config(dict(moe_every=1, n_experts=4, moe_ep_buffer_factor=-1)).validate()
