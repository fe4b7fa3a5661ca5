"""MoE FFN: dispatch vs a dense per-token loop, capacity dropping, losses and statistics vs hand-computed
values, transformer integration (aux contract, routing records) and config errors."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmx.core.config import ConfigError
from lmx.models import moe as moe_lib
from lmx.models.transformer import Transformer, TransformerConfig


def _weights(e=4, d=8, f=6, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (e, d, f)) * 0.5, jax.random.normal(ks[1], (e, d, f)) * 0.5,
          jax.random.normal(ks[2], (e, f, d)) * 0.5)


@pytest.mark.parametrize("softmax,top_k,norm,impl", [("before", 2, False, "ragged"), ("before", 2, False, "tiled"),
                                                     ("after", 1, False, "tiled"), ("before", 3, True, "ragged")])
def test_dropless_equals_dense_loop(softmax, top_k, norm, impl):
  n, d, e = 24, 8, 4
  x = jax.random.normal(jax.random.key(1), (n, d))
  logits = jax.random.normal(jax.random.key(2), (n, e)) * 2
  experts, gates, probs = moe_lib.route(logits, top_k, softmax=softmax, norm_topk_prob=norm)
  w1, w3, w2 = _weights(e, d)
  dispatch = lambda *a: moe_lib.dropless_dispatch(*a, impl=impl)  # noqa: E731
  out = jax.jit(dispatch)(x, experts, gates, w1, w3, w2)
  ref = jax.jit(moe_lib.dense_reference)(x, experts, gates, w1, w3, w2)
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
  # Gradients w.r.t. inputs and expert weights agree too.
  f = lambda fn: jax.jit(jax.grad(lambda x, w1, w2: jnp.sum(fn(x, experts, gates, w1, w3, w2) ** 2),  # noqa
                                  (0, 1, 2)))(x, w1, w2)
  for a, r in zip(f(dispatch), f(moe_lib.dense_reference)):
    np.testing.assert_allclose(a, r, atol=1e-4, rtol=1e-4)


def test_route_semantics():
  logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
  p = jax.nn.softmax(logits)[0]
  ex, g, probs = moe_lib.route(logits, 2, softmax="before")
  np.testing.assert_array_equal(ex, [[0, 1]])
  np.testing.assert_allclose(g, [[p[0], p[1]]], rtol=1e-6)
  np.testing.assert_allclose(probs[0], p, rtol=1e-6)
  _, g, _ = moe_lib.route(logits, 2, softmax="before", norm_topk_prob=True)
  np.testing.assert_allclose(g, [[p[0] / (p[0] + p[1]), p[1] / (p[0] + p[1])]], rtol=1e-6)
  _, g, _ = moe_lib.route(logits, 2, softmax="after")
  np.testing.assert_allclose(g, [[1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1))]], rtol=1e-6)
  with pytest.raises(ValueError, match="top_k=5"):
    moe_lib.route(logits, 5)
  with pytest.raises(ValueError, match="router_softmax"):
    moe_lib.route(logits, 1, softmax="sideways")


_dense_ref = jax.jit(moe_lib.dense_reference)
_capacity = jax.jit(moe_lib.capacity_dispatch, static_argnames="capacity_factor")


def test_capacity_dispatch_no_drop_equals_dense_and_drops_by_priority():
  b, t, d, e, k = 2, 6, 8, 4, 2
  x = jax.random.normal(jax.random.key(3), (b, t, d))
  logits = jax.random.normal(jax.random.key(4), (b * t, e))
  experts, gates, _ = moe_lib.route(logits, k)
  w1, w3, w2 = _weights(e, d)
  ref = _dense_ref(x.reshape(-1, d), experts, gates, w1, w3, w2).reshape(b, t, d)
  out, dropped = _capacity(x, experts.reshape(b, t, k), gates.reshape(b, t, k), w1, w3, w2,
                           capacity_factor=float(e))  # capacity t*k: never drops
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
  assert float(dropped) == 0.0

  # Hand-made routing, one sequence of 4 tokens, top-1, E=2, capacity ceil(0.5*4*1/2) = 1:
  # tokens 0, 1, 3 want expert 0, token 2 wants expert 1 -> only tokens 0 and 2 are served.
  x1 = jax.random.normal(jax.random.key(5), (1, 4, d))
  ex1 = jnp.array([[[0], [0], [1], [0]]])
  g1 = jnp.ones((1, 4, 1))
  w1, w3, w2 = _weights(2, d)
  out1, dropped1 = _capacity(x1, ex1, g1, w1, w3, w2, capacity_factor=0.5)
  full = _dense_ref(x1[0], ex1[0], g1[0], w1, w3, w2)
  np.testing.assert_allclose(out1[0, 0], full[0], atol=1e-5)
  np.testing.assert_allclose(out1[0, 2], full[2], atol=1e-5)
  np.testing.assert_allclose(out1[0, 1], 0.0, atol=1e-6)
  np.testing.assert_allclose(out1[0, 3], 0.0, atol=1e-6)
  assert float(dropped1) == pytest.approx(0.5)
  # Top-2 priority is causal, (position, rank) order: token 0's two choices are placed before token 1's first.
  ex2 = jnp.array([[[1, 0], [0, 1]]])  # token 0: 1st=1, 2nd=0; token 1: 1st=0, 2nd=1; capacity 1
  out2, dropped2 = _capacity(x1[:, :2], ex2, jnp.ones((1, 2, 2)), w1, w3, w2, capacity_factor=0.5)
  full2 = _dense_ref(x1[0, :2], ex2[0], jnp.ones((2, 2)), w1, w3, w2)
  np.testing.assert_allclose(out2[0, 0], full2[0], atol=1e-5)  # token 0: both experts
  np.testing.assert_allclose(out2[0, 1], 0.0, atol=1e-6)  # token 1: both experts already full
  assert float(dropped2) == pytest.approx(0.5)


def test_load_balancing_loss_hand_computed():
  probs = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.1, 0.4], [0.3, 0.3, 0.4]])
  experts = jnp.array([[0, 1], [1, 2], [0, 2], [2, 0]])
  p_mean = np.asarray(probs).mean(0)  # [0.4, 0.3, 0.3]
  counts = np.array([3, 2, 3], float)  # all assignments
  first = np.array([2, 1, 1], float)  # first choices
  # By hand: p_mean = [0.4, 0.3, 0.3]; assign_frac = 3 * (3*0.4 + 2*0.3 + 3*0.3) / 8 = 3 * 2.7 / 8;
  # first_choice_frac = 3 * (2*0.4 + 1*0.3 + 1*0.3) / 4 = 3 * 1.4 / 4; assign_per_token = 3 * 2.7 / 4.
  np.testing.assert_allclose(moe_lib.load_balancing_loss(probs, experts, norm="assign_frac"),
                             3 * np.sum(counts / 8 * p_mean), rtol=1e-6)
  np.testing.assert_allclose(moe_lib.load_balancing_loss(probs, experts, norm="assign_frac"), 3 * 2.7 / 8, rtol=1e-6)
  np.testing.assert_allclose(moe_lib.load_balancing_loss(probs, experts, norm="first_choice_frac"),
                             3 * np.sum(first / 4 * p_mean), rtol=1e-6)
  np.testing.assert_allclose(moe_lib.load_balancing_loss(probs, experts, norm="first_choice_frac"), 3 * 1.4 / 4,
                             rtol=1e-6)
  np.testing.assert_allclose(moe_lib.load_balancing_loss(probs, experts, norm="assign_per_token"),
                             3 * np.sum(counts / 4 * p_mean), rtol=1e-6)
  np.testing.assert_allclose(moe_lib.load_balancing_loss(probs, experts, norm="assign_per_token"), 3 * 2.7 / 4,
                             rtol=1e-6)
  f, p = moe_lib.load_balancing_terms(probs, experts, norm="assign_per_token")
  np.testing.assert_allclose(f, counts / 4, rtol=1e-6)
  np.testing.assert_allclose(p, p_mean, rtol=1e-6)
  # Balanced routing gives 1 (assign_frac, first_choice_frac) and k (assign_per_token).
  uni = jnp.full((4, 4), 0.25)
  bal = jnp.array([[0, 1], [1, 2], [2, 3], [3, 0]])
  assert float(moe_lib.load_balancing_loss(uni, bal, norm="assign_frac")) == pytest.approx(1.0)
  assert float(moe_lib.load_balancing_loss(uni, bal, norm="first_choice_frac")) == pytest.approx(1.0)
  assert float(moe_lib.load_balancing_loss(uni, bal, norm="assign_per_token")) == pytest.approx(2.0)
  # The gradient flows through the mean probabilities only: d/dp_te = E * f_e / N.
  g = jax.grad(lambda p: moe_lib.load_balancing_loss(p, experts, norm="assign_frac"))(probs)
  np.testing.assert_allclose(g, np.broadcast_to(3 * counts / 8 / 4, (4, 3)), rtol=1e-6)
  with pytest.raises(ValueError, match="lb_loss_norm"):
    moe_lib.load_balancing_loss(probs, experts, norm="nope")
  for old, new in (("switch", "assign_frac"), ("gshard", "first_choice_frac"), ("maxtext", "assign_per_token")):
    with pytest.raises(ValueError, match=f"renamed '{new}'"):
      moe_lib.load_balancing_loss(probs, experts, norm=old)


def test_router_z_loss_hand_computed():
  logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(moe_lib.router_z_loss(jnp.asarray(logits)), np.mean(lse ** 2), rtol=1e-6)


def test_routing_stats_hand_made():
  experts = jnp.array([[0], [0], [1], [0]])  # counts [3, 1, 0, 0]
  probs = jnp.array([[0.7, 0.1, 0.1, 0.1]] * 4)
  s = moe_lib.routing_stats(experts, probs)
  np.testing.assert_allclose(s["load"], [0.75, 0.25, 0, 0])
  np.testing.assert_allclose(s["mean_prob"], [0.7, 0.1, 0.1, 0.1], rtol=1e-6)
  np.testing.assert_allclose(s["cv"], np.std([3, 1, 0, 0]) / 1.0, rtol=1e-6)
  assert float(s["max_over_mean"]) == pytest.approx(3.0)
  assert float(s["maxvio"]) == pytest.approx(2.0)
  assert float(s["entropy"]) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4))
  assert float(s["dead"]) == 2.0
  bal = moe_lib.routing_stats(jnp.array([[0, 1], [2, 3]]), jnp.full((2, 4), 0.25))
  assert float(bal["cv"]) == 0.0 and float(bal["entropy"]) == pytest.approx(1.0) and float(bal["dead"]) == 0


def _moe_cfg(**kw):
  base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
              moe_every=2, n_experts=4, top_k=2, moe_d_ff=32)
  base.update(kw)
  return TransformerConfig.from_config(base)


def test_transformer_moe_aux_contract_and_routing_records():
  cfg = _moe_cfg()
  assert cfg.moe_layers == (1,)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
  logits, aux = jax.jit(lambda t: model(t, return_aux=True, return_routing=True))(tokens)
  assert logits.shape == (2, 8, 64)
  m = aux["metrics"]
  for name in ("lb_loss", "z_loss", "cv", "max_over_mean", "maxvio", "entropy", "dead"):
    assert f"moe/layer1/{name}" in m and f"moe/{name}" in m
    assert m[f"moe/{name}"].shape == ()
  assert "moe/layer1/load/e3" in m and "moe/layer1/mean_prob/e0" in m and "moe/layer0/cv" not in m
  # One MoE layer: the per-layer sum is that layer's loss.
  np.testing.assert_allclose(aux["aux_loss"], 0.01 * m["moe/layer1/lb_loss"] + 0.001 * m["moe/layer1/z_loss"],
                             rtol=1e-6)
  rec = aux["routing"]["layer1"]
  assert rec["experts"].shape == (2, 8, 2) and rec["gates"].shape == (2, 8, 2)
  assert rec["router_logits"].shape == (2, 8, 4)
  total = sum(float(m[f"moe/layer1/load/e{j}"]) for j in range(4))
  assert total == pytest.approx(1.0)
  # Dense model: zero aux, empty metrics.
  dense = Transformer(_moe_cfg(moe_every=0), rngs=nnx.Rngs(0))
  _, aux_d = jax.jit(lambda t: dense(t, return_aux=True))(tokens)
  assert float(aux_d["aux_loss"]) == 0.0 and aux_d["metrics"] == {}
  # Capacity mode logs the dropped fraction.
  cap = Transformer(_moe_cfg(capacity_factor=1.0), rngs=nnx.Rngs(0))
  _, aux_c = jax.jit(lambda t: cap(t, return_aux=True))(tokens)
  assert "moe/layer1/dropped_frac" in aux_c["metrics"]


def test_moe_wrong_shapes_and_config_errors():
  layer = moe_lib.MoE(8, 16, 4, 2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"\[B, T, D=8\]"):
    layer(jnp.zeros((2, 3, 5)))
  with pytest.raises(ValueError, match="top_k=5"):
    moe_lib.MoE(8, 16, 4, 5, rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match=r"model.top_k=5 must be in \[1, model.n_experts=4\]"):
    _moe_cfg(top_k=5)
  with pytest.raises(ConfigError, match="model.n_experts=0"):
    _moe_cfg(n_experts=0)
  with pytest.raises(ConfigError, match="model.router_softmax"):
    _moe_cfg(router_softmax="middle")
  with pytest.raises(ConfigError, match="model.moe_impl"):
    _moe_cfg(moe_impl="fast")
  with pytest.raises(ConfigError, match="model.lb_loss_norm"):
    _moe_cfg(lb_loss_norm="x")
  with pytest.raises(ConfigError, match="model.lb_loss_norm='maxtext' was renamed 'assign_per_token'"):
    _moe_cfg(lb_loss_norm="maxtext")
  with pytest.raises(ConfigError, match="model.moe_aux_layers"):
    _moe_cfg(moe_aux_layers="max")
  with pytest.raises(ConfigError, match="model.moe_every=3 > model.n_layers=2"):
    _moe_cfg(moe_every=3)
  with pytest.raises(ConfigError, match=r"model.n_heads=4 is not divisible by model.n_kv_heads=3"):
    _moe_cfg(n_kv_heads=3)
  with pytest.raises(ConfigError, match=r"model.d_model=30 is not divisible by model.n_heads=4"):
    _moe_cfg(d_model=30)
  with pytest.raises(ConfigError, match="unknown field"):
    _moe_cfg(n_expert=4)
  cfg = _moe_cfg(n_experts=6)
  with pytest.raises(ConfigError, match=r"model.n_experts=6 is not divisible by the expert mesh axis mesh.expert=4"):
    cfg.check_mesh({"data": 2, "expert": 4})
  cfg.check_mesh({"data": 4, "expert": 2})
  _moe_cfg(moe_every=0).check_mesh({"expert": 2})  # dense: the expert axis is one more batch axis
  model = Transformer(_moe_cfg(), rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match="model.max_seq_len=32"):
    model(jnp.zeros((1, 33), jnp.int32))


def test_tiled_grouped_matmul_handles_empty_and_large_groups():
  sizes = jnp.array([0, 20, 3, 1], jnp.int32)
  xs = jax.random.normal(jax.random.key(7), (24, 8))
  w1, w3, w2 = _weights(4, 8)
  ref = moe_lib.ragged_swiglu(xs, sizes, w1, w3, w2)
  np.testing.assert_allclose(moe_lib.tiled_swiglu(xs, sizes, w1, w3, w2, tile=8), ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(jax.jit(moe_lib.tiled_swiglu)(xs, sizes, w1, w3, w2), ref, atol=1e-5, rtol=1e-5)


def test_lm_config_variants_build():
  from configs import lm
  for variant in lm.VARIANTS:
    c = lm.get_config(variant)
    cfg = TransformerConfig.from_config(c.model)
    sizes = {k: v for k, v in c.mesh.items() if v > 0}
    cfg.check_mesh(sizes)
    assert bool(cfg.moe_every) == (variant in ("moe", "moe_1b7b"))
  # moe_1b7b has OLMoE-1B-7B's MoE settings.
  m = TransformerConfig.from_config(lm.get_config("moe_1b7b").model)
  assert (m.n_experts, m.top_k, m.expert_d_ff, m.router_softmax, m.norm_topk_prob) == (64, 8, 1024, "before", False)
  assert (m.lb_loss_norm, m.moe_aux_layers, m.lb_loss_coef, m.z_loss_coef) == ("assign_per_token", "global", 0.01,
                                                                                0.001)
  assert m.capacity_factor == 0.0
