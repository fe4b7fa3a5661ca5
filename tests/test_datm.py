"""DATM core: exact meta-gradient, matching loss, schedules, guards, label init, determinism; expert buffers on
disk (atomic save, corrupt and mismatched buffers); the per-class table of the early config check."""
import dataclasses
import errno
import json
import os
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import datm as datm_config
from lmx.core.config import ConfigError
from lmx.core.workdir import StorageError
from lmx.datasets import images
from lmx.methods.datm import distill as D
from lmx.methods.datm import experts as E
from lmx.models import convnet
from lmx.models.registry import build_model

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
  _check_meta_gradient_by_finite_differences(dataclasses.replace(SPEC, unroll=unroll, remat=remat))


def test_hoisted_dsa_meta_gradient_matches_finite_differences():
  """With the N minibatches augmented before the (rolled, rematerialised) inner loop the meta-gradient is still the
  exact derivative, and the loss is the in-step augmentation's: DSA does not depend on θ."""
  spec = dataclasses.replace(SPEC, unroll=False, remat=True, hoist_dsa=True)
  _check_meta_gradient_by_finite_differences(spec)
  with jax.enable_x64(True):
    p0, p1, syn = _tiny(jnp.float64)
    key = jax.random.key(3)
    in_step = dataclasses.replace(spec, hoist_dsa=False)
    assert float(D.meta_loss(syn, p0, p1, key, spec)) == pytest.approx(float(D.meta_loss(syn, p0, p1, key, in_step)),
                                                                       rel=1e-12)


def _check_meta_gradient_by_finite_differences(spec):
  with jax.enable_x64(True):
    p0, p1, syn = _tiny(jnp.float64)
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


# ------------------------------------------------------------------------------------------ expert buffers on disk

from lmx.methods.datm import driver as R  # noqa: E402
from lmx.methods.datm import checks as V  # noqa: E402
DATA = types.SimpleNamespace(image_shape=(8, 8, 1), num_classes=10)  # what get_experts reads of the dataset


def _smoke():
  return datm_config.get_config("smoke")  # digits 8×8, ConvNet-2 width 8; the window needs 4 expert epochs


def _buffer(c, experts: int = 1, fill: float = 0.0) -> E.ExpertBuffer:
  """A buffer of ``experts`` × (experts.epochs + 1) snapshots with the smoke model's real parameter shapes."""
  model = build_model(c.model, image_shape=DATA.image_shape, num_classes=DATA.num_classes)
  like = jax.eval_shape(model.init, jax.random.key(0))
  params = jax.tree.map(lambda s: np.full((experts, c.experts.epochs + 1) + s.shape, fill, np.float32), like)
  meta = {**E.expected_meta(c, DATA.image_shape, DATA.num_classes), "num_experts": experts, "epochs": c.experts.epochs,
          "final_test_acc": [0.5] * experts, "train_seconds": 0.0}
  return E.ExpertBuffer(params, meta)


class _Writer:
  def scalars(self, step, values, prefix=""):
    del step, values, prefix

  def summary(self, step, values, prefix=""):
    del step, values, prefix


def _fake_training(monkeypatch, c):
  """experts.train_experts replaced by a call counter returning a recognisable buffer (fill 7)."""
  calls = []

  def train(seed, data, config, *, writer=None):
    del seed, data, writer
    calls.append(1)
    return _buffer(config, fill=7.0)
  monkeypatch.setattr(E, "train_experts", train)
  return calls


def _files(directory) -> dict[str, bytes]:
  return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))}


