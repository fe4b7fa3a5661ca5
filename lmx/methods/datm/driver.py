"""The DATM driver: data → experts → synthetic init → distillation (checkpointed) → evaluation → outputs.

The run's stages: ``experts`` (trained once into ``experts/``, or read from ``config.experts.dir``), the
distillation (the one loop; checkpoints in ``checkpoints/``, a rerun resumes exactly), then one stage per
evaluation arm (``eval/it<iterations>-<fingerprint of config.eval>/<arm>``, :func:`eval_stage`: K fresh networks
trained on a set and tested; a finished arm is read back on a rerun, :mod:`lmx.core.stages`). ``run(config,
workdir)`` writes into ``workdir``:
  experts/            the expert buffer (unless ``config.experts.dir`` points at one to reuse)
  checkpoints/        Orbax checkpoints of the distillation state
  stages/eval/...     each finished evaluation arm's accuracies
  synthetic.npz       the distilled images, label logits, learned step size and class labels (``load_synthetic``)
  best_synthetic.npz  with distill.eval_every > 0: the set that scored best in the periodic evaluation, and its score
  results.json        distilled / random-subset / full-data accuracy (mean ± sample std over K nets), timings, memory
  metrics.jsonl, tb/  every logged scalar and the plots below (TensorBoard)
  plots/              distilled_images.png (one row per class, stretched for display), distilled_images_pixels.png
                      (the same in pixel space: ZCA undone), initial_images*.png, distill_loss/lr/window.png

With ``config.synthetic`` set (the 'evaluate' variant) it evaluates that saved set instead (:func:`run_evaluate`).
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from lmx.core import loop, mesh as mesh_lib, metrics, plots, stages
from lmx.core.config import ConfigError
from lmx.core.results import jsonable, plot_path, summary_line, write_results
from lmx.core.rng import np_stream
from lmx.datasets import images
from lmx.methods.datm import distill as D
from lmx.methods.datm import dsa, evaluate, experts
from lmx.methods.datm.checks import validate
from lmx.models import convnet
from lmx.models.registry import build_model

STEPS_FIELD = "distill.iterations"


def specs(config) -> tuple[D.InnerSpec, D.OuterSpec]:
  """Static inner/outer specs of the meta-step from the config."""
  d = config.distill
  inner = D.InnerSpec(syn_steps=d.syn_steps, batch_syn=d.batch_syn, soft_labels=d.soft_labels,
                      learn_labels=d.learn_labels, learn_lr=d.learn_lr,
                      dsa_strategy=dsa.parse_strategy(config.data.dsa_strategy), unroll=d.unroll, remat=d.remat,
                      lr_param=d.lr_param, hoist_dsa=bool(d.hoist_dsa))
  outer = D.OuterSpec(lr_img=d.lr_img, lr_lr=d.lr_lr, lr_y=d.lr_y, momentum_img=d.momentum_img,
                      momentum_lr=d.momentum_lr, momentum_y=d.momentum_y, threshold=float(d.threshold),
                      lr_min=d.lr_min, lr_max=d.lr_max, lr_init=d.lr_init, spike_factor=float(d.spike_factor))
  return inner, outer


def load_data(config) -> images.ImageData:
  """The dataset, with the IPC checked against the images actually available per class."""
  data = images.get_dataset(config.data.dataset, zca=config.data.zca, zca_eps=config.data.zca_eps,
                            data_dir=config.data.data_dir or None)
  counts = data.per_class_counts()
  if config.distill.ipc > counts.min():
    raise ConfigError(f"distill.ipc: {config.distill.ipc} images per class requested but class "
                      f"{int(counts.argmin())} of {data.name} has only {int(counts.min())} training images")
  if config.distill.batch_syn > config.distill.ipc * data.num_classes:
    raise ConfigError(f"distill.batch_syn={config.distill.batch_syn} exceeds the synthetic set size "
                      f"{config.distill.ipc * data.num_classes} (ipc × classes)")
  return data


def get_experts(config, data, workdir: str, writer) -> experts.ExpertBuffer:
  """Loads ``experts.dir`` (checked against the config), or a buffer already in the workdir, or trains one.

  A corrupt ``experts.dir`` buffer stops the run with a DataError and is left untouched; a corrupt buffer in the
  workdir is the run's own: it is moved to ``<workdir>/experts_corrupt/<unix-time>`` (kept) with one warning line,
  and new experts are trained in its place.
  """
  expect = experts.expected_meta(config, data.image_shape, data.num_classes)
  need = config.distill.max_start_epoch - 1 + config.distill.expert_epochs
  model = build_model(config.model, image_shape=data.image_shape, num_classes=data.num_classes)
  like = jax.eval_shape(model.init, jax.random.key(0))  # the parameter shapes every buffer leaf must end with
  if config.experts.dir:
    return experts.load_buffer(config.experts.dir, expect, min_epochs=need, source="experts.dir", like=like)
  own = os.path.join(workdir, "experts")
  if experts.buffer_exists(own):
    try:
      return experts.load_buffer(own, expect, min_epochs=need, source="workdir", like=like)
    except experts.CorruptBufferError as e:
      dst = experts.move_aside(own, os.path.join(workdir, "experts_corrupt"))
      print(f"WARNING: expert buffer {own} could not be read ({e.reason}); moved it to {dst} and training new "
            "experts", flush=True)
  buf = experts.train_experts(config.seed, data, config, writer=writer)
  experts.save_buffer(own, buf)
  acc = np.asarray(buf.meta["final_test_acc"])
  writer.scalars(0, {"test_acc": acc.mean(), "wall_s": buf.meta["train_seconds"]}, prefix="experts/")
  print(f"datm: {buf.num_experts} experts trained for {buf.num_epochs} epochs in {buf.meta['train_seconds']:.0f} s; "
        f"test accuracy {100 * acc.mean():.1f} % (mean over experts)", flush=True)
  return buf


def _enough_correct(preds_EN: np.ndarray, y_N: np.ndarray, num_classes: int, ipc: int) -> bool:
  """Whether every class has ``ipc`` distinct images that some expert of ``preds_EN`` classifies correctly: then
  :func:`D.select_correct` never looks past these experts, and further experts cannot change its choice."""
  hit_N = (preds_EN == y_N[None]).any(0)
  return bool((np.bincount(y_N[hit_N], minlength=num_classes) >= ipc).all())


def init_synthetic(config, data, buf: experts.ExpertBuffer) -> tuple[D.Syn, np.ndarray]:
  """Initial images, labels and step size (DATM: correctly classified real images + expert soft labels).

  The experts' forward passes run in fixed blocks of ``experts.fwd_chunk_experts`` networks ×
  ``experts.fwd_chunk_images`` images (:func:`experts.forward_chunked`); the selection evaluates one chunk of
  experts after the other and stops once the experts so far classify enough images of every class correctly
  (the same choice as with all experts, usually after the first chunk).
  """
  d, ec = config.distill, config.experts
  rng = np_stream(config.seed, "init_synthetic")
  c = data.num_classes
  final = buf.final()
  model = build_model(config.model, image_shape=data.image_shape, num_classes=c)
  chunks = dict(expert_chunk=ec.fwd_chunk_experts, image_chunk=ec.fwd_chunk_images)
  if d.init == "correct":
    x_all, y_all = data.x_train_NHWC, data.y_train_N
    preds = []
    for e0 in range(0, buf.num_experts, ec.fwd_chunk_experts):
      part = jax.tree.map(lambda a: a[e0:e0 + ec.fwd_chunk_experts], final)
      preds.append(experts.forward_chunked(model.apply, part, x_all, argmax=True, **chunks))
      if _enough_correct(np.concatenate(preds), y_all, c, d.ipc):
        break
    idx = D.select_correct(np.concatenate(preds), y_all, c, d.ipc, rng)
  else:
    idx = evaluate.random_subset(np_stream(config.seed, "init_real_subset"), data.y_train_N, c, d.ipc)
  x = data.x_train_NHWC[idx]
  y_int = data.y_train_N[idx]
  if d.init == "noise":
    x = rng.standard_normal(x.shape).astype(np.float32)
  if d.soft_labels:
    if d.init == "correct":  # every expert's logits on the chosen images: (E, n, C) on the host
      logits_EnC = experts.forward_chunked(model.apply, final, data.x_train_NHWC[idx], **chunks)
      y = D.soft_label_init(logits_EnC, y_int)
    else:  # the first expert's logits (DATM's pix_init 'real')
      first = jax.tree.map(lambda a: a[:1], final)
      y = experts.forward_chunked(model.apply, first, data.x_train_NHWC[idx], **chunks)[0]
  else:
    y = np.eye(c, dtype=np.float32)[y_int]
  syn = {"x": x.astype(np.float32), "y": y.astype(np.float32),
         "lr": np.float32(D.lr_raw_from_value(d.lr_init, d.lr_param))}
  return syn, y_int


def _peak_rss_bytes() -> int:
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _device_peak_bytes() -> int | None:
  try:
    stats = jax.devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None
  except Exception:  # noqa: BLE001 - not available on every backend
    return None


def distill_loop(config, buf: experts.ExpertBuffer, syn: D.Syn, workdir: str, writer,
                 hooks=()) -> tuple[dict, dict]:
  """Runs (or resumes) the distillation on the shared loop; returns the final state and timing statistics.

  ``hooks``: the loop's hooks (e.g. the periodic evaluation, :class:`BestKeeper`); they read the state, never
  change it, so a resumed run stays exact."""
  d = config.distill
  inner, outer = specs(config)
  tx = D.make_optimizer(outer, inner)
  apply_meta = build_model(config.model, image_shape=buf.meta["image_shape"], num_classes=buf.meta["num_classes"],
                           second_order=True).apply
  mesh = mesh_lib.make_mesh({"data": -1}, devices=jax.devices()[:1])  # a few images: one device
  lp = loop.Loop(step_fn=D.make_step(inner, outer, apply_meta), init_fn=lambda key: D.init_loop_state(syn, tx),
                 data=D.ExpertWindows(buf, config), mesh=mesh, workdir=workdir, total_steps=d.iterations,
                 seed=config.seed, config=config, writer=writer, log_every=d.log_every, ckpt_every=d.ckpt_every,
                 ckpt_keep=2, nan_patience=d.max_nonfinite, finite_keys=("loss", "grad_norm"), desc="distill",
                 log_prefix="distill/", postfix=("loss", "lr"), hooks=hooks)
  t0 = time.time()
  res = lp.run()
  start = res.resumed_from or 0
  state = res.state
  ran = d.iterations > start
  spi = 1.0 / res.steps_per_sec if ran and np.isfinite(res.steps_per_sec) else None
  stats = {"iterations": d.iterations, "resumed_from": start,
           "skipped_updates": float(loop.host(state["counts"]["skipped"])),
           "spike_skips": float(loop.host(state["counts"]["spikes"])),
           "nonfinite_steps": int(loop.host(state["guard"]["bad"])),
           "seconds_per_iteration": spi, "compile_wall_s": res.compile_seconds,
           "distill_wall_s": time.time() - t0, "xla_temp_bytes": res.temp_bytes}
  return state, stats


# The distillation's per-step diagnostics that go to metrics.jsonl and TensorBoard only (the console line keeps the
# matching loss, the step size α, the share of skipped updates, the window and the step rate).
CONSOLE_EXCLUDE = r"^distill/(grad_norm(_[xy])?|grad_lr|nonfinite|spike|expert)$"

EVAL_ARMS = ("distilled", "best", "initial", "images_only", "labels_only", "random", "full")


def cross_archs(config) -> tuple[str, ...]:
  """``eval.cross_arch`` as a tuple of architecture names."""
  v = config.eval.cross_arch
  return tuple(a.strip() for a in v.split(",") if a.strip()) if isinstance(v, str) else tuple(v)


def evaluate_set(config, data, x_syn, targets, lr: float, writer, *, ipc: int, syn0=None, step: int = 0,
                 only_distilled: bool = False, workdir: str | None = None, stage: str = "eval") -> dict:
  """All evaluation arms of one synthetic set (images ``x_syn``, training targets ``targets``, step size ``lr``):
  ``distilled``; with ``syn0`` (its initial set) ``initial`` (``eval.init``) and the two cross-evaluations
  (``eval.cross``); ``random`` and ``full`` real-data references (``eval.random``/``eval.full``, ``ipc`` random
  images per class); and ``cross_arch`` (``eval.cross_arch``): the distilled set trained into other architectures
  at the same step size, keyed by architecture. ``only_distilled``: the first arm alone. With ``workdir`` every arm
  is the stage ``<stage>/<arm>`` of that run (a finished arm is read back, not trained again)."""
  v, d = config.eval, config.distill
  strategy = dsa.parse_strategy(config.data.dsa_strategy)
  c = data.num_classes
  common = dict(num_classes=c, num_nets=v.num, batch=v.batch, dsa_strategy=strategy, momentum=v.momentum,
                weight_decay=v.weight_decay, use_vmap=v.vmap, writer=writer)
  # Every arm trains its networks from the same seed's named streams (same inits, order and augmentation
  # streams): the arms are paired within a seed, and seeds share nothing.
  seed = config.seed
  out = {}
  t0 = time.time()

  def arm(key, x, y, arm_lr, what, *, model_cfg=None, epochs=None):
    def train_and_test():
      try:
        accs = evaluate.train_and_test(seed, x, y, data.x_test_NHWC, data.y_test_N, epochs=epochs or v.epochs,
                                       lr=arm_lr, desc=f"eval {what}", name=f"eval_{key}",
                                       model_cfg=model_cfg or config.model, **common)
      except ValueError as e:  # an architecture that cannot take these images (LeNet on 8×8 digits)
        raise ConfigError(f"eval.cross_arch: {what}: {e}") from None
      return evaluate.summarize(accs)

    if workdir is None:
      return train_and_test()
    return stages.run_stage(workdir, f"{stage}/{key}", train_and_test, quiet=True)

  out["distilled"] = arm("distilled", x_syn, targets, lr, "distilled")
  if only_distilled:
    return out
  if syn0 is not None:
    x0 = np.asarray(syn0["x"])
    targets0 = np.asarray(D.targets_of(jnp.asarray(syn0["y"]), d.soft_labels))
    if v.init:
      out["initial"] = arm("initial", x0, targets0, lr, "initial set")
    if v.cross:
      out["images_only"] = arm("images_only", x_syn, targets0, lr, "final images, initial labels")
      out["labels_only"] = arm("labels_only", x0, targets, lr, "initial images, final labels")
  onehot = np.eye(c, dtype=np.float32)
  if v.random:
    idx = evaluate.random_subset(np_stream(seed, "random_subset"), data.y_train_N, c, ipc)
    out["random"] = arm("random", data.x_train_NHWC[idx], onehot[data.y_train_N[idx]], v.lr_real, "random")
  if v.full:
    out["full"] = arm("full", data.x_train_NHWC, onehot[data.y_train_N], v.lr_real, "full", epochs=v.full_epochs)
  archs = cross_archs(config)
  if archs:
    out["cross_arch"] = {a: arm(f"arch_{a}", x_syn, targets, lr, f"distilled on {a}",
                                model_cfg=config.model if a == "convnet" else {"name": a}) for a in archs}
  out["eval_wall_s"] = time.time() - t0
  out["eval_lr_distilled"] = lr
  accs = {k: r for k, r in out.items() if isinstance(r, dict) and "mean" in r}
  accs.update({f"arch_{a}": r for a, r in out.get("cross_arch", {}).items()})
  writer.scalars(step, {f"{k}_acc": r["mean"] for k, r in accs.items()}, prefix="eval/")
  when = f"the set after {step} distillation iterations" if step else "the set"
  print(f"datm: test accuracy in % (mean ± std over {v.num} networks) of {when}: "
        + " | ".join(f"{k} {_pct(r)}" for k, r in accs.items()), flush=True)
  return out


def _pct(ms: dict) -> str:
  """``"94.1 ± 0.7"``: a mean ± std of accuracies in percent."""
  std = "" if ms.get("std") is None else f" ± {100 * ms['std']:.1f}"
  return f"{100 * ms['mean']:.1f}{std}"


def run_eval(config, data, state, writer, syn0=None, workdir: str | None = None, stage: str = "eval") -> dict:
  """Distilled, random-real and full-data accuracies (mean ± std over ``eval.num`` networks) of the distillation
  state's set; with ``eval.init`` also the initial synthetic set (same labels/step-size protocol, before any image
  update), with ``eval.cross`` the two cross-evaluations that separate what the image and the label updates add:
  ``images_only`` (final images, initial labels) and ``labels_only`` (initial images, final labels), all at the
  learned step size α, and with ``eval.cross_arch`` the distilled set on other architectures
  (:func:`evaluate_set`)."""
  d = config.distill
  x_syn = np.asarray(state["syn"]["x"])
  targets = np.asarray(D.targets_of(state["syn"]["y"], d.soft_labels))
  lr = float(D.lr_value(state["syn"]["lr"], d.lr_param))
  return evaluate_set(config, data, x_syn, targets, lr, writer, ipc=d.ipc, syn0=syn0, step=d.iterations,
                      workdir=workdir, stage=stage)


# ----------------------------------------------------------------------------------------------- synthetic files

SYNTHETIC_KEYS = ("x", "y", "lr", "labels")


def save_synthetic(path: str, x, y, lr: float, labels, *, soft_labels: bool, **extra) -> None:
  """A synthetic set as ``np.savez``: images ``x`` (NHWC, preprocessed), ``y`` (label logits, or one-hot targets
  when ``soft_labels`` is False), step size ``lr`` (its value), class ``labels`` and ``extra`` scalars. Written to
  a temp file and renamed, so a crash never leaves half a file."""
  tmp = path + ".partial"
  with open(tmp, "wb") as f:
    np.savez(f, x=np.asarray(x, np.float32), y=np.asarray(y, np.float32), lr=np.float32(lr),
             labels=np.asarray(labels, np.int64), soft_labels=bool(soft_labels), **extra)
  os.replace(tmp, path)


def load_synthetic(path: str, data, *, soft_labels_default: bool = True) -> dict:
  """Reads a synthetic.npz (as :func:`save_outputs` writes it) and checks it against ``data``.

  Returns ``{"x", "y", "lr", "labels", "soft_labels"}``. A missing, unreadable or malformed file raises a
  DataError naming the file and what is wrong (never a numpy/zipfile traceback). ``soft_labels`` comes from the
  file when it records it, else ``soft_labels_default`` (``distill.soft_labels``).
  """
  where = f"synthetic={path!r}"
  if not os.path.isfile(path):
    raise images.DataError(f"{where}: no such file; name a synthetic.npz that a DATM run wrote")
  with open(path, "rb") as f:
    head = f.read(4)
  if head[:2] != b"PK":  # every .npz is a zip archive
    raise images.DataError(f"{where} is not an .npz archive (no zip signature at its start; "
                           f"{'an empty file' if not head else 'another kind of file'}); name a synthetic.npz "
                           "that a DATM run wrote")
  try:
    with np.load(path, allow_pickle=False) as z:
      if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError("a single .npy array, not an .npz archive")
      missing = [k for k in SYNTHETIC_KEYS if k not in z.files]
      if missing:
        raise images.DataError(f"{where}: lacks {missing} (has {sorted(z.files)}); a DATM synthetic.npz holds "
                               f"{list(SYNTHETIC_KEYS)}")
      out = {k: np.asarray(z[k]) for k in z.files if k in SYNTHETIC_KEYS + ("soft_labels",)}
  except images.DataError:
    raise
  except Exception as e:  # noqa: BLE001 - BadZipFile, EOFError, ValueError, OSError, ...
    lines = str(e).strip().splitlines()
    raise images.DataError(f"{where} cannot be read as an .npz archive ({type(e).__name__}: "
                           f"{lines[0][:160] if lines else ''})") from None
  x, y, lr, labels = out["x"], out["y"], out["lr"], out["labels"]
  c, shape = data.num_classes, tuple(data.image_shape)

  def bad(what: str):
    return images.DataError(f"{where}: {what}")

  if x.ndim != 4 or tuple(x.shape[1:]) != shape or x.shape[0] == 0:
    raise bad(f"x has shape {x.shape} but data.dataset={data.name!r} has images of shape {shape} (N, H, W, C); "
              "set --config.data.dataset (and data.zca) to the data the set was distilled from")
  n = x.shape[0]
  if y.shape != (n, c):
    raise bad(f"y has shape {y.shape}, expected ({n}, {c}) label logits for the {n} images and {c} classes of "
              f"{data.name}")
  if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= c:
    raise bad(f"labels must be {n} class indices in [0, {c}), got shape {labels.shape} dtype {labels.dtype}")
  if lr.shape != () or not np.isfinite(lr) or float(lr) <= 0:
    raise bad(f"lr must be one positive step size, got {lr!r}")
  if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
    raise bad("x or y holds NaN/Inf values")
  soft = bool(out["soft_labels"]) if "soft_labels" in out else bool(soft_labels_default)
  return {"x": x.astype(np.float32), "y": y.astype(np.float32), "lr": float(lr), "labels": labels.astype(np.int64),
          "soft_labels": soft}


# ----------------------------------------------------------------------------------------------- periodic eval


class BestKeeper:
  """A loop hook (``every(distill.eval_every, keeper)``): evaluates the current set with ``distill.eval_nets``
  networks × ``distill.eval_epochs`` epochs and keeps the best one in ``<workdir>/best_synthetic.npz`` (with its
  accuracy ``acc``/``acc_std``, ``step``, ``eval_nets``, ``eval_epochs``).

  Resume: the file is the record of the best so far (read back at start, unless it was measured with other
  ``eval_nets``/``eval_epochs``); evaluations are pure functions of the seed and the (exactly resumed) state, so
  steps replayed after a crash reproduce their accuracies and a strict ``>`` keeps the file as it was.
  """

  FILE = "best_synthetic.npz"

  def __init__(self, config, data, y_int, workdir: str):
    self.config, self.data, self.y_int = config, data, np.asarray(y_int)
    self.path = os.path.join(workdir, self.FILE)
    d = config.distill
    self.best = {"acc": -1.0, "acc_std": 0.0, "step": -1}
    if os.path.exists(self.path):
      try:
        with np.load(self.path, allow_pickle=False) as z:
          rec = {k: float(z[k]) for k in ("acc", "acc_std", "step", "eval_nets", "eval_epochs")}
      except Exception as e:  # noqa: BLE001 - a half-written or foreign file: start the record again
        print(f"WARNING: {self.path} cannot be read ({type(e).__name__}); the best set is measured again",
              flush=True)
        rec = None
      if rec and (rec["eval_nets"], rec["eval_epochs"]) == (d.eval_nets, d.eval_epochs):
        self.best = {"acc": rec["acc"], "acc_std": rec["acc_std"], "step": int(rec["step"])}
      elif rec:
        print(f"note: {self.path} was measured with eval_nets={int(rec['eval_nets'])}, eval_epochs="
              f"{int(rec['eval_epochs'])}; measuring the best set again", flush=True)

  def __call__(self, step: int, state, writer) -> dict:
    del writer  # the evaluation networks' own losses are not logged (their steps are not distillation steps)
    c, d = self.config, self.config.distill
    x = np.asarray(state["syn"]["x"])
    y = np.asarray(state["syn"]["y"])
    lr = float(D.lr_value(state["syn"]["lr"], d.lr_param))
    v = c.eval
    accs = evaluate.train_and_test(
        c.seed, x, np.asarray(D.targets_of(jnp.asarray(y), d.soft_labels)), self.data.x_test_NHWC,
        self.data.y_test_N, num_classes=self.data.num_classes, model_cfg=c.model, num_nets=d.eval_nets,
        epochs=d.eval_epochs, lr=lr, batch=v.batch, dsa_strategy=dsa.parse_strategy(c.data.dsa_strategy),
        momentum=v.momentum, weight_decay=v.weight_decay, use_vmap=v.vmap, name="periodic_eval",
        desc=f"eval @ {step}")
    r = evaluate.summarize(accs)
    std = float("nan") if r["std"] is None else r["std"]  # one network: no spread
    if r["mean"] > self.best["acc"]:
      self.best = {"acc": r["mean"], "acc_std": std, "step": int(step)}
      save_synthetic(self.path, x, y, lr, self.y_int, soft_labels=d.soft_labels, acc=r["mean"], acc_std=std,
                     step=int(step), eval_nets=d.eval_nets, eval_epochs=d.eval_epochs)
    return {"acc": r["mean"], "acc_std": std, "best_acc": self.best["acc"], "best_step": self.best["step"]}


# ----------------------------------------------------------------------------------------------- outputs


def _image_plots(workdir: str, data, x, y_int, *, ipc: int, name: str, title: str, writer, step: int = 0) -> None:
  """``plots/<name>.png`` (one labelled row per class, each image stretched for display) and
  ``plots/<name>_pixels.png`` (the same grid in pixel space: ZCA / normalisation undone, clipped to [0, 1]), both
  also in TensorBoard."""
  show = min(ipc, 10)
  order = np.concatenate([np.flatnonzero(y_int == c)[:show] for c in range(data.num_classes)])
  # one row per class (IPC 1: one row of all classes)
  nrow = data.num_classes if show > 1 else 1
  labels = [str(c) for c in range(data.num_classes)] if show > 1 else None
  pixels = data.to_pixels(np.asarray(x)[order])
  writer.image(f"plots/{name}", plots.image_grid(plot_path(workdir, name), pixels, nrow=nrow, title=title,
                                                 row_labels=labels), step)
  writer.image(f"plots/{name}_pixels", plots.pixel_grid(plot_path(workdir, f"{name}_pixels"), pixels, nrow=nrow),
               step)


def save_outputs(config, data, state, syn0, y_int, results: dict, workdir: str, writer) -> str:
  """synthetic.npz, results.json and the PNGs (also in TensorBoard); returns the results path."""
  d = config.distill
  x = np.asarray(state["syn"]["x"])
  save_synthetic(os.path.join(workdir, "synthetic.npz"), x, np.asarray(state["syn"]["y"]),
                 float(D.lr_value(state["syn"]["lr"], d.lr_param)), y_int, soft_labels=d.soft_labels)
  path = write_results(workdir, results)
  it = d.iterations
  _image_plots(workdir, data, x, y_int, ipc=d.ipc, name="distilled_images", title=f"distilled, IPC {d.ipc}",
               writer=writer, step=it)
  _image_plots(workdir, data, np.asarray(syn0["x"]), y_int, ipc=d.ipc, name="initial_images",
               title=f"initial, IPC {d.ipc}", writer=writer)
  jsonl = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(jsonl):
    curves = [("distill_loss", ["distill/loss"], "matching loss"),
              ("distill_lr", ["distill/lr"], "learned step size α"),
              ("distill_window", ["distill/start_epoch", "distill/window_upper"],
               "start epoch (mean over the log window) and window T⁺")]
    if d.eval_every:
      curves.append(("periodic_eval", ["periodic_eval/acc", "periodic_eval/best_acc"],
                     f"accuracy during distillation ({d.eval_nets} nets × {d.eval_epochs} epochs)"))
    for name, keys, title in curves:
      writer.image(f"plots/{name}", plots.from_jsonl(jsonl, keys, plot_path(workdir, name), title=title), it)
  return path


def _arm_parts(results: dict) -> dict:
  """``{arm: "94.1 ± 0.7"}``: each evaluation arm's test accuracy in percent."""
  parts = {k: _pct(results[k]) for k in EVAL_ARMS if k in results}
  parts.update({f"on {a}": _pct(r) for a, r in results.get("cross_arch", {}).items()})
  return parts


