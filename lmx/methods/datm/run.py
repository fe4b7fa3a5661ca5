"""The DATM driver: data → experts → synthetic init → distillation (checkpointed) → evaluation → outputs.

``run(config, workdir)`` writes into ``workdir``:
  experts/            the expert buffer (unless ``config.experts.dir`` points at one to reuse)
  checkpoints/        Orbax checkpoints of the distillation state (a rerun resumes exactly)
  synthetic.npz       the distilled images, label logits and learned step size
  results.json        distilled / random-subset / full-data accuracy (mean, std over K nets), timings, memory
  metrics.jsonl, tb/  every logged scalar (TensorBoard)
  plots/              distilled_images.png (one row per class), distill_curves.png, eval_accuracy.png
"""
from __future__ import annotations

import json
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from lmx.core import loop, mesh as mesh_lib, metrics, plots
from lmx.core.config import ConfigError
from lmx.core.results import jsonable, plot_path, summary_line, write_results
from lmx.core.rng import np_stream
from lmx.datasets import images
from lmx.methods.datm import distill as D
from lmx.methods.datm import dsa, evaluate, experts
from lmx.methods.datm.validate import validate
from lmx.models import convnet
from lmx.models.registry import build_model


def specs(config) -> tuple[D.InnerSpec, D.OuterSpec]:
  """Static inner/outer specs of the meta-step from the config."""
  d = config.distill
  inner = D.InnerSpec(syn_steps=d.syn_steps, batch_syn=d.batch_syn, soft_labels=d.soft_labels,
                      learn_labels=d.learn_labels, learn_lr=d.learn_lr,
                      dsa_strategy=dsa.parse_strategy(config.data.dsa_strategy), unroll=d.unroll, remat=d.remat,
                      lr_param=d.lr_param)
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
  writer.summary(0, {"experts_test_acc": acc.mean(), "experts_seconds": buf.meta["train_seconds"]},
                 prefix="")
  return buf


def init_synthetic(config, data, buf: experts.ExpertBuffer) -> tuple[D.Syn, np.ndarray]:
  """Initial images, labels and step size (DATM: correctly classified real images + expert soft labels)."""
  d = config.distill
  rng = np_stream(config.seed, "init_synthetic")
  c = data.num_classes
  final = jax.tree.map(jnp.asarray, buf.final())
  model = build_model(config.model, image_shape=data.image_shape, num_classes=c)
  logits_fn = jax.jit(jax.vmap(model.apply, in_axes=(0, None)))
  if d.init == "correct":
    x_all = data.x_train_NHWC
    preds = np.concatenate([np.asarray(logits_fn(final, x_all[s:s + 1000]).argmax(-1))
                            for s in range(0, len(x_all), 1000)], axis=1)
    idx = D.select_correct(preds, data.y_train_N, c, d.ipc, rng)
  else:
    idx = evaluate.random_subset(np_stream(config.seed, "init_real_subset"), data.y_train_N, c, d.ipc)
  x = data.x_train_NHWC[idx]
  y_int = data.y_train_N[idx]
  if d.init == "noise":
    x = rng.standard_normal(x.shape).astype(np.float32)
  if d.soft_labels:
    logits_EnC = np.asarray(logits_fn(final, x if d.init != "noise" else data.x_train_NHWC[idx]))
    y = D.soft_label_init(logits_EnC, y_int) if d.init == "correct" else logits_EnC[0]
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


def distill_loop(config, buf: experts.ExpertBuffer, syn: D.Syn, workdir: str, writer) -> tuple[dict, dict]:
  """Runs (or resumes) the distillation on the shared loop; returns the final state and timing statistics."""
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
                 log_prefix="distill/", postfix=("loss", "lr"))
  t0 = time.time()
  res = lp.run()
  start = res.resumed_from or 0
  ran = max(d.iterations - start, 0)
  state = res.state
  spi = 1.0 / res.steps_per_sec if ran and np.isfinite(res.steps_per_sec) else None
  stats = {"iterations": d.iterations, "iterations_this_run": ran, "resumed_from": start,
           "skipped_updates": float(loop.host(state["counts"]["skipped"])),
           "spike_skips": float(loop.host(state["counts"]["spikes"])),
           "nonfinite_steps": int(loop.host(state["guard"]["bad"])),
           "seconds_per_iteration": spi, "compile_seconds": res.compile_seconds,
           "distill_seconds": time.time() - t0, "xla_temp_bytes": res.temp_bytes}
  return state, stats


