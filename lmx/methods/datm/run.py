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

from lmx.core import metrics, plots
from lmx.core.checkpoint import Checkpointer, abstract_like
from lmx.core.config import ConfigError
from lmx.datasets import images
from lmx.methods.datm import distill as D
from lmx.methods.datm import dsa, evaluate, experts
from lmx.methods.datm.validate import validate
from lmx.models import convnet


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
  """Loads ``experts.dir`` (checked against the config), or a buffer already in the workdir, or trains one."""
  expect = experts.expected_meta(config, data.image_shape, data.num_classes)
  need = config.distill.max_start_epoch - 1 + config.distill.expert_epochs
  if config.experts.dir:
    return experts.load_buffer(config.experts.dir, expect, min_epochs=need)
  own = os.path.join(workdir, "experts")
  if experts.buffer_exists(own):
    return experts.load_buffer(own, expect, min_epochs=need)
  buf = experts.train_experts(config.seed, data, config, progress=metrics.progress,
                              log=lambda s, m: writer.scalars(s, m))
  experts.save_buffer(own, buf)
  acc = np.asarray(buf.meta["final_test_acc"])
  writer.summary(0, {"experts_test_acc": acc.mean(), "experts_seconds": buf.meta["train_seconds"]},
                 prefix="")
  return buf


def init_synthetic(config, data, buf: experts.ExpertBuffer) -> tuple[D.Syn, np.ndarray]:
  """Initial images, labels and step size (DATM: correctly classified real images + expert soft labels)."""
  d = config.distill
  rng = np.random.default_rng([config.seed, 6])
  c = data.num_classes
  final = jax.tree.map(jnp.asarray, buf.final())
  logits_fn = jax.jit(jax.vmap(convnet.apply, in_axes=(0, None)))
  if d.init == "correct":
    x_all = data.x_train_NHWC
    preds = np.concatenate([np.asarray(logits_fn(final, x_all[s:s + 1000]).argmax(-1))
                            for s in range(0, len(x_all), 1000)], axis=1)
    idx = D.select_correct(preds, data.y_train_N, c, d.ipc, rng)
  else:
    idx = evaluate.random_subset(config.seed + 1, data.y_train_N, c, d.ipc)
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
  """Runs (or resumes) the distillation; returns the final state and timing/memory statistics."""
  d = config.distill
  inner, outer = specs(config)
  tx = D.make_optimizer(outer, inner)
  state = D.init_state(syn, tx)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=2, async_save=True)
  start = 0
  restored = ckpt.restore(abstract_like(state))
  if restored is not None:
    start, state = restored
    print(f"resuming distillation from iteration {start}", flush=True)
  step_fn = jax.jit(lambda s, a, b, k: D.meta_step(s, a, b, k, inner=inner, outer=outer))
  th0 = jax.tree.map(jnp.asarray, buf.snapshot(0, 0))
  t0 = time.time()
  compiled = step_fn.lower(state, th0, th0, jax.random.key(0)).compile()
  compile_s = time.time() - t0
  mem = compiled.memory_analysis()
  temp_bytes = int(getattr(mem, "temp_size_in_bytes", 0) or 0) if mem is not None else None
  root = jax.random.key(config.seed)
  skipped = spikes = nonfinite_run = 0
  pending: list[tuple[int, dict, dict]] = []  # metrics stay on device until a log/checkpoint step (no per-step sync)

  def drain(it_done: int) -> None:
    """Fetches the pending metrics in one transfer, logs them and checks for a run of non-finite losses."""
    nonlocal skipped, spikes, nonfinite_run
    fetched = jax.device_get([m for _, m, _ in pending])
    for (it, _, extra), m in zip(pending, fetched):
      m = {k: float(v) for k, v in m.items()}
      skipped += int(m["skipped"])
      spikes += int(m.get("spike", 0.0))
      nonfinite_run = nonfinite_run + 1 if m["nonfinite"] else 0
      if (it + 1) % d.log_every == 0 or it == start:
        writer.scalars(it + 1, {**m, **extra}, prefix="distill/")
        bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.4f}", refresh=False)
      if nonfinite_run >= d.max_nonfinite:
        pending.clear()
        ckpt.save(it_done, state, config=config, force=True)  # skipped updates: this is the last good state
        ckpt.close()
        raise FloatingPointError(
            f"distillation: {nonfinite_run} consecutive non-finite meta-losses at iteration {it + 1} (updates "
            "were skipped, the last good state is checkpointed); lower distill.lr_img / distill.lr_y or "
            "distill.lr_max")
    pending.clear()

  loop_t0 = time.time()
  bar = metrics.progress(d.iterations, "distill", initial=start)
  for it in range(start, d.iterations):
    e = D.expert_for(config.seed, it, buf.num_experts)
    ub = D.window_upper_bound(it, min_start=d.min_start_epoch, max_start=d.max_start_epoch,
                              sequential=d.sequential, current_max_start=d.current_max_start_epoch,
                              expansion_end=d.expansion_end)
    t = D.sample_start_epoch(config.seed, it, d.min_start_epoch, ub)
    th_s = jax.tree.map(jnp.asarray, buf.snapshot(e, t))
    th_t = jax.tree.map(jnp.asarray, buf.snapshot(e, t + d.expert_epochs))
    state, m = compiled(state, th_s, th_t, jax.random.fold_in(root, it))
    pending.append((it, m, {"start_epoch": t, "window_upper": ub, "expert": e}))
    bar.update(1)
    last = it + 1 == d.iterations
    if (it + 1) % d.log_every == 0 or it == start or last or (it + 1) % d.ckpt_every == 0 \
        or len(pending) >= d.max_nonfinite:
      drain(it + 1)
    if (it + 1) % d.ckpt_every == 0 and not last:
      ckpt.save(it + 1, state, config=config)
  jax.block_until_ready(state)
  loop_s = time.time() - loop_t0
  bar.close()
  if d.iterations > start:
    ckpt.save(d.iterations, state, config=config, force=True)
  ckpt.close()
  ran = d.iterations - start
  stats = {"iterations": d.iterations, "iterations_this_run": ran, "resumed_from": start,
           "skipped_updates_this_run": skipped, "spike_skips_this_run": spikes,
           "seconds_per_iteration": loop_s / ran if ran else None, "compile_seconds": compile_s,
           "distill_seconds": loop_s, "xla_temp_bytes": temp_bytes}
  return state, stats


