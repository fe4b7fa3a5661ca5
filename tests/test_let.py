"""LET: the pure pieces against independent numpy references, the step's gradients and retracing, the (shortened)
smoke run through launch/run.py with its stages, SIGTERM resume and NaN stop, and the paper-scale student step
lowered for a GPU target."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.core import checkpoint as ckpt_lib
from lmx.core import loop
from lmx.core import mesh as mesh_lib
from lmx.kernels import attention as attention_lib
from lmx.methods.let import driver as let_run
from lmx.methods.let import losses
from tests import config_check, resume_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(variant):
  return config_check.config("let", variant)


def _np_interp_features(h, d_out):
  """Reference: PyTorch align_corners=False sample points, np.interp (clamps at the ends) per row."""
  d_in = h.shape[-1]
  x = (np.arange(d_out) + 0.5) * d_in / d_out - 0.5
  flat = h.reshape(-1, d_in)
  return np.stack([np.interp(x, np.arange(d_in), r) for r in flat]).reshape(h.shape[:-1] + (d_out,))


# ------------------------------------------------------------------------------------------ feature_interp


def test_feature_interp_hand_values():
  # up 2 -> 4: sample points -0.25, 0.25, 0.75, 1.25 -> clamp, 2.5, 7.5, clamp
  out = np.asarray(losses.feature_interp(jnp.array([[[0.0, 10.0]]]), 4))
  np.testing.assert_allclose(out[0, 0], [0.0, 2.5, 7.5, 10.0], atol=1e-6)
  # down 4 -> 2: sample points 0.5 and 2.5 -> neighbour means, no antialias averaging over 4 inputs
  out = np.asarray(losses.feature_interp(jnp.array([[[0.0, 1.0, 4.0, 9.0]]]), 2))
  np.testing.assert_allclose(out[0, 0], [0.5, 6.5], atol=1e-6)


@pytest.mark.parametrize("d_in,d_out", [(5, 8), (64, 128), (8, 3), (128, 48), (7, 7)])
def test_feature_interp_matches_np_interp(d_in, d_out):
  h = np.random.default_rng(d_in * 100 + d_out).normal(size=(2, 3, d_in)).astype(np.float32)
  out = np.asarray(losses.feature_interp(jnp.asarray(h), d_out))
  assert out.shape == (2, 3, d_out)
  np.testing.assert_allclose(out, _np_interp_features(h, d_out), atol=1e-4)  # float32 sample points


def test_feature_interp_downsampling_differs_from_antialiased_resize():
  # The reason for antialias=False: JAX's default widens the kernel when downsampling.
  h = jnp.asarray(np.random.default_rng(0).normal(size=(1, 1, 8)).astype(np.float32))
  ours = np.asarray(losses.feature_interp(h, 3))
  aa = np.asarray(jax.image.resize(h, (1, 1, 3), "linear"))
  assert np.max(np.abs(ours - aa)) > 1e-2


def test_projector_starts_at_the_interpolation():
  h = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 12)).astype(np.float32))
  proj = losses.init_projector(12, 5)
  assert proj["w_dSdT"].shape == (12, 5)
  np.testing.assert_allclose(np.asarray(losses.project(h, proj)), np.asarray(losses.feature_interp(h, 5)),
                             atol=1e-5)


# ------------------------------------------------------------------------------------------ neg_cos_align


def _np_align(s, t, mask):
  cos = np.sum(s * t, -1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
  return np.sum((1 - cos) * mask) / np.sum(mask)


def test_neg_cos_align_hand_value():
  s = jnp.array([[[1.0, 0.0], [0.0, 2.0]]])
  t = jnp.array([[[1.0, 1.0], [0.0, -3.0]]])  # cos = 1/sqrt(2), -1
  np.testing.assert_allclose(float(losses.neg_cos_align(s, t)), ((1 - 2 ** -0.5) + 2.0) / 2, rtol=1e-6)
  only_first = jnp.array([[1, 0]])
  np.testing.assert_allclose(float(losses.neg_cos_align(s, t, only_first)), 1 - 2 ** -0.5, rtol=1e-6)


def test_neg_cos_align_masks_padding():
  rng = np.random.default_rng(2)
  s = rng.normal(size=(3, 6, 16)).astype(np.float32)
  t = rng.normal(size=(3, 6, 16)).astype(np.float32)
  mask = np.ones((3, 6), np.float32)
  mask[0, :2] = 0  # left padding
  mask[2, 4:] = 0  # right padding
  t[mask == 0] = -s[mask == 0]  # padded positions maximally misaligned: counting them would raise the loss
  got = float(losses.neg_cos_align(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask)))
  np.testing.assert_allclose(got, _np_align(s, t, mask), rtol=1e-5)
  assert abs(got - _np_align(s, t, np.ones_like(mask))) > 0.05  # the mask matters for this input
  # padded values do not matter at all
  s2 = s.copy()
  s2[mask == 0] = 1e3 * rng.normal(size=s2[mask == 0].shape)
  np.testing.assert_allclose(float(losses.neg_cos_align(jnp.asarray(s2), jnp.asarray(t), jnp.asarray(mask))),
                             got, rtol=1e-6)
  assert float(losses.neg_cos_align(jnp.asarray(s), jnp.asarray(t), jnp.zeros((3, 6)))) == 0.0


def test_alignment_gives_the_teacher_no_gradient():
  rng = np.random.default_rng(3)
  s = jnp.asarray(rng.normal(size=(2, 4, 8)).astype(np.float32))
  t = jnp.asarray(rng.normal(size=(2, 4, 6)).astype(np.float32))
  mask = jnp.ones((2, 4))
  for mode, proj in (("interp", None), ("project", losses.init_projector(8, 6))):
    f = lambda s_, t_, p_: losses.align_loss(s_, t_, mask, mode=mode, proj=p_)  # noqa: E731
    g_s, g_t = jax.grad(f, argnums=(0, 1))(s, t, proj)
    assert float(jnp.abs(g_t).max()) == 0.0, mode
    assert float(jnp.abs(g_s).max()) > 0.0, mode
  g_p = jax.grad(lambda p: losses.align_loss(s, t, mask, mode="project", proj=p))(losses.init_projector(8, 6))
  assert float(jnp.abs(g_p["w_dSdT"]).max()) > 0.0  # the projector is trained


# ------------------------------------------------------------------------------------------ let_weight


def test_let_weight_hand_values_and_traced():
  expect = {0: 0.1, 25: 0.075, 50: 0.05, 99: 0.001, 100: 0.0, 101: 0.0, 1000: 0.0}
  for s, v in expect.items():
    np.testing.assert_allclose(float(losses.let_weight(s, 0.1, 100)), v, atol=1e-7)
  jitted = jax.jit(lambda step: losses.let_weight(step, 0.1, 100))
  steps = jnp.array(list(expect), jnp.int32)
  np.testing.assert_allclose(np.asarray(jax.vmap(jitted)(steps)), list(expect.values()), atol=1e-7)
  np.testing.assert_allclose(float(jitted(jnp.int32(25))), 0.075, atol=1e-7)
  with pytest.raises(ValueError):
    losses.let_weight(0, 0.1, 0)


def test_config_schedules():
  c = _config("smoke")
  c.train.steps, c.let.s_stop, c.let.lam0 = 100, 40, 0.3
  w = jax.jit(let_run.weight_fn(c))
  np.testing.assert_allclose([float(w(jnp.int32(s))) for s in (0, 20, 40, 60)], [0.3, 0.15, 0.0, 0.0], atol=1e-7)
  c.let.schedule = "constant"
  w = jax.jit(let_run.weight_fn(c))
  np.testing.assert_allclose([float(w(jnp.int32(s))) for s in (0, 39, 40)], [0.3, 0.3, 0.0])
  c.let.s_stop = 0
  c.let.s_stop_fraction = 0.25
  assert let_run.s_stop(c) == 25


# ------------------------------------------------------------------------------------------ config checks


@pytest.mark.parametrize("field,value,needle", [
    ("let.lamda0", 0.3, r"let: unknown field\(s\) \['lamda0'\]; valid: \[.*'lam0'"),
    ("teacher.optim.lr_typo", 1e-3, r"teacher.optim: unknown field\(s\) \['lr_typo'\]"),
    ("let.lam0", -0.1, r"let.lam0: must be >= 0, got -0.1"),
    ("data.eval_fraction", 1.0, r"data.eval_fraction: must be > 0 and < 1, got 1.0"),
    ("teacher.steps", 0, r"teacher.steps: must be a whole number and >= 1, got 0"),
    ("optim.lr", float("nan"), r"optim.lr: must be a finite number"),
    ("let.align", "concat", r"let.align: 'concat' is not one of \['interp', 'project'\]"),
    ("teacher.source", "hub", r"teacher.source: 'hub' is not one of \['pretrain', 'run', 'hf'\]"),
    ("data.source", "web", r"data.source: 'web' is not one of \['embedded', 'tfds'\]"),
    ("compare.arms", ("let", "l2e"), r"compare.arms\[1\]: 'l2e' is not one of"),
    ("compare.seeds", (0, 0), r"compare.seeds: must be distinct integers >= 0"),
    ("let.s_stop_fraction", 1.5, r"let.s_stop_fraction: must be in \(0, 1\] when let.s_stop is 0, got 1.5"),
])
def test_bad_config_names_the_field_in_one_line(field, value, needle):
  config_check.refuses(let_run.validate, _config("smoke"), field, value, needle, anchored=True)


def test_safe_fields_and_config_choices():
  from lmx.core import schema
  from lmx.methods.let import compare

  mod = config_check.module("let")
  mod.get_config("smoke")
  # cadences, the mesh and its rules, numerics-neutral implementation choices of both transformers
  assert set(schema.safe_fields("let")) == {
      "train.log_every", "train.eval_every", "train.eval_batches", "train.ckpt_every", "train.ckpt_keep",
      "train.async_checkpointing", "train.plot", "mesh.data", "mesh.fsdp", "mesh.model", "mesh.expert", "axis_rules",
      "model.attention_impl", "model.remat", "model.moe_impl",
      "teacher.model.attention_impl", "teacher.model.remat", "teacher.model.moe_impl"}
  assert mod.ALIGN_MODES == losses.ALIGN_MODES and mod.ARMS == compare.ARMS


# ------------------------------------------------------------------------------------------ the step


def _small_models(align="interp"):
  c = _config("smoke")
  c.let.align = align
  # tinier than smoke (compile time is most of these tests): 2-layer d=32 student, 1-layer d=16 teacher
  c.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64)
  c.teacher.model.update(d_model=16, n_heads=2, n_kv_heads=1, d_ff=32)
  student, teacher = let_run.validate(c)
  return c, student, teacher


def _rand_params(model, seed):
  """Random parameters of ``model`` drawn on the host (jit-compiling the NNX init costs seconds per model)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape).astype(a.dtype)), model.abstract_params())