EVAL_ARMS = ("distilled", "initial", "images_only", "labels_only", "random", "full")


def run_eval(config, data, state, writer, syn0=None) -> dict:
  """Distilled, random-real and full-data accuracies (mean ± std over ``eval.num`` networks); with
  ``eval.init`` also the initial synthetic set (same labels/step-size protocol, before any image update), and with
  ``eval.cross`` the two cross-evaluations that separate what the image and the label updates add:
  ``images_only`` (final images, initial labels) and ``labels_only`` (initial images, final labels), all at the
  learned step size α."""
  v, d = config.eval, config.distill
  strategy = dsa.parse_strategy(config.data.dsa_strategy)
  c = data.num_classes
  common = dict(num_classes=c, model_cfg=config.model, num_nets=v.num, batch=v.batch, dsa_strategy=strategy,
                momentum=v.momentum, weight_decay=v.weight_decay, use_vmap=v.vmap, writer=writer)
  x_syn = np.asarray(state["syn"]["x"])
  targets = np.asarray(D.targets_of(state["syn"]["y"], d.soft_labels))
  lr = float(D.lr_value(state["syn"]["lr"], d.lr_param))
  # Every arm trains its networks from the same seed's named streams (same inits, order and augmentation
  # streams): the arms are paired within a seed, and seeds share nothing.
  seed = config.seed
  out = {}
  t0 = time.time()

  def arm(key, x, y, arm_lr, what):
    accs = evaluate.train_and_test(seed, x, y, data.x_test_NHWC, data.y_test_N, epochs=v.epochs, lr=arm_lr,
                                   desc=f"eval {what}", name=f"eval_{key}", **common)
    out[key] = evaluate.summarize(accs)

  arm("distilled", x_syn, targets, lr, "distilled")
  if syn0 is not None:
    x0 = np.asarray(syn0["x"])
    targets0 = np.asarray(D.targets_of(jnp.asarray(syn0["y"]), d.soft_labels))
    if v.init:
      arm("initial", x0, targets0, lr, "initial set")
    if v.cross:
      arm("images_only", x_syn, targets0, lr, "final images, initial labels")
      arm("labels_only", x0, targets, lr, "initial images, final labels")
  onehot = np.eye(c, dtype=np.float32)
  if v.random:
    idx = evaluate.random_subset(np_stream(seed, "random_subset"), data.y_train_N, c, d.ipc)
    accs = evaluate.train_and_test(seed, data.x_train_NHWC[idx], onehot[data.y_train_N[idx]],
                                   data.x_test_NHWC, data.y_test_N, epochs=v.epochs, lr=v.lr_real,
                                   desc="eval random", name="eval_random", **common)
    out["random"] = evaluate.summarize(accs)
  if v.full:
    accs = evaluate.train_and_test(seed, data.x_train_NHWC, onehot[data.y_train_N], data.x_test_NHWC,
                                   data.y_test_N, epochs=v.full_epochs, lr=v.lr_real, desc="eval full", name="eval_full", **common)
    out["full"] = evaluate.summarize(accs)
  out["eval_seconds"] = time.time() - t0
  out["eval_lr_distilled"] = lr
  writer.summary(d.iterations, {f"{k}_acc": r["mean"] for k, r in out.items() if isinstance(r, dict)},
                 prefix="eval/")
  return out


