"""DATM core: exact meta-gradient, matching loss, schedules, guards, label init, determinism."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.methods.datm import distill as D
from lmx.models import convnet

SHAPE, C, N_IMG = (8, 8, 1), 3, 6


def _tiny(dtype=jnp.float32):
  """A 1-block ConvNet on 8×8 images, two nearby 'expert' snapshots and a synthetic state."""
  k = jax.random.split(jax.random.key(0), 4)
  p0 = convnet.init_params(k[0], SHAPE, C, depth=1, width=4)
  p0 = jax.tree.map(lambda a: a.astype(dtype), p0)
  p1 = jax.tree.map(lambda a, n: a + 0.05 * n.astype(dtype), p0,
                    jax.tree.unflatten(jax.tree.structure(p0),
                                       [jax.random.normal(kk, a.shape) for kk, a in
                                        zip(jax.random.split(k[1], len(jax.tree.leaves(p0))), jax.tree.leaves(p0))]))
  syn = {"x": jax.random.normal(k[2], (N_IMG,) + SHAPE, dtype),
         "y": jax.random.normal(k[3], (N_IMG, C), dtype),
         "lr": jnp.asarray(np.log(0.05), dtype)}
  return p0, p1, syn


SPEC = D.InnerSpec(syn_steps=3, batch_syn=4, dsa_strategy=("color", "crop", "cutout", "flip", "scale", "rotate"))


@pytest.mark.parametrize("unroll,remat", [(True, False), (True, True), (False, False), (False, True)])
def test_meta_gradient_matches_central_finite_differences(unroll, remat):
  """Exact second-order meta-gradient into pixels, label logits and step size (scan/unrolled × remat)."""
  with jax.enable_x64(True):
    p0, p1, syn = _tiny(jnp.float64)
    spec = dataclasses.replace(SPEC, unroll=unroll, remat=remat)
    key = jax.random.key(3)
    vg = jax.jit(jax.value_and_grad(lambda s: D.meta_loss(s, p0, p1, key, spec)))
    _, g = vg(syn)
    rng = np.random.default_rng(0)
    eps = 1e-5
    for name in ("x", "y", "lr"):
      v = rng.standard_normal(np.shape(syn[name]))
      v = v / np.linalg.norm(v)
      fp = float(vg(dict(syn, **{name: syn[name] + eps * v}))[0])
      fm = float(vg(dict(syn, **{name: syn[name] - eps * v}))[0])
      fd = (fp - fm) / (2 * eps)
      an = float(jnp.sum(g[name] * v))
      assert abs(fd - an) <= 1e-7 + 1e-5 * abs(fd), (name, fd, an)
      assert abs(an) > 1e-6, name  # the gradient actually reaches every input


def test_matching_loss_is_one_at_start_and_zero_at_target():
  p0, p1, _ = _tiny()
  assert float(D.matching_loss(p0, p0, p1)) == pytest.approx(1.0)
  assert float(D.matching_loss(p1, p0, p1)) == pytest.approx(0.0)


def test_window_upper_bound_over_schedule_and_samples_inside():
  kw = dict(min_start=2, max_start=20, sequential=True, current_max_start=10, expansion_end=100)
  assert D.window_upper_bound(0, **kw) == 10
  assert D.window_upper_bound(50, **kw) == 15
  assert D.window_upper_bound(100, **kw) == 20
  assert D.window_upper_bound(10_000, **kw) == 20
  assert D.window_upper_bound(0, **dict(kw, sequential=False)) == 20
  ubs = [D.window_upper_bound(it, **kw) for it in range(0, 200)]
  assert ubs == sorted(ubs)
  for it in range(300):
    t = D.sample_start_epoch(0, it, 2, D.window_upper_bound(it, **kw))
    assert 2 <= t < D.window_upper_bound(it, **kw)
  assert {D.sample_start_epoch(0, it, 2, 4) for it in range(100)} == {2, 3}


def test_minibatch_schedule_covers_each_image_once_per_pass():
  idx = np.asarray(D.minibatch_schedule(jax.random.key(0), 10, 6, 5))
  assert idx.shape == (6, 5)
  for p in range(3):
    assert sorted(idx[2 * p:2 * p + 2].ravel()) == list(range(10))


def test_expert_order_is_a_permutation_per_pass():
  order = [D.expert_for(0, it, 5) for it in range(10)]
  assert sorted(order[:5]) == list(range(5)) and sorted(order[5:]) == list(range(5))


@pytest.fixture(scope="module")
def stepper():
  """One compiled meta-step (threshold 10) shared by the state tests; expert snapshots are arguments."""
  outer = D.OuterSpec(lr_img=10.0, lr_lr=1e-5, lr_y=2.0, threshold=10.0)
  p0, p1, syn = _tiny()
  state = D.init_state(syn, D.make_optimizer(outer, SPEC))
  fn = jax.jit(lambda s, a, b, k: D.meta_step(s, a, b, k, inner=SPEC, outer=outer))
  return state, fn, p0, p1


def test_skipped_update_leaves_all_state_unchanged(stepper):
  state, fn, p0, p1 = stepper
  near = jax.tree.map(lambda a, b: a + 1e-4 * (b - a), p0, p1)  # target ≈ start: loss ≫ threshold
  new, m = fn(state, p0, near, jax.random.key(0))
  assert float(m["loss"]) > 10.0 and float(m["skipped"]) == 1.0
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new)):
    np.testing.assert_array_equal(a, b)
  moved, m = fn(state, p0, p1, jax.random.key(0))  # a real update changes momentum; skipping after keeps it
  assert float(m["skipped"]) == 0.0
  again, _ = fn(moved, p0, near, jax.random.key(1))
  for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_update_happens_below_threshold_and_same_seed_same_images(stepper):
  state, fn, p0, p1 = stepper
  a = b = state
  for i in range(3):
    a, m = fn(a, p0, p1, jax.random.key(i))
    b, _ = fn(b, p0, p1, jax.random.key(i))
  assert float(m["skipped"]) == 0.0
  assert not np.allclose(a["syn"]["x"], state["syn"]["x"])
  assert not np.allclose(a["syn"]["y"], state["syn"]["y"])
  np.testing.assert_array_equal(a["syn"]["x"], b["syn"]["x"])
  np.testing.assert_array_equal(a["syn"]["y"], b["syn"]["y"])


def test_nonfinite_loss_is_skipped(stepper):
  state, fn, p0, p1 = stepper
  bad = jax.tree.map(lambda a: a, state)
  bad["syn"]["x"] = bad["syn"]["x"].at[0, 0, 0, 0].set(jnp.nan)
  new, m = fn(bad, p0, p1, jax.random.key(0))
  assert float(m["nonfinite"]) == 1.0 and float(m["skipped"]) == 1.0
  np.testing.assert_array_equal(new["syn"]["y"], bad["syn"]["y"])


def test_spike_guard_skips_an_outsized_image_gradient():
  """spike_factor > 0: an image gradient far above its running mean is skipped (state unchanged); off by default."""
  p0, p1, syn = _tiny()
  for factor, expect_skip in ((0.0, False), (10.0, True)):
    outer = D.OuterSpec(lr_img=10.0, lr_lr=1e-5, lr_y=2.0, threshold=10.0, spike_factor=factor)
    state = D.init_state(syn, D.make_optimizer(outer, SPEC))
    state["gx_mean"] = jnp.float32(1e-9)  # pretend earlier gradients were tiny
    new, m = D.meta_step(state, p0, p1, jax.random.key(0), inner=SPEC, outer=outer)
    assert float(m["spike"]) == float(expect_skip) and float(m["skipped"]) == float(expect_skip)
    if expect_skip:
      for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new)):
        np.testing.assert_array_equal(a, b)
    else:
      assert float(new["gx_mean"]) > 1e-9  # the running mean follows accepted updates


@pytest.mark.parametrize("lr_param", ["log", "log_sgd", "raw"])
def test_step_size_stays_positive_and_bounded(lr_param):
  inner = dataclasses.replace(SPEC, lr_param=lr_param, dsa_strategy=(), syn_steps=2)
  outer = D.OuterSpec(lr_img=0.0, lr_lr=1e3, lr_y=0.0, threshold=1e9, lr_min=1e-4, lr_max=0.5)
  p0, p1, syn = _tiny()
  syn["lr"] = jnp.float32(D.lr_raw_from_value(0.05, lr_param))
  tx = D.make_optimizer(outer, inner)
  state = D.init_state(syn, tx)
  fn = jax.jit(lambda s, k: D.meta_step(s, p0, p1, k, inner=inner, outer=outer))
  for i in range(3):
    state, m = fn(state, jax.random.key(i))
    assert 1e-4 * 0.999 <= float(m["lr"]) <= 0.5 * 1.001


def test_select_correct_picks_only_correctly_classified():
  rng = np.random.default_rng(0)
  y = np.repeat(np.arange(3), 10)
  preds = np.stack([np.where(rng.random(30) < 0.5, y, (y + 1) % 3) for _ in range(3)])
  idx = D.select_correct(preds, y, 3, 4, np.random.default_rng(1))
  assert len(idx) == 12 and len(set(idx.tolist())) == 12
  for j, i in enumerate(idx):
    assert y[i] == j // 4
    assert (preds[:, i] == y[i]).any()
  # expert 0 is used first: with enough correct images of expert 0 every pick is correct for expert 0
  preds0 = preds.copy()
  preds0[0] = y
  idx0 = D.select_correct(preds0, y, 3, 4, np.random.default_rng(1))
  assert (preds0[0, idx0] == y[idx0]).all()


def test_soft_label_init_averages_only_correct_experts():
  logits = np.array([[[2.0, 0.0]], [[0.0, 5.0]], [[4.0, 1.0]]])  # 3 experts, 1 image of class 0
  out = D.soft_label_init(logits, np.array([0]))
  np.testing.assert_allclose(out, [[3.0, 0.5]])
  assert out.argmax(-1)[0] == 0


def test_log_sgd_step_size_moves_like_raw_sgd():
  """'log_sgd' preconditions ρ = log α so that one small outer step changes α as raw-α SGD does."""
  p0, p1, syn = _tiny()
  outer = D.OuterSpec(lr_img=0.0, lr_lr=1e-4, lr_y=0.0, threshold=1e9, lr_min=1e-4, lr_max=1.0)
  moved = {}
  for lr_param in ("raw", "log_sgd"):
    inner = dataclasses.replace(SPEC, lr_param=lr_param, dsa_strategy=(), syn_steps=2)
    s = dict(syn, lr=jnp.float32(D.lr_raw_from_value(0.2, lr_param)))
    state = D.init_state(s, D.make_optimizer(outer, inner))
    _, m = D.meta_step(state, p0, p1, jax.random.key(0), inner=inner, outer=outer)
    moved[lr_param] = float(m["lr"]) - 0.2
  assert moved["raw"] != 0.0
  np.testing.assert_allclose(moved["log_sgd"], moved["raw"], rtol=1e-2)


@pytest.mark.parametrize("hw,cin,pad", [(28, 1, 3), (8, 4, 1), (5, 3, 1)])
def test_im2col_conv_matches_xla_conv_to_second_order(hw, cin, pad):
  """The CPU-fast im2col convolution is the same function as XLA's: values, gradients and the second-order
  meta-gradient through an SGD step all agree (float64)."""
  with jax.enable_x64(True):
    k1, k2 = jax.random.split(jax.random.key(1))
    x = jax.random.normal(k1, (2, hw, hw, cin), jnp.float64)
    w = jax.random.normal(k2, (3, 3, cin, 5), jnp.float64)
    np.testing.assert_allclose(convnet.conv_im2col(x, w, pad), convnet.conv_xla(x, w, pad), rtol=1e-12, atol=1e-12)

    def meta(conv):
      def f(x, w):
        g = jax.grad(lambda w: jnp.sum(jnp.tanh(conv(x, w, pad))))(w)
        return jnp.sum(jnp.square(w - 0.1 * g))
      return jax.grad(f, argnums=(0, 1))(x, w)
    for a, b in zip(meta(convnet.conv_im2col), meta(convnet.conv_xla)):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
  with pytest.raises(ValueError, match="conv_impl"):
    convnet.resolve_conv_impl("winograd")


def test_conv_impls_give_the_same_network_and_auto_resolves_per_use():
  """xla / im2col / mixed are one function at the model level (logits and parameter gradients), and on CPU
  'auto' means 'mixed' for training and 'im2col' inside the meta-step (the fastest measured for each)."""
  with jax.enable_x64(True):
    p = jax.tree.map(lambda a: a.astype(jnp.float64),
                     convnet.init_params(jax.random.key(0), (28, 28, 1), 10, depth=2, width=8))
    x = jax.random.normal(jax.random.key(1), (3, 28, 28, 1), jnp.float64)
    loss = lambda p, impl: jnp.sum(jnp.tanh(convnet.apply(p, x, conv_impl=impl)))
    ref_v, ref_g = jax.value_and_grad(loss)(p, "xla")
    for impl in ("im2col", "mixed"):
      v, g = jax.value_and_grad(loss)(p, impl)
      np.testing.assert_allclose(v, ref_v, rtol=1e-10)
      for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
  if jax.default_backend() == "cpu":
    assert convnet.resolve_conv_impl("auto") == "mixed"
    assert convnet.resolve_conv_impl("auto", second_order=True) == "im2col"
  assert convnet.resolve_conv_impl("xla", second_order=True) == "xla"
