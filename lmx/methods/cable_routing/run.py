"""Cable-routing driver: demonstrations in the 2-D PBD cable simulator, the hierarchical policy (learned route
primitive + learned primitive selector, DAgger-style fine-tuning on oracle corrections), the baselines at equal
demonstration data, and evaluation on held-out clip layouts.

Stages per seed (see ``configs/cable_routing.py``):
  1. demonstrations: one episode per training layout (ids 0..demos.episodes-1) with the oracle selector, the
     scripted primitives and action noise ``demos.action_sigma`` (labels are the clean scripted actions at the
     visited states: corrections at the states noise leads to, including failure states and their recoveries);
  2. the flat BC policy on every demonstrated step (top + wrist views + grasp flag -> 2-D velocity, tanh-Gaussian
     NLL); its encoders are the frozen feature extractor of the selector (the released code pretrains the
     high level's encoders with the same BC objective on all views);
  3. the route BC policy on the route-primitive steps only (same architecture, fresh parameters);
  4. the selector on the demonstrated decisions (frozen features + the last H primitive ids -> primitive);
  5. DAgger: the hierarchical policy runs on ``dagger.episodes`` further training layouts, the oracle labels the
     states it visits, the selector is fine-tuned on demos + corrections;
  6. evaluation on ``eval.episodes`` held-out layouts (ids >= HELDOUT_BASE), the same environment randomness for
     every arm and seed: per-stage success (clips 0..j passed in order at the end) and full-task success.
Arms: hier_dagger, hier (before DAgger), fixed_order (goto/route per clip, learned route, no recovery), flat_bc,
oracle_selector (oracle high level + learned route) and scripted (the demonstrator without noise).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from lmx.core import plots
from lmx.core.config import check_keys, require
from lmx.core.metrics import Writer
from lmx.core.results import plot_path, summary_line, write_results
from lmx.core.rng import np_stream, rng_stream
from lmx.envs import cable
from lmx.methods.cable_routing import policy as pol
from lmx.methods.cable_routing import primitives as P
from lmx.methods.cable_routing import rollout as R
from lmx.methods.cable_routing import train as T

CONFIG_FIELDS = ("method", "variant", "source", "seeds", "env", "demos", "model", "train", "dagger", "eval", "real")
ENV_FIELDS = ("clips", "particles", "p_snag", "slip_stretch", "res", "decisions", "steps", "goto_sigma")
DEMO_FIELDS = ("episodes", "action_sigma")
MODEL_FIELDS = ("widths", "hidden", "history", "embed", "selector_hidden")
TRAIN_FIELDS = ("bc_steps", "sel_steps", "batch", "lr", "sel_lr", "weight_decay", "warmup", "augment_shift")
DAGGER_FIELDS = ("episodes", "steps", "lr", "warmup")
EVAL_FIELDS = ("episodes", "batch", "strips")
REAL_FIELDS = ("data_dir", "split", "max_episodes", "res", "steps", "batch")
STEPS_FIELD = None
SAFE_TO_CHANGE = ()
ARMS = ("hier_dagger", "hier", "fixed_order", "flat_bc", "oracle_selector", "scripted")
ARM_MODES = {  # (selector mode, learned route, flat)
    "hier_dagger": (R.SEL_LEARNED, 1, 0), "hier": (R.SEL_LEARNED, 1, 0), "fixed_order": (R.SEL_FIXED, 1, 0),
    "flat_bc": (R.SEL_ORACLE, 0, 1), "oracle_selector": (R.SEL_ORACLE, 1, 0), "scripted": (R.SEL_ORACLE, 0, 0)}


def validate(config):
  """Field names and ranges; ConfigError names the field."""
  check_keys(config, "config", CONFIG_FIELDS)
  for name, fields in (("env", ENV_FIELDS), ("demos", DEMO_FIELDS), ("model", MODEL_FIELDS), ("train", TRAIN_FIELDS),
                       ("dagger", DAGGER_FIELDS), ("eval", EVAL_FIELDS), ("real", REAL_FIELDS)):
    check_keys(config[name], name, fields)
  require(config.source in ("sim", "oxe"), "source", f"must be 'sim' or 'oxe', got {config.source!r}")
  require(len(config.seeds) >= 1, "seeds", "give at least one seed")
  e = config.env
  require(e.clips >= 1, "env.clips", f"must be >= 1, got {e.clips}")
  require(e.particles >= 8, "env.particles", f"must be >= 8, got {e.particles}")
  require(e.res >= 8, "env.res", f"must be >= 8, got {e.res}")
  require(e.decisions >= 2 * e.clips, "env.decisions", f"must be >= 2 * env.clips (goto + route per clip), got "
          f"{e.decisions}")
  require(e.steps >= 1, "env.steps", "must be >= 1")
  require(0 <= e.p_snag <= 1, "env.p_snag", f"must be in [0, 1], got {e.p_snag}")
  require(e.slip_stretch > 1, "env.slip_stretch", f"must be > 1, got {e.slip_stretch}")
  require(config.demos.episodes >= 1, "demos.episodes", "must be >= 1")
  require(config.demos.action_sigma >= 0, "demos.action_sigma", "must be >= 0")
  for f in ("bc_steps", "sel_steps", "batch"):
    require(config.train[f] >= 1, f"train.{f}", f"must be >= 1, got {config.train[f]}")
  require(config.eval.episodes >= 1, "eval.episodes", "must be >= 1")
  require(config.eval.batch >= 1, "eval.batch", "must be >= 1")
  require(len(config.model.widths) >= 1, "model.widths", "give at least one width")


def env_of(config):
  e = config.env
  prm = cable.Params(n=e.particles, k=e.clips, p_snag=e.p_snag, slip_stretch=e.slip_stretch,
                     seg=1.35 / (e.particles - 1))
  ec = R.EpisodeCfg(decisions=e.decisions, steps=e.steps, res=e.res, goto_sigma=e.goto_sigma,
                    history=config.model.history)
  return prm, ec


def init_nets(key, config):
  m = config.model
  k1, k2, k3 = jax.random.split(key, 3)
  flat = pol.init_bc(k1, 2, 2, tuple(m.widths), tuple(m.hidden))
  route = pol.init_bc(k2, 2, 2, tuple(m.widths), tuple(m.hidden))
  feat_dim = 2 * m.widths[-1] + 16
  sel = pol.init_selector(k3, feat_dim, P.NUM_PRIMS, m.history, m.embed, m.selector_hidden)
  return dict(route=route, flat=flat, sel=sel)


def make_runner(prm, ec, batch: int):
  """``runner(ids, keys_seed_name, nets, arm, sigma)`` -> numpy (progress, drec, srec) over layout ids, in
  batches of ``batch`` (one compiled function for every arm)."""
  fn = jax.jit(jax.vmap(lambda key, lay, nets, modes, sig: R.episode(key, lay, nets, modes, sig, prm, ec),
                        in_axes=(0, 0, None, None, None)))

  def runner(ids, keys, nets, modes, sigma):
    outs = []
    for s in range(0, len(ids), batch):
      i = np.asarray(ids[s:s + batch])
      k = keys[s:s + batch]
      n = len(i)
      if n < batch:  # pad to the compiled batch
        i = np.concatenate([i, np.repeat(i[-1:], batch - n)])
        k = jnp.concatenate([k, jnp.repeat(k[-1:], batch - n, 0)])
      lay = cable.layouts(i, prm)
      out = fn(k, lay, nets, tuple(jnp.int32(x) for x in modes), jnp.float32(sigma))
      outs.append(jax.tree.map(lambda x: np.asarray(x)[:n], out))
    return jax.tree.map(lambda *x: np.concatenate(x), *outs)

  return runner


def step_data(srec, mask):
  return {k: srec[k][mask] for k in ("top", "wrist", "grasped", "action")}


def decision_data(drec, mask):
  return {k: drec[k][mask] for k in ("top", "wrist", "grasped", "hist", "oracle")}


def _flat(x):
  return x.reshape((-1,) + x.shape[2:])


def stage_table(progress_B, k):
  return dict(stages=R.stage_success(progress_B, k), full=float((progress_B >= k).mean()))


def run(config, workdir: str):
  """The whole experiment; writes results.json, metrics.jsonl, plots/*.png."""
  validate(config)
  if config.source == "oxe":
    from lmx.methods.cable_routing import oxe

    return oxe.run_real(config, workdir)
  t0 = time.time()
  prm, ec = env_of(config)
  writer = Writer(workdir, tensorboard=False)
  runner = make_runner(prm, ec, min(config.eval.batch, max(config.eval.episodes, config.demos.episodes)))
  tr, dg = config.train, config.dagger
  E = config.demos.episodes
  eval_ids = cable.HELDOUT_BASE + np.arange(config.eval.episodes)
  eval_keys = jnp.stack([rng_stream(0, "eval", i) for i in range(config.eval.episodes)])
  per_seed, demo_stats, strips, train_log = {}, [], {}, []
  step_no = [0]

  def log(i, d):
    step_no[0] += 1
    return writer.scalars(step_no[0], d)

  for seed in config.seeds:
    ts = time.time()
    nets = init_nets(rng_stream(seed, "init"), config)
    # 1. demonstrations
    keys = jnp.stack([rng_stream(seed, "demo", i) for i in range(E)])
    prog, drec, srec = runner(np.arange(E), keys, nets, ARM_MODES["scripted"], config.demos.action_sigma)
    drec, srec = jax.tree.map(_flat, drec), jax.tree.map(_flat, srec)
    smask = srec["active"]
    steps_all = step_data(srec, smask)
    steps_route = step_data(srec, smask & (srec["prim"] == P.ROUTE))
    dmask = drec["active"]
    dec = decision_data(drec, dmask)
    counts = np.bincount(dec["oracle"], minlength=P.NUM_PRIMS).tolist()
    demo_stats.append(dict(seed=seed, success=float((prog >= prm.k).mean()), steps=int(smask.sum()),
                           route_steps=int(len(steps_route["action"])), decisions=int(dmask.sum()),
                           decision_counts=dict(zip(P.NAMES, counts)),
                           slips=int(srec["slipped"].sum()), snags=int(srec["snagged"].sum())))
    summary_line(f"seed {seed} demos", demo_stats[-1] | {"decision_counts": counts})
    # 2-3. flat BC and route BC (equal demonstration data: the same episodes)
    common = dict(steps=tr.bc_steps, batch=tr.batch, lr=tr.lr, warmup=tr.warmup, weight_decay=tr.weight_decay,
                  pad=tr.augment_shift)
    nets["flat"], h1 = T.train_bc(nets["flat"], steps_all, seed_key=rng_stream(seed, "flat"),
                                  rng=np_stream(seed, "flat"), log=log, name=f"s{seed}/flat", **common)
    nets["route"], h2 = T.train_bc(nets["route"], steps_route, seed_key=rng_stream(seed, "route"),
                                   rng=np_stream(seed, "route"), log=log, name=f"s{seed}/route", **common)
    # 4. selector on frozen flat-BC features
    feat = T.features(nets["flat"], dec["top"], dec["wrist"], dec["grasped"])
    sdata = dict(feat=feat, hist=dec["hist"], label=dec["oracle"])
    scommon = dict(batch=tr.batch, weight_decay=1e-2, rng=np_stream(seed, "sel"), log=log)
    nets["sel"], h3 = T.train_selector(nets["sel"], sdata, steps=tr.sel_steps, lr=tr.sel_lr, warmup=tr.warmup,
                                       name=f"s{seed}/sel", **scommon)
    nets_hier = dict(nets)
    # 5. DAgger: run the learned hierarchy on further training layouts, relabel with the oracle, fine-tune
    d_ids = E + np.arange(dg.episodes)
    d_keys = jnp.stack([rng_stream(seed, "dagger", i) for i in range(dg.episodes)])
    _, d_drec, _ = runner(d_ids, d_keys, nets, ARM_MODES["hier"], 0.0)
    d_drec = jax.tree.map(_flat, d_drec)
    corr = decision_data(d_drec, d_drec["active"])
    n_wrong = int((corr["oracle"] != d_drec["prim"][d_drec["active"]]).sum())
    cfeat = T.features(nets["flat"], corr["top"], corr["wrist"], corr["grasped"])
    agg = dict(feat=np.concatenate([feat, cfeat]), hist=np.concatenate([dec["hist"], corr["hist"]]),
               label=np.concatenate([dec["oracle"], corr["oracle"]]))
    sel_d, h4 = T.train_selector(nets["sel"], agg, steps=dg.steps, lr=dg.lr, warmup=dg.warmup,
                                 name=f"s{seed}/dagger", **scommon)
    nets_dagger = dict(nets, sel=sel_d)
    train_log.append(dict(seed=seed, flat=h1[-1], route=h2[-1], sel=h3[-1], dagger=h4[-1],
                          dagger_decisions=int(len(corr["oracle"])), dagger_corrected=n_wrong))
    # 6. evaluation on held-out layouts
    res = {}
    for arm in ARMS:
      if arm == "scripted" and seed != config.seeds[0]:
        res[arm] = per_seed[config.seeds[0]][arm]
        continue
      n = nets_dagger if arm == "hier_dagger" else nets_hier
      p, d, _ = runner(eval_ids, eval_keys, n, ARM_MODES[arm], 0.0)
      res[arm] = stage_table(p, prm.k) | dict(prims=d["prim"][: config.eval.strips].tolist())
      if seed == config.seeds[0] and arm in ("hier_dagger", "fixed_order", "flat_bc"):
        strips[arm] = d["top"][: config.eval.strips]
    per_seed[seed] = res
    summary_line(f"seed {seed} held-out full-task success", {a: res[a]["full"] for a in ARMS} |
                 {"time_s": round(time.time() - ts, 1)})

  summary = {}
  for arm in ARMS:
    full = np.array([per_seed[s][arm]["full"] for s in config.seeds])
    st = np.array([per_seed[s][arm]["stages"] for s in config.seeds])
    summary[arm] = dict(full_mean=float(full.mean()), full_std=float(full.std()), stages_mean=st.mean(0).tolist(),
                        stages_std=st.std(0).tolist(), full_per_seed=full.tolist())
  gap = np.array([per_seed[s]["hier_dagger"]["full"] - per_seed[s]["flat_bc"]["full"] for s in config.seeds])
  results = dict(
      method="cable_routing", variant=config.variant, seeds=list(config.seeds), heldout_episodes=len(eval_ids),
      summary=summary, hier_minus_flat=dict(mean=float(gap.mean()), std=float(gap.std()), per_seed=gap.tolist()),
      per_seed={str(s): v for s, v in per_seed.items()}, demos=demo_stats, training=train_log,
      env=dict(config.env.to_dict()), primitive_names=list(P.NAMES), wall_time_s=round(time.time() - t0, 1))
  _plots(workdir, summary, strips, prm, ec)
  path = write_results(workdir, results)
  summary_line("cable_routing full-task success (held-out, mean over seeds)",
               {a: summary[a]["full_mean"] for a in ARMS}, path)
  writer.close() if hasattr(writer, "close") else None
  return results


def _plots(workdir, summary, strips, prm, ec):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 3.5))
  xs = np.arange(prm.k + 1)
  w = 0.8 / len(summary)
  for i, (arm, s) in enumerate(summary.items()):
    m = s["stages_mean"] + [s["full_mean"]]
    e = s["stages_std"] + [s["full_std"]]
    ax.bar(xs + i * w, m, w, yerr=e, label=arm, capsize=2)
  ax.set_xticks(xs + 0.4 - w / 2, [f"clip {j + 1}" for j in range(prm.k)] + ["full"])
  ax.set_ylabel("success (held-out layouts)")
  ax.set_ylim(0, 1.05)
  ax.legend(fontsize=7, ncol=3)
  plots.save_figure(fig, plot_path(workdir, "success"))
  for arm, tops in strips.items():  # (episodes, D, H, W, 3) uint8: the top view at each decision
    x = tops.astype(np.float32) / 255.0
    plots.pixel_grid(plot_path(workdir, f"rollouts_{arm}"), x.reshape((-1,) + x.shape[2:]), nrow=x.shape[0], scale=3)