def run_eval(config, data, state, writer, syn0=None) -> dict:
  """Distilled, random-real and full-data accuracies (mean ± std over ``eval.num`` networks); with
  ``eval.init`` also the initial synthetic set (same labels/step-size protocol, before any image update)."""
  v, d = config.eval, config.distill
  strategy = dsa.parse_strategy(config.data.dsa_strategy)
  c = data.num_classes
  common = dict(num_classes=c, model_cfg=config.model, num_nets=v.num, batch=v.batch, dsa_strategy=strategy,
                momentum=v.momentum, weight_decay=v.weight_decay, use_vmap=v.vmap, progress=metrics.progress)
  x_syn = np.asarray(state["syn"]["x"])
  targets = np.asarray(D.targets_of(state["syn"]["y"], d.soft_labels))
  lr = float(D.lr_value(state["syn"]["lr"], d.lr_param))
  out = {}
  t0 = time.time()
  accs = evaluate.train_and_test(config.seed + 11, x_syn, targets, data.x_test_NHWC, data.y_test_N, epochs=v.epochs,
                                 lr=lr, desc="eval distilled", **common)
  out["distilled"] = evaluate.summarize(accs)
  if v.init and syn0 is not None:
    accs = evaluate.train_and_test(config.seed + 11, np.asarray(syn0["x"]),
                                   np.asarray(D.targets_of(jnp.asarray(syn0["y"]), d.soft_labels)), data.x_test_NHWC,
                                   data.y_test_N, epochs=v.epochs, lr=lr, desc="eval initial set", **common)
    out["initial"] = evaluate.summarize(accs)
  onehot = np.eye(c, dtype=np.float32)
  if v.random:
    idx = evaluate.random_subset(config.seed + 2, data.y_train_N, c, d.ipc)
    accs = evaluate.train_and_test(config.seed + 12, data.x_train_NHWC[idx], onehot[data.y_train_N[idx]],
                                   data.x_test_NHWC, data.y_test_N, epochs=v.epochs, lr=v.lr_real,
                                   desc="eval random", **common)
    out["random"] = evaluate.summarize(accs)
  if v.full:
    accs = evaluate.train_and_test(config.seed + 13, data.x_train_NHWC, onehot[data.y_train_N], data.x_test_NHWC,
                                   data.y_test_N, epochs=v.full_epochs, lr=v.lr_real, desc="eval full", **common)
    out["full"] = evaluate.summarize(accs)
  out["eval_seconds"] = time.time() - t0
  out["eval_lr_distilled"] = lr
  writer.summary(d.iterations, {f"{k}_acc": r["mean"] for k, r in out.items() if isinstance(r, dict)},
                 prefix="eval/")
  return out