def save_outputs(config, data, state, syn0, y_int, results: dict, workdir: str) -> str:
  """synthetic.npz, results.json and the PNGs; returns the results path."""
  d = config.distill
  x = np.asarray(state["syn"]["x"])
  np.savez(os.path.join(workdir, "synthetic.npz"), x=x, y=np.asarray(state["syn"]["y"]),
           lr=float(D.lr_value(state["syn"]["lr"], d.lr_param)), labels=y_int)
  path = write_results(workdir, results)
  show = min(d.ipc, 10)
  order = np.concatenate([np.flatnonzero(y_int == c)[:show] for c in range(data.num_classes)])
  # one row per class (IPC 1: one row of all classes)
  nrow = data.num_classes if show > 1 else 1
  labels = [str(c) for c in range(data.num_classes)] if show > 1 else None
  plots.image_grid(plot_path(workdir, "distilled_images"), data.to_pixels(x[order]), nrow=nrow,
                   title=f"distilled, IPC {d.ipc}", row_labels=labels)
  plots.image_grid(plot_path(workdir, "initial_images"), data.to_pixels(np.asarray(syn0["x"])[order]),
                   nrow=nrow, title=f"initial, IPC {d.ipc}", row_labels=labels)
  jsonl = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(jsonl):
    plots.from_jsonl(jsonl, ["distill/loss"], plot_path(workdir, "distill_loss"), title="matching loss")
    plots.from_jsonl(jsonl, ["distill/lr"], plot_path(workdir, "distill_lr"), title="learned step size α")
    plots.from_jsonl(jsonl, ["distill/start_epoch", "distill/window_upper"], plot_path(workdir, "distill_window"),
                     title="start epoch (mean over the log window) and window T⁺")
  return path


def run(config, workdir: str) -> dict:
  """Runs the whole DATM pipeline; returns the results dict (also written to ``workdir/results.json``)."""
  t_start = time.time()
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  data = load_data(config)
  writer = metrics.Writer(workdir, total_steps=config.distill.iterations)
  try:
    t0 = time.time()
    buf = get_experts(config, data, workdir, writer)
    experts_s = time.time() - t0
    syn0, y_int = init_synthetic(config, data, buf)
    state, stats = distill_loop(config, buf, syn0, workdir, writer)
    evals = run_eval(config, data, state, writer, syn0)
    results = {
        "method": "mtt" if not config.distill.soft_labels else "datm", "variant": config.variant,
        "seed": config.seed, "dataset": data.name, "ipc": config.distill.ipc, "image_shape": list(data.image_shape),
        "model": dict(config.model), "conv_impl": {"training": convnet.resolve_conv_impl(config.model.conv_impl),
                      "meta_step": convnet.resolve_conv_impl(config.model.conv_impl, second_order=True)},
        **{k: evals[k] for k in EVAL_ARMS if k in evals},
        "learned_lr": evals["eval_lr_distilled"], **stats,
        "experts": {"num": buf.num_experts, "epochs": buf.num_epochs, "seconds_this_run": experts_s,
                    "final_test_acc_mean": float(np.mean(buf.meta.get("final_test_acc", [float("nan")])))},
        "eval_seconds": evals["eval_seconds"], "eval_nets": config.eval.num, "eval_epochs": config.eval.epochs,
        "full_epochs": config.eval.full_epochs,
        "peak_rss_bytes": _peak_rss_bytes(), "device_peak_bytes": _device_peak_bytes(),
        "device": str(jax.devices()[0].device_kind), "total_seconds": time.time() - t_start,
        "config": config,
    }
    path = save_outputs(config, data, state, syn0, y_int, results, workdir)
    parts = {k: f"{results[k]['mean']:.4f}±{results[k]['std']:.4f}" for k in EVAL_ARMS if k in results}
    summary_line(f"DATM {data.name} IPC {config.distill.ipc}",
                 {**parts, "s/it": results["seconds_per_iteration"] or 0.0, "compile s": results["compile_seconds"],
                  "total s": results["total_seconds"]}, path)
    return json.loads(json.dumps(jsonable(results)))
  finally:
    writer.close()


__all__ = ["run", "specs"]
