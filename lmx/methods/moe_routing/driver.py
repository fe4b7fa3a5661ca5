"""moe_routing driver: train the aux-weight arms (MoE LMs with a checkpoint schedule), collect their routing, analyse.

The run (``configs/moe_routing.py``), its stages resumable stages of the one workdir (:mod:`lmx.core.stages`):
  ``lb<w>``          per ``sweep.lb_loss_coef`` w, an ``lm``-style MoE training (lmx.train.lm's step, held-out eval
                     and data; checkpoints in ``checkpoints/lb<w>/``) with a hook that saves a params-only snapshot at
                     each step of ``routing.ckpt_steps`` into ``snapshots/lb<w>/`` (the loop's own checkpoints, for
                     resuming, stay sparse);
  ``routing/lb<w>``  every snapshot restored params-only (``load_run``) and run over the same fixed held-out
                     batches; the records written to ``routing/lb<w>/step_S/layer_L.npz`` (records.py's format);
then the analysis of ``routing/``, which is what the ``analyze`` variant does for any ``routing_dir``: per
checkpoint and layer γ_eff (bootstrap CI), balance, held-out L1 of MFG vs softmax, the multi-type gain; per layer the
phase annotation; results.json and plots.
"""
from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np

from lmx.core import checkpoint as ckpt_lib
from lmx.core import interrupt, loop, mesh as mesh_lib, schema, stages
from lmx.core.config import ConfigError, require
from lmx.core.metrics import Writer, progress
from lmx.core.results import summary_line, write_results
from lmx.datasets import text
from lmx.methods.moe_routing import analysis, estimators as est, records, report
from lmx.models.registry import load_run
from lmx.train import lm as lm_run
from lmx.train.lm import unprefixed
from lmx.models.transformer import num_params

STEPS_FIELD = None  # the checkpoint schedule and the lr schedule are tied to train.steps: no continuing
# The abstract's held-out L1 load-prediction errors (MFG, softmax), reported beside this run's.
PAPER_HELDOUT_L1 = {"mfg": 0.199, "softmax": 0.200}


def validate(config):
  """Checks the config before anything is built: its fields against ``configs/moe_routing.py``'s declarations, then
  what relates fields (the fit interval, the checkpoint schedule against train.steps, distinct sweep weights) and,
  for training variants, the arm's lm config and model."""
  schema.validate(config)
  a = config.analysis
  require(a.gamma_lo < a.gamma_hi, "analysis.gamma_lo", f"must be < analysis.gamma_hi={a.gamma_hi}")
  if config.variant == "analyze" or config.routing_dir:
    require(bool(config.routing_dir), "routing_dir", "the analyze variant needs --config.routing_dir=D, a "
            "directory of step_<S>/layer_<L>.npz routing files (or of runs holding them)")
    if not os.path.isdir(config.routing_dir):
      raise FileNotFoundError(f"routing_dir={config.routing_dir!r} is not a directory")
    return None
  r = config.routing
  steps = tuple(int(s) for s in r.ckpt_steps)
  require(len(steps) >= 2 and all(b > a_ for a_, b in zip(steps, steps[1:])), "routing.ckpt_steps",
          f"must be >= 2 strictly increasing steps, got {steps}")
  require(steps[0] > 0 and steps[-1] <= config.train.steps, "routing.ckpt_steps",
          f"must lie in [1, train.steps={config.train.steps}], got {steps}")
  coefs = tuple(config.sweep.lb_loss_coef)
  require(len(set(coefs)) == len(coefs), "sweep.lb_loss_coef", f"must be distinct weights >= 0, got {coefs}")
  model = lm_run.validate(arm_config(config, coefs[0]))
  require(model.cfg.moe_layers, "model.moe_every", "the model has no MoE layer: nothing routes")
  return model


def arm_name(w: float) -> str:
  return f"lb{w:g}"


def arm_config(config, w: float):
  """The ``lm`` run config of one arm: the model with ``lb_loss_coef = w``, this config's data/optim/train."""
  c = ml_collections.ConfigDict()
  c.method, c.variant, c.seed = "lm", f"moe_routing_{arm_name(w)}", int(config.seed)
  c.mesh = ml_collections.ConfigDict(config.mesh.to_dict())
  c.axis_rules = config.axis_rules
  c.model = ml_collections.ConfigDict(dict(config.model.to_dict(), lb_loss_coef=float(w)))
  c.data = ml_collections.ConfigDict(config.data.to_dict())
  c.optim = ml_collections.ConfigDict(config.optim.to_dict())
  c.train = ml_collections.ConfigDict(config.train.to_dict())
  return c


