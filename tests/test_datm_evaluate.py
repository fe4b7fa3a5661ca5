"""DATM: chunked expert forward passes (== unchunked), evaluating a saved synthetic set through the launcher, the
periodic evaluation's best set, and distilled images in pixel space (ZCA undone)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import datm as datm_config
from lmx import launcher
from lmx.core import plots
from lmx.core.config import ConfigError
from lmx.datasets import images
from lmx.methods.datm import distill as D
from lmx.methods.datm import experts as E
from lmx.models.registry import build_model

from lmx.methods.datm import driver as R  # noqa: E402


def _random_buffer(c, data, num=5):
  m = build_model(c.model, image_shape=data.image_shape, num_classes=data.num_classes)
  p = jax.vmap(m.init)(jax.random.split(jax.random.key(3), num))
  return E.ExpertBuffer(jax.tree.map(lambda a: np.stack([np.asarray(a)] * 2, axis=1), p), {}), m


def test_forward_chunked_equals_unchunked_with_padding():
  c = datm_config.get_config("smoke")
  data = images.get_dataset("digits")
  buf, m = _random_buffer(c, data)
  x = data.x_train_NHWC[:230]
  apply = jax.jit(m.apply)
  ref = np.stack([np.asarray(apply(jax.tree.map(lambda a: a[e], buf.final()), jnp.asarray(x))) for e in range(5)])
  out = E.forward_chunked(m.apply, buf.final(), x, expert_chunk=2, image_chunk=100)  # 5 = 2+2+1, 230 = 100+100+30
  assert out.shape == (5, 230, 10)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  pred = E.forward_chunked(m.apply, buf.final(), x, expert_chunk=3, image_chunk=64, argmax=True)
  np.testing.assert_array_equal(pred, ref.argmax(-1))


def test_init_synthetic_matches_an_unchunked_computation():
  """Selected indices and soft labels with small chunks (padding on both axes) equal a direct per-expert
  computation on all images at once; and stopping after the experts that already fill every class chooses the same
  images as looking at all experts."""
  c = datm_config.get_config("smoke")
  c.distill.ipc = 3
  c.experts.update(fwd_chunk_experts=2, fwd_chunk_images=300)
  data = R.load_data(c)
  buf, m = _random_buffer(c, data)
  syn, y_int = R.init_synthetic(c, data, buf)
  # reference: every expert on every training image, no chunks
  apply = jax.jit(m.apply)
  logits = np.stack([np.asarray(apply(jax.tree.map(lambda a: a[e], buf.final()), jnp.asarray(data.x_train_NHWC)))
                     for e in range(buf.num_experts)])
  idx = D.select_correct(logits.argmax(-1), data.y_train_N, data.num_classes, 3,
                         R.np_stream(c.seed, "init_synthetic"))
  np.testing.assert_array_equal(syn["x"], data.x_train_NHWC[idx])
  np.testing.assert_array_equal(y_int, data.y_train_N[idx])
  np.testing.assert_allclose(syn["y"], D.soft_label_init(logits[:, idx], y_int), rtol=1e-5, atol=1e-5)
  # the early stop: once the first k experts fill every class, more experts cannot change the choice
  rng = np.random.default_rng(0)
  y = np.repeat(np.arange(3), 6)
  preds = np.where(rng.random((6, 18)) < 0.6, y[None], (y[None] + 1) % 3)
  for k in range(1, 7):
    if R._enough_correct(preds[:k], y, 3, 4):
      a = D.select_correct(preds[:k], y, 3, 4, np.random.default_rng(5))
      np.testing.assert_array_equal(a, D.select_correct(preds, y, 3, 4, np.random.default_rng(5)))
      break
  else:
    pytest.fail("no prefix of experts filled every class; the check above never ran")


def _digits_set(path, n_per_class=2, **over):
  data = images.get_dataset("digits")
  idx = np.concatenate([np.flatnonzero(data.y_train_N == k)[:n_per_class] for k in range(10)])
  arrays = dict(x=data.x_train_NHWC[idx], y=np.eye(10, dtype=np.float32)[data.y_train_N[idx]] * 5.0,
                lr=np.float32(0.01), labels=data.y_train_N[idx].astype(np.int64))
  arrays.update(over)
  np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
  return str(path)


def _evaluate_config(path):
  c = datm_config.get_config("evaluate")
  c.data.dataset = "digits"
  c.model.update(depth=2, width=8)
  c.eval.update(num=1, epochs=2, random=True, full=False, cross_arch=("mlp",))
  c.synthetic = path
  return c


@pytest.mark.parametrize("bad,needle", [
    ("missing", "no such file"),
    ("garbage", "not an .npz archive"),
    ("truncated", "cannot be read as an .npz"),
    ("no_lr", r"lacks \['lr'\]"),
    ("wrong_shape", "data.dataset"),
    ("bad_labels", "labels must be"),
])
def test_malformed_synthetic_file_is_a_clear_error(tmp_path, bad, needle):
  path = str(tmp_path / "s.npz")
  if bad == "garbage":
    open(path, "wb").write(b"not a zip file")
  elif bad == "truncated":
    _digits_set(path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
  elif bad == "no_lr":
    _digits_set(path, lr=None)
  elif bad == "wrong_shape":
    _digits_set(path, x=np.zeros((20, 28, 28, 1), np.float32))
  elif bad == "bad_labels":
    _digits_set(path, labels=np.full(20, 12))
  c = _evaluate_config(path)
  with pytest.raises(ConfigError, match=needle) as e:
    R.run(c, str(tmp_path / "w"))
  assert path in str(e.value) or repr(path) in str(e.value)


def test_evaluate_variant_needs_a_file():
  c = datm_config.get_config("evaluate")
  with pytest.raises(ConfigError, match="synthetic"):
    R.validate(c)


@pytest.mark.slow
def test_evaluate_a_saved_set_through_the_launcher(tmp_path, capsys):
  path = _digits_set(tmp_path / "synthetic.npz")
  wd = str(tmp_path / "w")
  launcher.dispatch(_evaluate_config(path), wd)
  r = json.load(open(os.path.join(wd, "results.json")))
  assert r["method"] == "datm_evaluate" and r["ipc"] == 2 and r["distilled"]["n"] == 1
  assert 0 <= r["random"]["mean"] <= 1 and set(r["cross_arch"]) == {"mlp"}
  assert os.path.exists(os.path.join(wd, "plots", "synthetic_images_pixels.png"))
  assert "iterations" not in r and not os.path.exists(os.path.join(wd, "experts"))  # no experts, no distillation
  capsys.readouterr()
  launcher.dispatch(_evaluate_config(path), wd)  # a finished run: nothing to do
  assert "finished run" in capsys.readouterr().out


@pytest.mark.slow
def test_best_keeper_keeps_the_best_set_and_resumes_its_record(tmp_path):
  c = datm_config.get_config("smoke")
  c.distill.update(eval_every=1, eval_nets=1, eval_epochs=2)
  data = R.load_data(c)
  n = c.distill.ipc * data.num_classes
  idx = np.concatenate([np.flatnonzero(data.y_train_N == k)[:1] for k in range(10)])
  good = {"x": jnp.asarray(data.x_train_NHWC[idx]), "y": jnp.asarray(np.eye(10, dtype=np.float32)[data.y_train_N[idx]] * 5),
          "lr": jnp.float32(np.log(0.01))}
  noise = dict(good, x=jnp.asarray(np.random.default_rng(0).normal(size=(n, 8, 8, 1)).astype(np.float32)))
  keeper = R.BestKeeper(c, data, data.y_train_N[idx], str(tmp_path))
  a = keeper(1, {"syn": good}, None)
  b = keeper(2, {"syn": noise}, None)
  assert a["acc"] != b["acc"]  # the two sets score differently, so which one is kept means something
  best_step = 1 if a["acc"] > b["acc"] else 2
  z = np.load(str(tmp_path / "best_synthetic.npz"))
  assert int(z["step"]) == best_step and float(z["acc"]) == max(a["acc"], b["acc"])
  np.testing.assert_array_equal(z["x"], np.asarray(good["x"] if best_step == 1 else noise["x"]))
  again = R.BestKeeper(c, data, data.y_train_N[idx], str(tmp_path))  # a resumed run reads the record back
  assert again.best["step"] == best_step
  # the saved best set loads as an evaluation input
  s = R.load_synthetic(str(tmp_path / "best_synthetic.npz"), data)
  assert s["x"].shape == (n, 8, 8, 1) and s["soft_labels"]


def test_pixel_grid_png_holds_zca_undone_pixels(tmp_path):
  """Random images → ZCA → to_pixels → the PNG: its pixels read back as the original images (to 1/255)."""
  rng = np.random.default_rng(0)
  px = rng.uniform(0.1, 0.9, size=(200, 4, 4, 3)).astype(np.float32)
  z = images.fit_zca(px, eps=0.1)
  data = images.ImageData("rand", z.apply(px), np.zeros(200, np.int32), z.apply(px[:2]), np.zeros(2, np.int32), 1,
                          np.zeros(3, np.float32), np.ones(3, np.float32), zca=z)
  np.testing.assert_allclose(data.to_pixels(data.x_train_NHWC), px, atol=1e-4)  # to_pixels(zca(x)) ≈ x
  path = plots.pixel_grid(str(tmp_path / "g.png"), data.to_pixels(data.x_train_NHWC[:6]), nrow=2, scale=1, gap=1)
  import matplotlib.image
  img = matplotlib.image.imread(path)[..., :3]
  assert img.shape == (2 * 5 - 1, 3 * 5 - 1, 3)
  for i in range(6):
    r, col = divmod(i, 3)
    np.testing.assert_allclose(img[r * 5:r * 5 + 4, col * 5:col * 5 + 4], px[i], atol=1 / 255 + 1e-6)
