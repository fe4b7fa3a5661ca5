"""DATM configs, validation errors, expert buffers, evaluation helpers, a tiny smoke run through launch/run.py (its
stages, layout and SIGTERM resume) and (slow) the smoke pipeline in-process."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import datm as datm_config
from lmx.core.config import ConfigError
from lmx.methods.datm import experts as E
from lmx.methods.datm import evaluate as EV
from lmx.methods.datm.checks import validate
from tests import resume_check


@pytest.mark.parametrize("variant", datm_config.VARIANTS)
def test_every_variant_builds_and_validates(variant):
  c = datm_config.get_config(variant)
  validate(c, for_run=False)  # the evaluate variant's --config.synthetic comes from the command line
  assert c.method == "datm"
  if variant.startswith("cifar"):
    name, ipc = variant.split("_ipc")
    assert c.data.dataset == name and c.distill.ipc == int(ipc) and c.data.zca
    assert c.model.width == 128 and c.experts.gsam and c.eval.epochs == 1000


def test_default_is_ipc1_and_the_digits_variants_fit_their_data():
  d, i1 = datm_config.get_config(""), datm_config.get_config("ipc1")
  assert d.to_dict() == {**i1.to_dict(), "variant": ""}
  assert (d.distill.ipc, d.distill.iterations, d.distill.min_start_epoch, d.distill.max_start_epoch) == (1, 1000, 0, 3)
  assert datm_config.get_config("ipc10").distill.ipc == 10 and datm_config.get_config("ipc10").distill.sequential
  for ipc in datm_config.DIGITS_IPCS:
    c = datm_config.get_config(f"digits_ipc{ipc}")
    assert c.data.dataset == "digits" and c.distill.ipc == ipc and c.eval.full_epochs >= 15
    # the expert segment of the last window fits the experts' epochs
    assert c.distill.max_start_epoch + c.distill.expert_epochs <= c.experts.epochs


def test_paper_table_values():
  c = datm_config.get_config("cifar10_ipc1")
  d = c.distill
  assert (d.syn_steps, d.expert_epochs, d.max_start_epoch, d.lr_img, d.lr_lr, d.lr_y, d.threshold) == (
      80, 2, 4, 100.0, 1e-7, 5.0, 1.1)
  assert not d.sequential
  c = datm_config.get_config("cifar100_ipc50")
  assert c.distill.init == "real" and c.distill.min_start_epoch == 20 and c.distill.max_start_epoch == 70
  c = datm_config.get_config("cifar10_ipc10")
  assert c.distill.sequential and c.distill.current_max_start_epoch == 10 and c.distill.expansion_end == 1000
  m = datm_config.get_config("mtt")
  assert not m.distill.soft_labels and m.distill.init == "real" and not m.distill.sequential


def test_bad_input_names_the_field():
  c = datm_config.get_config("")
  c.distill.ipc = 401
  with pytest.raises(ConfigError, match="distill.ipc"):
    validate(c)
  c = datm_config.get_config("")
  c.data.dataset = "imagenet42"
  with pytest.raises(ConfigError, match="data.dataset"):
    validate(c)
  c = datm_config.get_config("")
  c.distill.max_start_epoch = 20
  with pytest.raises(ConfigError, match="experts.epochs"):
    validate(c)
  with pytest.raises(ConfigError, match="variant"):
    datm_config.get_config("cifar10_ipc7")


@pytest.mark.parametrize("field,value,needle", [
    ("distill.lr_imgg", 100.0, r"distill: unknown field\(s\) \['lr_imgg'\]; valid: \[.*'lr_img'"),
    ("experts.num", 0, r"experts.num: must be a whole number and >= 1, got 0"),
    ("distill.momentum_y", 1.0, r"distill.momentum_y: must be >= 0 and < 1, got 1.0"),
    ("distill.lr_img", float("inf"), r"distill.lr_img: must be a finite number, got inf"),
    ("distill.init", "zeros", r"distill.init: 'zeros' is not one of \['correct', 'real', 'noise'\]"),
    ("model.conv_impl", "cudnn", r"model.conv_impl: 'cudnn' is not one of"),
    ("eval.cross_arch", ("mlp", "vit"), r"eval.cross_arch\[1\]: 'vit' is not one of"),
])
def test_schema_names_the_wrong_field_in_one_line(field, value, needle):
  c = datm_config.get_config("smoke")
  block, key = field.split(".")
  c[block][key] = value
  with pytest.raises(ConfigError, match=f"^{needle}") as e:
    validate(c, for_run=False)
  assert "\n" not in str(e.value)


def test_safe_fields_are_the_cadences_the_evaluation_and_implementation_choices():
  from lmx.core import schema

  datm_config.get_config("smoke")
  evaluation = {f"eval.{k}" for k in ("num", "epochs", "batch", "momentum", "weight_decay", "lr_real", "full_epochs",
                                      "random", "full", "vmap", "init", "cross", "cross_arch")}  # all of eval
  assert set(schema.safe_fields("datm")) == {
      "distill.log_every", "distill.ckpt_every", "distill.max_nonfinite", "experts.parallel", "experts.vmap",
      "model.conv_impl", "experts.fwd_chunk_experts", "experts.fwd_chunk_images", "distill.eval_every",
      "distill.eval_nets", "distill.eval_epochs"} | evaluation
  assert evaluation == {f"eval.{k}" for k in datm_config.get_config("smoke").eval}


def test_config_choices_match_the_code_that_reads_them():
  from lmx.models import convnet
  from lmx.models.registry import model_names

  assert datm_config.CONV_IMPLS == convnet.CONV_IMPLS
  assert set(datm_config.EVAL_ARCHS) <= set(model_names())


def test_expert_buffer_round_trip_and_mismatch(tmp_path):
  c = datm_config.get_config("smoke")
  params = {"conv0": {"kernel": np.ones((2, 3, 3, 3, 1, 4), np.float32)}, "fc": {"bias": np.zeros((2, 3, 10))}}
  meta = E.expected_meta(c, (8, 8, 1), 10)
  E.save_buffer(str(tmp_path), E.ExpertBuffer(params, meta))
  buf = E.load_buffer(str(tmp_path), meta, min_epochs=2)
  assert buf.num_experts == 2 and buf.num_epochs == 2
  assert buf.snapshot(1, 2)["conv0"]["kernel"].shape == (3, 3, 1, 4)
  with pytest.raises(ConfigError, match="experts.dir.*width"):
    E.load_buffer(str(tmp_path), dict(meta, width=99), min_epochs=2)
  with pytest.raises(ConfigError, match="image_shape"):
    E.load_buffer(str(tmp_path), dict(meta, image_shape=[28, 28, 1]), min_epochs=2)
  with pytest.raises(ConfigError, match="expert_epochs"):
    E.load_buffer(str(tmp_path), meta, min_epochs=5)
  with pytest.raises(ConfigError, match="no expert buffer"):
    E.load_buffer(str(tmp_path / "nothing"), meta, min_epochs=1)


def test_epoch_batches_cover_everything_once():
  idx, mask = E.epoch_batches(np.random.default_rng(0), 10, 4)
  assert idx.shape == (3, 4) and mask.sum() == 10
  assert sorted(idx.ravel()[mask.ravel() > 0].tolist()) == list(range(10))


@pytest.mark.parametrize("adaptive", [False, True])
def test_gsam_gradient_matches_a_numpy_computation(adaptive):
  """GSAM at rho > 0 on a quadratic, computed by hand in NumPy: the ascent point, the gradient there and the
  orthogonal correction g' - alpha (g - proj_{g'} g)."""
  a = np.array([1.0, 3.0, 0.5])
  w = np.array([0.5, 2.0, -1.0])
  grad = lambda v: 2 * a * (v - 1.0)  # of sum(a (w - 1)^2)
  rho, alpha = 0.05, 0.3
  g = grad(w)
  if adaptive:
    e = rho * g * w ** 2 / np.linalg.norm(np.abs(w) * g)
  else:
    e = rho * g / np.linalg.norm(g)
  g2 = grad(w + e)
  expect = g2 - alpha * (g - (g @ g2) / (g2 @ g2) * g2)
  with jax.enable_x64(True):
    loss = lambda p: jnp.sum(jnp.asarray(a) * (p["w"] - 1.0) ** 2)
    _, out = E.gsam_grad(loss, {"w": jnp.asarray(w)}, rho=rho, alpha=alpha, adaptive=adaptive)
  np.testing.assert_allclose(np.asarray(out["w"]), expect, rtol=1e-9)
  assert not np.allclose(expect, g)  # the perturbation matters at this rho


def test_random_subset_is_stratified():
  y = np.repeat(np.arange(3), 5)
  idx = EV.random_subset(np.random.default_rng(0), y, 3, 2)
  assert np.bincount(y[idx]).tolist() == [2, 2, 2]


@pytest.mark.slow
def test_smoke_pipeline_end_to_end_and_resume(tmp_path):
  from lmx.methods.datm import driver as R
  c = datm_config.get_config("smoke")
  c.distill.iterations = 10
  c.eval.update(epochs=10, full=False, init=True)
  wd = str(tmp_path / "w")
  r = R.run(c, wd)
  for k in ("distilled", "random", "initial"):
    assert 0.0 <= r[k]["mean"] <= 1.0 and r[k]["n"] == c.eval.num
  assert r["seconds_per_iteration"] > 0 and r["compile_wall_s"] > 0
  assert os.path.exists(os.path.join(wd, "plots", "distilled_images.png"))
  saved = json.load(open(os.path.join(wd, "results.json")))
  assert saved["iterations"] == 10
  x1 = np.load(os.path.join(wd, "synthetic.npz"))["x"]
  # a rerun reuses the experts and the finished checkpoint: no new iterations, same images
  r2 = R.run(c, wd)
  assert r2["resumed_from"] == 10
  np.testing.assert_array_equal(np.load(os.path.join(wd, "synthetic.npz"))["x"], x1)
  # a buffer for another model is refused
  c.model.width = 4
  c.experts.dir = os.path.join(wd, "experts")
  with pytest.raises(ConfigError, match="width"):
    R.run(c, str(tmp_path / "w2"))


def _tiny_smoke(iterations: int):
  c = datm_config.get_config("smoke")
  c.experts.update(epochs=4)
  c.distill.update(iterations=iterations, ckpt_every=2, log_every=1, max_start_epoch=3, current_max_start_epoch=3)
  c.eval.update(num=1, epochs=2, random=False, full=False)
  return c


@pytest.mark.slow
def test_interrupted_distillation_resumes_exactly(tmp_path, monkeypatch):
  """On the shared loop: 4 iterations in one go == 3 iterations, a crash (last checkpoint at 2), a rerun to 4
  (same images, labels, step size, bitwise; the data position — expert and start epoch — resumes too)."""
  from lmx.methods.datm import driver as R
  c = _tiny_smoke(4)
  c.distill.update(eval_every=2, eval_nets=1, eval_epochs=1)  # the periodic evaluation's best set resumes too
  R.run(c, str(tmp_path / "a"))
  c = _tiny_smoke(4)
  c.distill.update(eval_every=2, eval_nets=1, eval_epochs=1)
  c.experts.dir = str(tmp_path / "a" / "experts")  # the same experts, not trained again
  orig, seen = R.D.ExpertWindows.__next__, {"n": 0}

  def crash_after_3(self):
    seen["n"] += 1
    if seen["n"] > 3:
      raise KeyboardInterrupt
    return orig(self)

  monkeypatch.setattr(R.D.ExpertWindows, "__next__", crash_after_3)
  with pytest.raises(KeyboardInterrupt):
    R.run(c, str(tmp_path / "b"))
  monkeypatch.setattr(R.D.ExpertWindows, "__next__", orig)
  r = R.run(c, str(tmp_path / "b"))
  assert r["resumed_from"] == 2
  a, b = np.load(str(tmp_path / "a" / "synthetic.npz")), np.load(str(tmp_path / "b" / "synthetic.npz"))
  for k in ("x", "y", "lr"):
    np.testing.assert_array_equal(a[k], b[k])
  ba, bb = np.load(str(tmp_path / "a" / "best_synthetic.npz")), np.load(str(tmp_path / "b" / "best_synthetic.npz"))
  for k in ("x", "y", "lr", "acc", "step"):
    np.testing.assert_array_equal(ba[k], bb[k])
  ra, rb = json.load(open(tmp_path / "a" / "results.json")), json.load(open(tmp_path / "b" / "results.json"))
  assert ra["distilled"]["values"] == rb["distilled"]["values"]  # the paired evaluation streams are seed-determined
  assert ra["best_during_distill"] == rb["best_during_distill"] and ra["best"] == rb["best"]


def test_run_of_nonfinite_losses_stops_clearly(tmp_path, monkeypatch, capfd, caplog):
  """A run of max_nonfinite non-finite meta-losses stops the run with a clear error (on the shared loop's guard);
  nothing good was lost: no checkpoint of a non-finite state is written."""
  from lmx.methods.datm import driver as R

  def nan_step(state, theta_start, theta_target, key, *, inner, outer, apply_fn=None):
    del theta_start, theta_target, key, inner, outer, apply_fn
    nan = jnp.float32(jnp.nan)
    return state, {"loss": nan, "skipped": jnp.float32(1), "nonfinite": jnp.float32(1), "spike": jnp.float32(0),
                   "lr": jnp.float32(0.01),
                   "grad_norm_x": nan, "grad_norm_y": nan, "grad_lr": nan}
  monkeypatch.setattr(R.D, "meta_step", nan_step)
  c = _tiny_smoke(10)
  c.distill.update(max_nonfinite=8, log_every=5, ckpt_every=100)  # step 5 logs NaNs, step 10 stops
  with pytest.raises(FloatingPointError, match=r"at step 1 \(\d+ consecutive bad step.*no checkpoint had been written"):
    R.run(c, str(tmp_path / "w"))
  assert not os.listdir(str(tmp_path / "w" / "checkpoints"))
  out, err = capfd.readouterr()
  assert "NaN or Inf found" not in out + err + caplog.text  # non-finite scalars stay out of TensorBoard (no warning per value)


def test_cross_evaluations_pair_final_images_with_initial_labels_and_back(tmp_path):
  """With the images changed and the labels not, images_only must be the distilled arm and labels_only the initial
  arm, network for network (same streams); a swapped or mis-wired arm breaks one of the two equalities."""
  from lmx.methods.datm import driver as R
  from lmx.core import metrics
  c = datm_config.get_config("smoke")
  c.eval.update(num=2, epochs=3, random=False, full=False, init=True, cross=True)
  data = R.load_data(c)
  rng = np.random.default_rng(0)
  n, shape = c.distill.ipc * data.num_classes, data.x_train_NHWC.shape[1:]
  x0 = rng.normal(size=(n, *shape)).astype(np.float32)
  y0 = rng.normal(size=(n, data.num_classes)).astype(np.float32)
  x1 = x0 + rng.normal(size=x0.shape).astype(np.float32)
  lr = np.float32(R.D.lr_raw_from_value(0.01, c.distill.lr_param))
  writer = metrics.Writer(str(tmp_path), total_steps=1)
  try:
    syn0 = {"x": x0, "y": y0, "lr": lr}
    out = R.run_eval(c, data, {"syn": {"x": jnp.asarray(x1), "y": jnp.asarray(y0), "lr": jnp.asarray(lr)}},
                     writer, syn0)
    assert out["distilled"]["values"] != out["initial"]["values"]  # the arms differ, so the checks below can fail
    assert out["images_only"]["values"] == out["distilled"]["values"]
    assert out["labels_only"]["values"] == out["initial"]["values"]
  finally:
    writer.close()


CONFIG = "configs/datm.py:smoke"
# the smoke config, tiny: one expert × 4 epochs, 6 distillation iterations of 2 inner steps (a checkpoint every 3),
# 2 evaluation networks × 2 epochs per arm
TINY = ("--config.experts.num=1", "--config.experts.parallel=1", "--config.experts.epochs=4",
        "--config.distill.iterations=6", "--config.distill.syn_steps=2", "--config.distill.ckpt_every=3",
        "--config.distill.log_every=3", "--config.distill.max_start_epoch=3",
        "--config.distill.current_max_start_epoch=3", "--config.eval.num=2", "--config.eval.epochs=2")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted run of the tiny smoke config through launch/run.py, shared by the tests below."""
  w, r = resume_check.reference_run(tmp_path_factory, "datm", CONFIG, *TINY)
  assert max(len(line.split(" → ")[0]) for line in r.stdout.splitlines()) < 200, r.stdout  # readable lines
  return w


# The DATM runs through launch/run.py are in the slow tier: even the tiny config trains an expert and compiles the
# second-order meta-step (about 2 min of CPU per run); the fast tier keeps the in-process checks above.
@pytest.mark.slow
def test_tiny_smoke_stages_layout_and_results(reference):
  resume_check.check_layout(reference)
  res = resume_check.results(reference)
  for arm in ("distilled", "initial", "random"):
    assert res[arm]["n"] == 2 and len(res[arm]["values"]) == 2
    assert res[arm]["std"] == pytest.approx(float(np.std(res[arm]["values"], ddof=1)))  # the sample std
  assert res["wall_s"] > 0 and not any(k.endswith("seconds") for k in res), sorted(res)
  evals = os.listdir(os.path.join(reference, "stages", "eval"))
  assert len(evals) == 1 and evals[0].startswith("it6-")
  assert sorted(os.listdir(os.path.join(reference, "stages", "eval", evals[0]))) == ["distilled", "initial",
                                                                                     "random"]
  assert os.path.exists(os.path.join(reference, "plots", "distilled_images.png"))


@pytest.mark.slow
def test_sigterm_in_the_distillation_resumes_to_the_same_results(tmp_path, reference):
  res = resume_check.check_sigterm_resume(tmp_path, CONFIG, *TINY, reference=reference)
  assert res["resumed_from"] == 3


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_paper_meta_step_lowers_for_accelerators(platform):
  """The CIFAR-10 IPC 10 preset's meta-step (rolled scan, remat, hoisted DSA, native convolutions) builds for GPU and
  TPU from this CPU host (N cut to 3 steps: the loop body is the same)."""
  from lmx.methods.datm import distill as D
  from lmx.models import convnet
  from lmx.methods.datm import driver as R
  c = datm_config.get_config("cifar10_ipc10")
  c.distill.syn_steps = 3
  inner, outer = R.specs(c)
  assert inner.hoist_dsa and inner.remat and not inner.unroll
  p0 = jax.eval_shape(lambda k: convnet.init_params(k, (32, 32, 3), 10, depth=3, width=128), jax.random.key(0))
  syn = {"x": jax.ShapeDtypeStruct((100, 32, 32, 3), jnp.float32), "y": jax.ShapeDtypeStruct((100, 10), jnp.float32),
         "lr": jax.ShapeDtypeStruct((), jnp.float32)}
  state = jax.eval_shape(lambda s: D.init_state(s, D.make_optimizer(outer, inner)), syn)
  apply_fn = convnet.apply_with("xla", second_order=True)
  fn = jax.jit(lambda s, a, b, k: D.meta_step(s, a, b, k, inner=inner, outer=outer, apply_fn=apply_fn))
  text = fn.trace(state, p0, p0, jax.random.key(1)).lower(lowering_platforms=(platform,)).as_text()
  assert "stablehlo.convolution" in text and "stablehlo.while" in text