# ------------------------------------------------------------------------------------------ (1) training


def snapshot_hook(arm_cfg, snap_dir: str, steps):
  """``hook(step, state, writer)`` for ``loop.at_steps(steps, ...)``: a params-only checkpoint in ``snap_dir`` (with
  the arm's config, so ``load_run(..., ckpt_dir=snap_dir)`` rebuilds the model) at each step of ``steps``; steps
  already saved (a resumed run) are skipped."""
  wanted = set(int(s) for s in steps)
  ckpt = ckpt_lib.Checkpointer(snap_dir, keep=len(wanted) + 1, async_save=False)
  saved = set(ckpt.all_steps())

  def hook(step, state, writer):
    del writer
    if step not in saved:
      ckpt.save(step, {"params": state["params"]}, config=arm_cfg, force=True)
      saved.add(step)
    return None

  hook.close = ckpt.close
  return hook


def snapshot_dir(workdir: str, name: str) -> str:
  """``<workdir>/snapshots/<arm>``: the arm's params-only snapshots on the checkpoint schedule."""
  return os.path.join(workdir, "snapshots", name)


def train_arm(arm_cfg, workdir: str, name: str, ckpt_steps, *, writer) -> dict:
  """Trains one arm as ``lm.run`` does (its step, data and held-out eval) as the stage ``name`` of the run in
  ``workdir``, plus the snapshot hook; returns the arm's training summary."""
  model = lm_run.validate(arm_cfg)
  mesh = mesh_lib.make_mesh(arm_cfg.mesh)
  d, t = arm_cfg.data, arm_cfg.train
  parts = lm_run.training(arm_cfg, model, mesh, eval_name=f"{name}/eval")
  snap = snapshot_hook(arm_cfg, snapshot_dir(workdir, name), ckpt_steps)
  try:
    res = stages.train(workdir, name, writer=writer, total_steps=t.steps, step_fn=parts["step_fn"],
                       init_fn=parts["init_fn"], state_shardings=parts["shardings"], mesh=mesh, seed=arm_cfg.seed,
                       data=parts["batches"], config=arm_cfg,
                       hooks=[parts["evaluate"], loop.at_steps(ckpt_steps, snap, name=f"{name}/snapshot")],
                       log_every=t.log_every, ckpt_every=t.ckpt_every, ckpt_keep=t.ckpt_keep,
                       async_checkpointing=t.async_checkpointing, items_per_step=d.global_batch * d.seq_len)
  finally:
    snap.close()
  return {"lb_loss_coef": float(arm_cfg.model.lb_loss_coef), "params": num_params(model.abstract_params()),
          "steps": t.steps, "final_train": unprefixed(res.last_metrics, f"{name}/"),
          "final_eval": unprefixed(res.hook_metrics.get(f"{name}/eval", {}), f"{name}/eval/"),
          "steps_per_sec": res.steps_per_sec, "compile_wall_s": res.compile_seconds,
          "data_split": parts["split_info"]}


# ------------------------------------------------------------------------------------------ (2) routing records