def test_let_loss_gives_frozen_teacher_no_gradient_and_swapping_it_does_not_retrace():
  c, student, teacher = _small_models()
  let_loss, _ = let_run.make_losses(c, student, teacher)
  trainable = {"params": _rand_params(student, 0)}
  frozen = {"teacher": _rand_params(teacher, 1)}
  tokens = jax.random.randint(jax.random.key(2), (2, 17), 0, 256)
  g = jax.jit(jax.grad(lambda fr: let_loss(trainable, fr, tokens, jnp.int32(0))[0]))(frozen)
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g)) == 0.0
  traces = []

  def counted(tr, fr, tok, step):
    traces.append(1)
    return let_loss(tr, fr, tok, step)[1]["align"]

  f = jax.jit(counted)
  a1 = float(f(trainable, frozen, tokens, jnp.int32(0)))
  a2 = float(f(trainable, {"teacher": _rand_params(teacher, 7)}, tokens, jnp.int32(3)))
  assert len(traces) == 1 and a1 != a2  # a new teacher is new data, not a new program


def test_let_step_trains_projector_and_ce_step_skips_teacher():
  c, student, teacher = _small_models("project")
  let_step, ce_step, init_fn, _ = let_run.make_steps(c, student, teacher, mesh_lib.make_mesh(c.mesh))
  # init_fn's tree with zero optimiser moments, host-random student params and the interpolation projector
  state = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(init_fn, jax.random.key(0)))
  state.update(params=_rand_params(student, 0), proj=losses.init_projector(c.model.d_model, c.teacher.model.d_model),
               step=jnp.int32(3))
  frozen = {"teacher": _rand_params(teacher, 1)}
  tokens = jax.random.randint(jax.random.key(2), (8, 17), 0, 256)
  step = jax.jit(let_step)
  mid, _ = step(state, frozen, tokens, jax.random.key(3))  # optax's own count: its first update has lr 0
  new, m = step(dict(mid, step=state["step"]), frozen, tokens, jax.random.key(4))
  assert float(jnp.abs(new["proj"]["w_dSdT"] - state["proj"]["w_dSdT"]).max()) > 0
  lam = float(let_run.weight_fn(c)(3))
  assert float(m["lambda"]) == pytest.approx(lam) and lam > 0
  np.testing.assert_allclose(float(m["loss"]), float(m["ce"]) + lam * float(m["align"]), rtol=1e-5)
  # the CE step's program never reads the teacher: it runs with frozen=None
  _, m2 = jax.jit(ce_step)(state, None, tokens, jax.random.key(3))
  np.testing.assert_allclose(float(m2["loss"]), float(m["ce"]), rtol=1e-5)