def test_save_buffer_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
  c = _smoke()
  d = str(tmp_path / "experts")
  E.save_buffer(d, _buffer(c))
  E.save_buffer(d, _buffer(c, fill=1.0))  # overwriting a pair
  assert sorted(os.listdir(d)) == [E.BUFFER_FILE, E.META_FILE]
  buf = E.load_buffer(d, E.expected_meta(c, DATA.image_shape, DATA.num_classes), min_epochs=4)
  assert float(buf.snapshot(0, 5)["fc"]["bias"][0]) == 1.0
  # a crash between the two renames: a new buffer.npz, no meta.json -- not a buffer, and no temp file left
  real_replace = os.replace

  def crash_on_meta(src, dst):
    if dst.endswith(E.META_FILE):
      raise OSError("disk full")
    return real_replace(src, dst)
  monkeypatch.setattr(os, "replace", crash_on_meta)
  with pytest.raises(OSError, match="disk full"):
    E.save_buffer(d, _buffer(c, fill=2.0))
  assert not E.buffer_exists(d) and sorted(os.listdir(d)) == [E.BUFFER_FILE]
  monkeypatch.setattr(os, "replace", real_replace)
  # a crash while writing the archive: the old pair is untouched and no temp file is left
  E.save_buffer(d, _buffer(c, fill=3.0))
  before = _files(d)
  monkeypatch.setattr(np, "savez", lambda *a, **k: (_ for _ in ()).throw(OSError("killed")))
  with pytest.raises(OSError, match="killed"):
    E.save_buffer(d, _buffer(c, fill=4.0))
  assert _files(d) == before


def test_disk_full_saving_the_buffer_is_one_error_naming_the_directory(tmp_path, monkeypatch):
  """ENOSPC (or a path past the OS limit) while writing the buffer: a StorageError (an OSError the launcher prints
  in one line) naming the directory and the cause; the old pair stays and no temp file is left."""
  c = _smoke()
  d = str(tmp_path / "experts")
  E.save_buffer(d, _buffer(c, fill=1.0))
  before = _files(d)

  def full(f, **arrays):
    f.write(b"PK\x03\x04")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(np, "savez", full)
  with pytest.raises(StorageError) as e:
    E.save_buffer(d, _buffer(c, fill=2.0))
  assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError)
  assert str(e.value).startswith(f"cannot write the expert buffer in {d}: no space left on device;"), str(e.value)
  assert _files(d) == before
  monkeypatch.undo()
  deep = str(tmp_path)
  while len(deep) < 4200:
    deep = os.path.join(deep, "x" * 200)
  with pytest.raises(StorageError, match=r"cannot write the expert buffer in .*xxxx: file name too long; .*shorter "
                     r"--workdir"):
    E.save_buffer(deep, _buffer(c))