def eval_stage(config) -> str:
  """The stage name of the evaluation arms: the distilled iterations and a fingerprint of ``config.eval`` (a
  resume that asks for more iterations or changes how the evaluation runs measures the arms again)."""
  key = json.dumps(jsonable(config.eval), sort_keys=True).encode()
  return f"eval/it{config.distill.iterations}-{hashlib.sha256(key).hexdigest()[:8]}"


def run_evaluate(config, workdir: str) -> dict:
  """Evaluates ``config.synthetic`` (a saved synthetic.npz) on its own: no experts, no distillation. Writes
  results.json (the ``distilled`` arm, ``random``/``full`` when on, ``cross_arch``) and plots/synthetic_images*.png."""
  t_start = time.time()
  data = images.get_dataset(config.data.dataset, zca=config.data.zca, zca_eps=config.data.zca_eps,
                            data_dir=config.data.data_dir or None)
  syn = load_synthetic(config.synthetic, data, soft_labels_default=config.distill.soft_labels)
  counts = np.bincount(syn["labels"], minlength=data.num_classes)
  ipc = int(counts.max())
  if config.eval.random and ipc > data.per_class_counts().min():
    raise ConfigError(f"eval.random: the set has {ipc} images per class, more than {data.name} holds in its "
                      "smallest class; set --config.eval.random=False")
  writer = metrics.Writer(workdir, total_steps=1)
  try:
    targets = np.asarray(D.targets_of(jnp.asarray(syn["y"]), syn["soft_labels"]))
    evals = evaluate_set(config, data, syn["x"], targets, syn["lr"], writer, ipc=ipc, workdir=workdir,
                         stage=eval_stage(config))
    results = {
        "method": "datm_evaluate", "variant": config.variant, "synthetic": os.path.abspath(config.synthetic),
        "seed": config.seed, "dataset": data.name, "ipc": ipc, "images_per_class": counts.tolist(),
        "num_images": int(len(syn["x"])), "soft_labels": syn["soft_labels"], "image_shape": list(data.image_shape),
        "model": dict(config.model), **{k: evals[k] for k in EVAL_ARMS if k in evals},
        **({"cross_arch": evals["cross_arch"]} if "cross_arch" in evals else {}),
        "eval_lr": syn["lr"], "eval_wall_s": evals["eval_wall_s"], "eval_nets": config.eval.num,
        "eval_epochs": config.eval.epochs, "device": str(jax.devices()[0].device_kind),
        "wall_s": time.time() - t_start, "config": config,
    }
    path = write_results(workdir, results)
    _image_plots(workdir, data, syn["x"], syn["labels"], ipc=ipc, name="synthetic_images",
                 title=f"{os.path.basename(config.synthetic)}, IPC {ipc}", writer=writer)
    summary_line(f"DATM evaluate {data.name} IPC {ipc}, test accuracy %",
                 {**_arm_parts(results), "wall s": round(results["wall_s"])}, path)
    return json.loads(json.dumps(jsonable(results)))
  finally:
    writer.close()