# ------------------------------------------------------------------------------------------ end to end


CONFIG = "configs/let.py:smoke"
# the smoke config, shorter: teacher 8 steps; baseline and student 16 steps, S_stop 5, a checkpoint every 8
SHORT = ("--config.teacher.steps=8", "--config.train.steps=16", "--config.train.eval_every=8",
         "--config.train.ckpt_every=8", "--config.train.log_every=4")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted run of the shortened smoke config through launch/run.py, shared by the tests below."""
  w, r = resume_check.reference_run(tmp_path_factory, "let", CONFIG, *SHORT)
  assert "resumed_from_step" not in r.stdout  # the CE phase continues the alignment phase's state: not a resume
  return w


def test_smoke_stages_and_results(reference):
  w = str(reference)
  resume_check.check_layout(w)
  res = resume_check.results(w)
  stop = res["s_stop"]
  assert 0 < stop < res["steps"] == 16
  align, ce = res["phases"]["align"], res["phases"]["ce"]
  assert align["steps"] == [0, stop] and ce["steps"] == [stop, res["steps"]]
  assert align["steps_per_sec"] > 0 and ce["steps_per_sec"] > 0 and res["teacher_step_time_overhead"] is not None
  assert np.isfinite(res["teacher"]["eval_ce"]) and np.isfinite(res["final_eval"]["ce"])
  for stage in ("teacher", "baseline/align", "baseline/ce", "let/align", "let/ce"):  # each a finished stage
    assert json.load(open(os.path.join(w, "stages", stage, "stage.json")))["status"] == "finished", stage
  assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["baseline", "let", "teacher"]
  # the paired baseline: same steps, λ0 = 0 throughout; its final CE and the speedup reported against it
  recs = [json.loads(line) for line in open(os.path.join(w, "metrics.jsonl"))]
  vb = res["vs_baseline"]
  base_ce = {x["step"]: x["baseline/eval/ce"] for x in recs if "baseline/eval/ce" in x}
  assert vb["baseline_final_eval_ce"] == base_ce[16] and vb["let_final_eval_ce"] == res["final_eval"]["ce"]
  assert vb["let_final_eval_ce"] > vb["baseline_final_eval_ce"] or vb["speedup"] >= 1.0
  assert all(x["baseline/lambda"] == 0.0 for x in recs if "baseline/lambda" in x)
  assert os.path.exists(os.path.join(w, "plots", "vs_baseline.png"))
  align_steps = [x["step"] for x in recs if "let/align" in x]
  assert align_steps and max(align_steps) <= stop  # the teacher is used only before S_stop
  lam = {x["step"]: x["let/lambda"] for x in recs if "let/lambda" in x}
  assert all(v == 0.0 for s, v in lam.items() if s > stop) and any(v > 0 for v in lam.values())


def test_new_teacher_weights_at_the_same_path_refuse_to_resume(tmp_path):
  """The teacher's files are fingerprinted when a run starts; on resume, other weights at teacher.hf_path (same
  size, other contents), a changed config.json or a teacher run with a newer checkpoint stop the run, naming the
  path and what changed."""
  import shutil

  from lmx.core.config import ConfigError

  hf = tmp_path / "teacher_hf"
  shutil.copytree(os.path.join(ROOT, "tests", "data", "hf", "tiny_llama"), hf)
  w = str(tmp_path / "w")
  os.makedirs(w)
  c = _config("smoke")
  c.teacher.source, c.teacher.hf_path = "hf", str(hf)
  fp = let_run.check_teacher(c, w)
  assert sorted(fp["files"]) == ["config.json", "model.safetensors"]
  let_run.record_teacher(w, fp)
  assert let_run.check_teacher(c, w) is None  # the same teacher: resume
  weights = hf / "model.safetensors"
  raw = bytearray(weights.read_bytes())
  raw[-100:] = bytes(255 - b for b in raw[-100:])  # fine-tuned weights: same size, same header
  weights.write_bytes(bytes(raw))
  with pytest.raises(ConfigError) as e:
    let_run.check_teacher(c, w)
  msg = str(e.value)
  assert msg.startswith(f"teacher.hf_path='{hf}' holds other teacher weights than when this run started in {w} "
                        "(model.safetensors: other contents (same size), modified "), msg
  assert "start a new --workdir" in msg
  cfg = json.loads((hf / "config.json").read_text())
  (hf / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-5}))
  with pytest.raises(ConfigError, match=r"config.json: \d+ bytes → \d+.*model.safetensors: other contents"):
    let_run.check_teacher(c, w)

  teacher = str(tmp_path / "teacher_run")  # teacher.source='run': the newest checkpoint of another lmx run
  with ckpt_lib.Checkpointer(os.path.join(teacher, "checkpoints"), keep=5) as ck:
    ck.save(10, {"params": {"w": jnp.ones(3)}})
  c.teacher.source, c.teacher.workdir = "run", teacher
  w2 = str(tmp_path / "w2")
  os.makedirs(w2)
  let_run.record_teacher(w2, let_run.check_teacher(c, w2))
  assert let_run.check_teacher(c, w2) is None
  with ckpt_lib.Checkpointer(os.path.join(teacher, "checkpoints"), keep=5) as ck:
    ck.save(20, {"params": {"w": jnp.ones(3) * 2}})  # the teacher run went on training
  with pytest.raises(ConfigError, match=rf"teacher.workdir='{teacher}' .*its newest checkpoint is step 20, not step "
                     "10"):
    let_run.check_teacher(c, w2)


def test_sigterm_inside_the_ce_phase_resumes_to_the_same_results(tmp_path, reference):
  # checkpoint saves: teacher 8 (1); baseline 5, 8, 16 (2-4); let 5 (5), 8 (6): the stop is inside let/ce
  res = resume_check.check_sigterm_resume(tmp_path, CONFIG, *SHORT, reference=reference, save=6)
  assert res["final_eval"] == resume_check.results(reference)["final_eval"]
  log = open(os.path.join(tmp_path, "interrupted", "metrics.jsonl")).read()
  assert '"resumed_from_step": 8' in log


def test_nan_in_the_teacher_stops_with_one_line(tmp_path):
  line = resume_check.check_nan_stops(tmp_path, CONFIG, "teacher", 3, *SHORT)
  assert "no checkpoint had been written yet" in line, line


MARKERS = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}  # the Pallas kernels' custom calls


@pytest.mark.slow
@pytest.mark.parametrize("target", ["cuda", "tpu"])
def test_pile_1b4_student_step_lowers_for_accelerator(target):
  c = _config("pile_1b4")
  c.teacher.source = "pretrain"  # the SmolLM-135M architecture from teacher.model; no weights are needed
  if target == "cuda":  # 'auto' picks cuDNN there, which cannot be traced on a CPU host; lower the Triton kernel
    c.model.attention_impl = c.teacher.model.attention_impl = "pallas"
  student, teacher = let_run.validate(c)
  mesh = mesh_lib.make_mesh(c.mesh)
  let_step, ce_step, init_fn, shardings = let_run.make_steps(c, student, teacher, mesh)
  lp = loop.Loop(step_fn=let_step, init_fn=init_fn, mesh=mesh, workdir=str(ROOT), total_steps=c.train.steps,
                 seed=c.seed, state_shardings=shardings, ckpt_every=0)
  with jax.set_mesh(mesh):
    frozen = {"teacher": ckpt_lib.abstract_like(teacher.abstract_params(), teacher.shardings(mesh, c.axis_rules))}
  frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
  bsh = mesh_lib.batch_sharding(mesh, c.axis_rules)
  tokens = jax.ShapeDtypeStruct((c.data.global_batch, c.data.seq_len + 1), jnp.int32, sharding=bsh)
  rep = mesh_lib.replicated(mesh)
  texts = {}
  for name, step in (("let", let_step), ("ce", ce_step)):
    jitted = jax.jit(loop.guarded(step, seed=0), in_shardings=(lp.state_shardings, frozen_sh, bsh),
                     out_shardings=(lp.state_shardings, rep), donate_argnums=(0,))
    with jax.set_mesh(mesh), attention_lib.target_platform(target):
      texts[name] = jitted.trace(lp.abstract_state(), frozen, tokens).lower(lowering_platforms=(target,)).as_text()
  marker = MARKERS[target]
  # Both hold the student's attention kernels; only LET's also holds the teacher's forward kernel (its own head
  # count and sequence of shapes; identical layers share one outlined function, so counts are per shape, not layer).
  n_let, n_ce = texts["let"].count(marker), texts["ce"].count(marker)
  assert n_ce >= 1 and n_let > n_ce, (n_let, n_ce)


# ------------------------------------------------------------------------------------------ the comparison driver


def test_steps_to_reach_and_speedup_by_hand():
  from lmx.methods.let import compare

  steps, ce = [10, 20, 30, 40], [3.0, 2.5, 2.0, 1.9]
  assert compare.steps_to_reach(steps, ce, 2.25) == pytest.approx(25.0)  # halfway between 2.5 and 2.0
  assert compare.steps_to_reach(steps, ce, 3.5) == 10.0
  assert compare.steps_to_reach(steps, ce, 1.0) is None
  per_seed = {0: {"baseline": (np.array([10, 20, 30, 40]), np.array([3.0, 2.6, 2.3, 2.25])),
                  "let": (np.array(steps), np.array(ce))}}
  t = compare.summarize(per_seed, ("baseline", "let"), 40)
  assert t["per_seed"]["0"]["let"]["steps_to_baseline_final"] == pytest.approx(25.0)
  assert t["per_seed"]["0"]["let"]["speedup"] == pytest.approx(40 / 25)
  assert t["mean"]["let"]["final_eval_ce"]["mean"] == pytest.approx(1.9)
  assert t["mean"]["let"]["final_eval_ce"]["n"] == 1 and t["mean"]["let"]["final_eval_ce"]["std"] is None
  assert t["per_seed"]["0"]["let"]["delta_final_eval_ce"] == pytest.approx(1.9 - 2.25)


def test_mean_curves_over_seeds_by_hand():
  from lmx.methods.let import compare

  per_seed = {0: {"a": (np.array([10, 20, 30]), np.array([3.0, 2.0, 1.0]))},
              1: {"a": (np.array([10, 20]), np.array([5.0, 4.0]))}}  # seed 1 stopped early: shared steps only
  m = compare.mean_curves(per_seed, ("a",))["a"]
  assert m["steps"] == [10, 20]
  np.testing.assert_allclose(m["mean"], [4.0, 3.0])
  np.testing.assert_allclose(m["std"], [2 ** 0.5, 2 ** 0.5])  # sample std (ddof 1) of {3, 5} and {2, 4}
  assert m["n"] == 2
  per_seed[0]["baseline"] = (np.array([10, 20, 30]), np.array([3.5, 2.0, 1.5]))
  per_seed[1]["baseline"] = (np.array([10, 20]), np.array([4.0, 4.5]))
  d = compare.delta_curves(per_seed, ("baseline", "a"))
  assert list(d) == ["a"] and d["a"]["steps"] == [10, 20]
  np.testing.assert_allclose(d["a"]["mean"], [(-0.5 + 1.0) / 2, (0.0 - 0.5) / 2])
  np.testing.assert_allclose(d["a"]["std"], [np.std([-0.5, 1.0], ddof=1), np.std([0.0, -0.5], ddof=1)])


def test_arms_differ_only_where_they_should():
  from lmx.core import workdir as wd
  from lmx.methods.let import compare

  c = _config("")
  base = wd.flatten(compare.arm_config(c, "baseline", 3).to_dict())
  expect = {"let": {"let.lam0"}, "l2l": {"let.lam0", "let.student_layer"},
            "constant": {"let.lam0", "let.schedule"}, "large": {"let.lam0"}}
  for arm, fields in expect.items():
    other = wd.flatten(compare.arm_config(c, arm, 3).to_dict())
    assert {k for k in base if base[k] != other[k]} == fields, arm
  assert base["seed"] == base["data.shuffle_seed"] == 3 and base["teacher.source"] == c.teacher.source