def collect_arm(config, snap_dir: str, out_dir: str, batches_BWT: np.ndarray, forward=None):
  """Writes the routing records of every snapshot in ``snap_dir`` (restored params-only) to ``out_dir``; returns
  ``(files written, the jitted routing forward)`` (snapshots whose files all exist are skipped). ``forward``: a
  routing forward jitted for another arm of the same architecture (the arms differ in the aux weight only, which
  the forward does not read), so that it compiles once per run."""
  with ckpt_lib.Checkpointer(snap_dir, async_save=False) as ckpt:
    steps = ckpt.all_steps()
  missing = sorted(set(int(s) for s in config.routing.ckpt_steps) - set(steps))
  if missing:
    raise FileNotFoundError(f"{snap_dir}: no snapshot at step(s) {missing}; use a new --workdir to retrain the arm")
  written, fwd, model, target = 0, forward, None, None
  with ckpt_lib.Checkpointer(snap_dir, async_save=False) as ckpt, \
       progress(len(steps), desc=f"routing records {os.path.basename(out_dir)}") as bar:
    for step in steps:
      bar.update(1)
      if model is None:  # the first snapshot: the model from its saved config, the restore target from it
        _, model, params = load_run(snap_dir, step, ckpt_dir=snap_dir)
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
      if all(os.path.exists(records.record_path(out_dir, step, i)) for i in model.cfg.moe_layers):
        continue
      interrupt.check(f"before the routing records of {snap_dir} at step {step} (the files written are kept)")
      params = ckpt.restore_subset({"params": target}, step=step)[1]["params"]  # params only
      fwd = fwd or jax.jit(records.routing_forward(model))  # one compile for all snapshots (same shapes)
      for layer, rec in records.collect_params(model, params, batches_BWT, step, forward=fwd).items():
        records.write_record(records.record_path(out_dir, step, layer), rec)
        written += 1
  return written, fwd


def routing_batches(config) -> np.ndarray:
  d = config.data
  _, eval_src, _ = text.train_eval_windows(d.corpus, d.seq_len, d.eval_fraction, split=d.split, seed=d.split_seed)
  return records.eval_batches(eval_src, int(config.routing.n_batches), int(config.routing.batch_windows))


# ------------------------------------------------------------------------------------------ (3) analysis


def analyse_dir(config, routing_dir: str) -> dict:
  """Every run under ``routing_dir`` (records.find_runs) analysed (analysis.analyse_run)."""
  a = config.analysis
  kw = dict(n_types=int(a.n_types), sigma=float(a.sigma), phi=a.phi, gamma_lo=float(a.gamma_lo),
            gamma_hi=float(a.gamma_hi), iters=int(a.iters), n_boot=int(a.n_boot), seed=int(config.seed))
  runs = records.find_runs(routing_dir)
  out = {}
  for name, paths in runs.items():
    interrupt.check(f"before the analysis of {name}")
    n = sum(len(v) for v in paths.values())
    print(f"moe_routing: analysing {name}: {len(paths)} checkpoints, {n} layer files, {kw['n_boot']} bootstrap "
          "resamples", flush=True)
    out[name] = analysis.analyse_run(paths, records.read_record, **kw)
  return out


def summarize(runs: dict, coefs: dict | None = None) -> dict:
  """Run-level numbers: held-out L1 (MFG, softmax; mean over checkpoints and layers) next to the paper's, the
  multi-type gain, the phases per layer, and — with ``coefs`` {run: aux weight} — γ_eff against the aux weight."""
  rows = [r for run in runs.values() for r in run["checkpoints"]]
  mean = lambda xs: float(np.mean(xs)) if len(xs) else None  # noqa: E731
  out = {
      "heldout_l1": {"mfg": mean([r["heldout_l1"]["mfg"] for r in rows]),
                     "softmax": mean([r["heldout_l1"]["softmax"] for r in rows]),
                     "uniform": mean([r["heldout_l1"]["uniform"] for r in rows]),
                     "multitype": mean([r["heldout_l1"]["multitype"] for r in rows]),
                     "paper": PAPER_HELDOUT_L1},
      "multitype_gain_mean": mean([r["multitype_gain"] for r in rows if r["multitype_gain"] is not None]),
      "multitype_gain_positive_frac": mean([float(r["multitype_gain"] > 0) for r in rows
                                            if r["multitype_gain"] is not None]),
      "phases": {name: {layer: v["phases"]["shows"] for layer, v in run["layers"].items()}
                 for name, run in runs.items()},
      "per_run": {},
  }
  for name, run in runs.items():
    rs = run["checkpoints"]
    last = max(r["step"] for r in rs)
    out["per_run"][name] = {
        "gamma_eff_mean_over_checkpoints": mean([r["gamma_eff"]["mean"] for r in rs]),
        "gamma_eff_final": mean([r["gamma_eff"]["mean"] for r in rs if r["step"] == last]),
        "gamma_eff_final_by_layer": {str(r["layer"]): [r["gamma_eff"]["lo"], r["gamma_eff"]["mean"],
                                                       r["gamma_eff"]["hi"]] for r in rs if r["step"] == last},
        "b0_final": mean([r["balance"]["b0"] for r in rs if r["step"] == last]),
        "heldout_l1_mfg": mean([r["heldout_l1"]["mfg"] for r in rs]),
        "heldout_l1_softmax": mean([r["heldout_l1"]["softmax"] for r in rs])}
  if coefs:
    order = sorted(coefs, key=coefs.get)
    fin = [out["per_run"][n]["gamma_eff_final"] for n in order]
    avg = [out["per_run"][n]["gamma_eff_mean_over_checkpoints"] for n in order]
    out["gamma_vs_aux"] = {
        "order": order, "lb_loss_coef": [coefs[n] for n in order], "gamma_eff_final": fin,
        "gamma_eff_mean_over_checkpoints": avg,
        "rises_final": bool(all(b > a for a, b in zip(fin, fin[1:]))),
        "rises_mean": bool(all(b > a for a, b in zip(avg, avg[1:])))}
  return out