def save_outputs(config, data, state, syn0, y_int, results: dict, workdir: str) -> None:
  """synthetic.npz, results.json and the PNGs."""
  d = config.distill
  x = np.asarray(state["syn"]["x"])
  np.savez(os.path.join(workdir, "synthetic.npz"), x=x, y=np.asarray(state["syn"]["y"]),
           lr=float(D.lr_value(state["syn"]["lr"], d.lr_param)), labels=y_int)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  pdir = os.path.join(workdir, "plots")
  os.makedirs(pdir, exist_ok=True)
  show = min(d.ipc, 10)
  order = np.concatenate([np.flatnonzero(y_int == c)[:show] for c in range(data.num_classes)])
  # one row per class (IPC 1: one row of all classes)
  nrow = data.num_classes if show > 1 else 1
  labels = [str(c) for c in range(data.num_classes)] if show > 1 else None
  plots.image_grid(os.path.join(pdir, "distilled_images.png"), data.to_pixels(x[order]), nrow=nrow,
                   title=f"distilled, IPC {d.ipc}", row_labels=labels)
  plots.image_grid(os.path.join(pdir, "initial_images.png"), data.to_pixels(np.asarray(syn0["x"])[order]),
                   nrow=nrow, title=f"initial, IPC {d.ipc}", row_labels=labels)
  jsonl = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(jsonl):
    plots.from_jsonl(jsonl, ["distill/loss"], os.path.join(pdir, "distill_loss.png"), title="matching loss")
    plots.from_jsonl(jsonl, ["distill/lr"], os.path.join(pdir, "distill_lr.png"), title="learned step size α")
    plots.from_jsonl(jsonl, ["distill/start_epoch", "distill/window_upper"],
                     os.path.join(pdir, "distill_window.png"), title="start epoch and window T⁺")


def run(config, workdir: str) -> dict:
  """Runs the whole DATM pipeline; returns the results dict (also written to ``workdir/results.json``)."""
  t_start = time.time()
  validate(config)
  convnet.set_default_conv_impl(config.model.conv_impl)
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
        "dataset": data.name, "ipc": config.distill.ipc, "image_shape": list(data.image_shape),
        "model": dict(config.model), "conv_impl": {"training": convnet.resolve_conv_impl(config.model.conv_impl),
                      "meta_step": convnet.resolve_conv_impl(config.model.conv_impl, second_order=True)},
        **{k: evals[k] for k in ("distilled", "random", "full", "initial") if k in evals},
        "learned_lr": evals["eval_lr_distilled"], **stats,
        "experts": {"num": buf.num_experts, "epochs": buf.num_epochs, "seconds_this_run": experts_s,
                    "final_test_acc_mean": float(np.mean(buf.meta.get("final_test_acc", [float("nan")])))},
        "eval_seconds": evals["eval_seconds"], "eval_nets": config.eval.num, "eval_epochs": config.eval.epochs,
        "full_epochs": config.eval.full_epochs,
        "peak_rss_bytes": _peak_rss_bytes(), "device_peak_bytes": _device_peak_bytes(),
        "device": str(jax.devices()[0].device_kind), "total_seconds": time.time() - t_start,
        "config": config.to_dict(),
    }
    results = json.loads(json.dumps(results, default=str))  # plain JSON types (config values included)
    save_outputs(config, data, state, syn0, y_int, results, workdir)
    r = results
    line = f"distilled {r['distilled']['mean']:.4f}±{r['distilled']['std']:.4f}"
    if "random" in r:
      line += f" | random {r['random']['mean']:.4f}±{r['random']['std']:.4f}"
    if "full" in r:
      line += f" | full {r['full']['mean']:.4f}±{r['full']['std']:.4f}"
    print(f"DATM {data.name} IPC {config.distill.ipc}: {line} | {r['seconds_per_iteration'] or 0:.3f} s/it, "
          f"compile {r['compile_seconds']:.1f} s, total {r['total_seconds']:.0f} s → {workdir}/results.json",
          flush=True)
    return results
  finally:
    writer.close()


__all__ = ["run", "specs"]