def _truncate(path):
  with open(path, "rb") as f:
    raw = f.read()
  with open(path, "wb") as f:
    f.write(raw[:len(raw) // 2])


def _rewrite_meta(d, edit):
  path = os.path.join(d, E.META_FILE)
  meta = json.load(open(path))
  with open(path, "w") as f:
    json.dump(edit(meta), f)


CORRUPTIONS = {  # name -> (file that breaks, how)
    "truncated_npz": (E.BUFFER_FILE, lambda d: _truncate(os.path.join(d, E.BUFFER_FILE))),
    "garbage_npz": (E.BUFFER_FILE, lambda d: open(os.path.join(d, E.BUFFER_FILE), "wb").write(b"\x00junk" * 50)),
    "empty_npz": (E.BUFFER_FILE, lambda d: open(os.path.join(d, E.BUFFER_FILE), "wb").close()),
    "npy_not_npz": (E.BUFFER_FILE, lambda d: np.save(open(os.path.join(d, E.BUFFER_FILE), "wb"), np.zeros(3))),
    "truncated_meta": (E.META_FILE, lambda d: _truncate(os.path.join(d, E.META_FILE))),
    "binary_meta": (E.META_FILE, lambda d: open(os.path.join(d, E.META_FILE), "wb").write(b"\xff\xfe\x80")),
    "meta_list": (E.META_FILE, lambda d: open(os.path.join(d, E.META_FILE), "w").write("[1, 2]")),
    "meta_lacks_width": (E.META_FILE, lambda d: _rewrite_meta(d, lambda m: {k: v for k, v in m.items()
                                                                              if k != "width"})),
    "meta_other_epochs": (E.BUFFER_FILE, lambda d: _rewrite_meta(d, lambda m: dict(m, epochs=9))),
    "wrong_leaf_shape": (E.BUFFER_FILE, lambda d: np.savez(os.path.join(d, E.BUFFER_FILE), **{
        k: (v[..., :1] if k == "fc/kernel" else v) for k, v in np.load(os.path.join(d, E.BUFFER_FILE)).items()})),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_buffer_is_a_one_line_error_naming_the_file(tmp_path, name):
  """save_buffer, then break one file: load_buffer raises CorruptBufferError (a DataError, so the launcher
  prints one line) naming that file, with no chained numpy/zipfile/json traceback."""
  c = _smoke()
  d = str(tmp_path / "buf")
  E.save_buffer(d, _buffer(c, experts=2))
  bad_file, corrupt = CORRUPTIONS[name]
  corrupt(d)
  like = jax.eval_shape(build_model(c.model, image_shape=DATA.image_shape, num_classes=DATA.num_classes).init,
                        jax.random.key(0))
  expect = E.expected_meta(c, DATA.image_shape, DATA.num_classes)
  with pytest.raises(E.CorruptBufferError) as e:
    E.load_buffer(d, expect, min_epochs=4, like=like)
  err = e.value
  assert isinstance(err, images.DataError) and isinstance(err, ConfigError)
  assert err.path == os.path.join(d, bad_file) and err.path in str(err) and "\n" not in str(err)
  assert str(err).startswith(f"experts.dir={d!r}") and "leave experts.dir empty" in str(err)
  assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)  # no chained traceback


def test_truncated_buffer_npz_names_the_path(tmp_path):
  c = _smoke()
  d = str(tmp_path / "buf")
  E.save_buffer(d, _buffer(c))
  _truncate(os.path.join(d, E.BUFFER_FILE))
  with pytest.raises(E.CorruptBufferError, match="BadZipFile") as e:
    E.load_buffer(d, E.expected_meta(c, DATA.image_shape, DATA.num_classes), min_epochs=4, source="workdir")
  assert os.path.join(d, E.BUFFER_FILE) in str(e.value) and e.value.reason.startswith("BadZipFile: ")


def test_a_bad_experts_dir_leaves_no_workdir_behind(tmp_path):
  """A missing or empty experts.dir is refused by validation, before the launcher makes the workdir; a buffer for
  another model is refused when read, still before the run writes anything, so the new workdir is removed."""
  from lmx import launcher

  c = _smoke()
  w = tmp_path / "w"
  (tmp_path / "empty").mkdir()
  for bad, words in [(tmp_path / "nope", r"is not a directory; point it at the experts/ folder of a DATM run"),
                     (tmp_path / "empty", r"holds no expert buffer \(no buffer.npz or meta.json\)")]:
    c.experts.dir = str(bad)
    with pytest.raises(ConfigError) as e:
      launcher.dispatch(c, str(w))
    assert not w.exists()
    assert re.match(rf"experts.dir: '{bad}' {words}", str(e.value)), str(e.value)
  other = str(tmp_path / "width16")
  c16 = _smoke()
  c16.model.width = 16
  E.save_buffer(other, _buffer(c16))
  c.experts.dir = other
  with pytest.raises(ConfigError) as e:
    launcher.dispatch(c, str(w))
  assert not w.exists()
  assert re.search(r"experts.dir=.*width16.*model.width=16 but the config asks for 8", str(e.value)), str(e.value)


def test_get_experts_moves_a_corrupt_own_buffer_aside_and_trains_new_ones(tmp_path, monkeypatch, capsys):
  c = _smoke()
  wd = str(tmp_path / "w")
  own = os.path.join(wd, "experts")
  E.save_buffer(own, _buffer(c))
  _truncate(os.path.join(own, E.BUFFER_FILE))
  original = _files(own)
  calls = _fake_training(monkeypatch, c)
  buf = R.get_experts(c, DATA, wd, _Writer())
  out = capsys.readouterr().out
  warnings = [line for line in out.splitlines() if line.startswith("WARNING:")]
  assert len(warnings) == 1 and out.count("WARNING") == 1
  moved = os.listdir(os.path.join(wd, "experts_corrupt"))
  assert len(moved) == 1 and moved[0].isdigit()
  dst = os.path.join(wd, "experts_corrupt", moved[0])
  assert warnings[0] == (f"WARNING: expert buffer {own} could not be read (BadZipFile: File is not a zip file); "
                         f"moved it to {dst} and training new experts")
  assert _files(dst) == original  # kept byte for byte
  assert calls == [1] and float(buf.snapshot(0, 5)["fc"]["bias"][0]) == 7.0
  again = E.load_buffer(own, E.expected_meta(c, DATA.image_shape, DATA.num_classes), min_epochs=4, source="workdir")
  assert float(again.snapshot(0, 5)["fc"]["bias"][0]) == 7.0  # the new buffer is in place and readable
  # a second corrupt buffer in the same second is kept next to the first
  _truncate(os.path.join(own, E.META_FILE))
  R.get_experts(c, DATA, wd, _Writer())
  assert len(os.listdir(os.path.join(wd, "experts_corrupt"))) == 2 and calls == [1, 1]


def test_get_experts_refuses_a_corrupt_user_buffer_and_leaves_it(tmp_path, monkeypatch):
  c = _smoke()
  user = str(tmp_path / "user_buffer")
  E.save_buffer(user, _buffer(c))
  _truncate(os.path.join(user, E.BUFFER_FILE))
  original = _files(user)
  c.experts.dir = user
  calls = _fake_training(monkeypatch, c)
  wd = str(tmp_path / "w")
  with pytest.raises(images.DataError) as e:
    R.get_experts(c, DATA, wd, _Writer())
  msg = str(e.value)
  assert os.path.join(user, E.BUFFER_FILE) in msg and "re-create" in msg and "leave experts.dir empty" in msg
  assert _files(user) == original and not os.path.exists(os.path.join(wd, "experts_corrupt")) and not calls


def test_mismatched_own_buffer_names_the_workdir_not_experts_dir(tmp_path, monkeypatch):
  c = _smoke()
  wd = str(tmp_path / "w")
  own = os.path.join(wd, "experts")
  E.save_buffer(own, _buffer(c))
  calls = _fake_training(monkeypatch, c)
  c.model.width = 32
  with pytest.raises(ConfigError) as e:
    R.get_experts(c, DATA, wd, _Writer())
  msg = str(e.value)
  assert msg == (f"the expert buffer in {own} was trained with model.width=8 but the config asks for 32: use a new "
                 "--workdir for another model (or point experts.dir at a matching buffer)")
  assert not isinstance(e.value, E.CorruptBufferError) and not calls and E.buffer_exists(own)
  # the same buffer given as experts.dir is the user's choice: that message names experts.dir
  c.experts.dir = own
  with pytest.raises(ConfigError, match=r"^experts\.dir=.*model\.width=8 but the config asks for 32: point "):
    R.get_experts(c, DATA, str(tmp_path / "w2"), _Writer())
  # too short for the window: the workdir message says to use a new workdir
  c.experts.dir, c.model.width = "", 8
  c.distill.max_start_epoch = 6
  with pytest.raises(ConfigError, match=rf"^the expert buffer in {own} has experts of 5 epochs.*new --workdir"):
    R.get_experts(c, DATA, wd, _Writer())


def test_train_per_class_table_matches_the_embedded_datasets():
  """validate's per-class table is the smallest training class of the datasets as loaded (digits: class 8)."""
  for name in ("mnist5k", "digits"):
    assert V.TRAIN_PER_CLASS[name] == int(images.get_dataset(name).per_class_counts().min()), name
  assert set(V.TRAIN_PER_CLASS) == set(images.DATASETS)