def run(config, workdir: str) -> dict:
  t_start = time.time()
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  coefs, arms = None, {}
  writer = Writer(workdir, total_steps=config.train.steps, console_exclude=r"/(load|mean_prob)/e\d+$|/layer\d+/")
  try:
    if config.routing_dir:
      routing_dir = config.routing_dir
    else:
      routing_dir = os.path.join(workdir, "routing")
      batches_BWT = routing_batches(config)  # the same held-out batches for every arm and checkpoint
      coefs, fwd = {}, [None]
      for w in config.sweep.lb_loss_coef:
        name = arm_name(w)
        cfg = arm_config(config, w)
        arms[name] = stages.run_stage(workdir, name, lambda cfg=cfg, name=name: train_arm(
            cfg, workdir, name, config.routing.ckpt_steps, writer=writer))

        def collect(name=name):
          out_dir = os.path.join(routing_dir, name)
          n, fwd[0] = collect_arm(config, snapshot_dir(workdir, name), out_dir, batches_BWT, fwd[0])
          print(f"moe_routing: {name}: {n} routing files written to {out_dir}", flush=True)
          return {"files_written": n}

        stages.run_stage(workdir, f"routing/{name}", collect)
        coefs[name] = float(w)
    runs = analyse_dir(config, routing_dir)
    if coefs is not None:
      m = config.model
      for name, w in coefs.items():
        runs[name]["lb_loss_coef"] = w
        # γ_explicit of the Switch loss [reconstructed]; summed over layers each layer's router sees α
        runs[name]["gamma_explicit"] = est.gamma_explicit(w, int(m.n_experts), int(m.top_k), m.lb_loss_norm)
        runs[name]["train"] = arms[name]
    summary = summarize(runs, coefs)
    results = {"method": "moe_routing", "variant": config.variant,
               # the records analysed: config.routing_dir, or routing/ in this workdir
               "routing_dir": config.routing_dir or "routing",
               "phase_rule": est.annotate_phases.__doc__.split("\n\n")[1].strip(),
               "labels": "see lmx/methods/moe_routing/estimators.py: B_0, K/M, eps_l, the game, the fits and the "
                         "quality estimators are [reconstructed] definitions, not the paper's",
               "summary": summary, "runs": runs, "wall_s": time.time() - t_start}
    if not os.path.isdir(routing_dir):
      raise ConfigError(f"routing_dir={routing_dir!r} vanished during the run")
    path = write_results(workdir, results)
    if jax.process_index() == 0 and config.train.plot:
      for png in report.plots(workdir, runs, coefs):
        writer.image(f"plots/{os.path.splitext(os.path.basename(png))[0]}", png)
  finally:
    writer.close()
  h = summary["heldout_l1"]
  parts = {"held-out L1 of MFG": h["mfg"], "of softmax": h["softmax"], "(paper: 0.199, 0.200); multi-type gain":
           summary["multitype_gain_mean"]}
  if "gamma_vs_aux" in summary:
    g = summary["gamma_vs_aux"]
    parts["final gamma_eff by aux weight"] = " ".join(f"{w:g}:{x:.3g}" for w, x in
                                                       zip(g["lb_loss_coef"], g["gamma_eff_final"]))
  summary_line("moe_routing", parts, path)
  return results