def run(config, workdir: str) -> dict:
  """Runs the whole DATM pipeline; returns the results dict (also written to ``workdir/results.json``)."""
  t_start = time.time()
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  if config.synthetic:  # evaluate a saved set on its own
    return run_evaluate(config, workdir)
  data = load_data(config)
  t0 = time.time()
  # A buffer named by experts.dir is read and checked before the first output is written: a mismatched or
  # unreadable one stops the run with the workdir as it was (the launcher then removes one it made).
  buf = get_experts(config, data, workdir, writer=None) if config.experts.dir else None
  writer = metrics.Writer(workdir, total_steps=config.distill.iterations, console_exclude=CONSOLE_EXCLUDE)
  try:
    buf = buf or get_experts(config, data, workdir, writer)
    experts_s = time.time() - t0
    syn0, y_int = init_synthetic(config, data, buf)
    d = config.distill
    keeper = BestKeeper(config, data, y_int, workdir) if d.eval_every else None
    hooks = [loop.every(d.eval_every, keeper, name="periodic_eval")] if keeper else []
    state, stats = distill_loop(config, buf, syn0, workdir, writer, hooks=hooks)
    stage = eval_stage(config)
    evals = run_eval(config, data, state, writer, syn0, workdir=workdir, stage=stage)
    best = None
    if keeper is not None and keeper.best["step"] >= 0:
      best = {"step": keeper.best["step"], "acc": keeper.best["acc"], "acc_std": keeper.best["acc_std"],
              "eval_nets": d.eval_nets, "eval_epochs": d.eval_epochs, "file": BestKeeper.FILE}
      if keeper.best["step"] == d.iterations:  # the final set is the best one: its arm is the distilled arm
        evals["best"] = evals["distilled"]
      else:  # the full evaluation protocol on the best set
        z = load_synthetic(keeper.path, data, soft_labels_default=d.soft_labels)
        evals["best"] = evaluate_set(config, data, z["x"], np.asarray(D.targets_of(jnp.asarray(z["y"]),
                                                                                 d.soft_labels)),
                                     z["lr"], writer, ipc=d.ipc, step=keeper.best["step"], only_distilled=True,
                                     workdir=workdir, stage=f"{stage}/best")["distilled"]
    results = {
        "method": "mtt" if not config.distill.soft_labels else "datm", "variant": config.variant,
        "seed": config.seed, "dataset": data.name, "ipc": config.distill.ipc, "image_shape": list(data.image_shape),
        "model": dict(config.model), "conv_impl": {"training": convnet.resolve_conv_impl(config.model.conv_impl),
                      "meta_step": convnet.resolve_conv_impl(config.model.conv_impl, second_order=True)},
        **{k: evals[k] for k in EVAL_ARMS if k in evals},
        **({"cross_arch": evals["cross_arch"]} if "cross_arch" in evals else {}),
        **({"best_during_distill": best} if best else {}),
        "learned_lr": evals["eval_lr_distilled"], **stats,
        "experts": {"num": buf.num_experts, "epochs": buf.num_epochs,
                    "final_test_acc_mean": float(np.mean(buf.meta.get("final_test_acc", [float("nan")])))},
        "experts_wall_s": experts_s, "eval_wall_s": evals["eval_wall_s"], "eval_nets": config.eval.num,
        "eval_epochs": config.eval.epochs, "full_epochs": config.eval.full_epochs,
        "peak_rss_bytes": _peak_rss_bytes(), "device_peak_bytes": _device_peak_bytes(),
        "device": str(jax.devices()[0].device_kind), "wall_s": time.time() - t_start,
        "config": config,
    }
    path = save_outputs(config, data, state, syn0, y_int, results, workdir, writer)
    spi = results["seconds_per_iteration"]
    summary_line(f"DATM {data.name} IPC {config.distill.ipc}, test accuracy %",
                 {**_arm_parts(results), "s per iteration": round(spi, 3) if spi else "n/a",
                  "compile s": round(results["compile_wall_s"]), "wall s": round(results["wall_s"])}, path)
    return json.loads(json.dumps(jsonable(results)))
  finally:
    writer.close()


__all__ = ["run", "validate", "specs", "run_evaluate", "load_synthetic", "BestKeeper", "STEPS_FIELD"]
