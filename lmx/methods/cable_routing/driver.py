"""Cable-routing driver: demonstrations in the 2-D PBD cable simulator, the hierarchical policy (learned route
primitive + learned primitive selector, DAgger-style fine-tuning on oracle corrections), the baselines at equal
demonstration data, and evaluation on held-out clip layouts.

The run is a sweep over seeds (``stages.sweep``: results.json rewritten after each seed); each seed is a sequence
of named stages of the workdir (``stages/s<seed>/<stage>``), skipped when finished, a training stage resumed from
its checkpoints (``checkpoints/s<seed>/<stage>``) when interrupted:
  demos            one episode per training layout (ids 0..demos.episodes-1) with the oracle selector, the scripted
                   primitives and action noise ``demos.action_sigma`` (labels are the clean scripted actions at the
                   visited states: corrections at the states noise leads to, including failure states and their
                   recoveries);
  route            the route BC policy on the route-primitive steps only (top + wrist views + grasp flag -> 2-D
                   velocity, tanh-Gaussian NLL);
  flat             the flat BC policy (same architecture, fresh parameters) on every demonstrated step; its
                   encoders are the frozen feature extractor of the selector (the released code pretrains the high
                   level's encoders with the same BC objective on all views);
  selector         the selector on the demonstrated decisions (frozen features + the last H primitive ids ->
                   primitive);
  dagger_rollouts  the hierarchical policy on ``dagger.episodes`` further training layouts; the oracle labels the
                   states it visits;
  dagger           the selector fine-tuned on demos + corrections;
  eval/<arm>       ``eval.episodes`` held-out layouts (ids >= HELDOUT_BASE), the same environment randomness for
                   every arm and seed: per-stage success (clips 0..j passed in order at the end) and full-task
                   success (the seed-independent scripted arm is the one stage ``eval/scripted``).
Arms: hier_dagger, hier (before DAgger), fixed_order (goto/route per clip, learned route, no recovery), flat_bc,
oracle_selector (oracle high level + learned route) and scripted (the demonstrator without noise).
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from lmx.core import interrupt, plots, schema, stages
from lmx.core.config import require
from lmx.core.metrics import Writer, progress
from lmx.core.results import plot_path, summary_line, write_results
from lmx.core.rng import rng_stream
from lmx.envs import cable
from lmx.methods.cable_routing import policy as pol
from lmx.methods.cable_routing import primitives as P
from lmx.methods.cable_routing import rollout as R
from lmx.methods.cable_routing import train as T

STEPS_FIELD = None
ARMS = ("hier_dagger", "hier", "fixed_order", "flat_bc", "oracle_selector", "scripted")
ARM_MODES = {  # (selector mode, learned route, flat)
    "hier_dagger": (R.SEL_LEARNED, 1, 0), "hier": (R.SEL_LEARNED, 1, 0), "fixed_order": (R.SEL_FIXED, 1, 0),
    "flat_bc": (R.SEL_ORACLE, 0, 1), "oracle_selector": (R.SEL_ORACLE, 1, 0), "scripted": (R.SEL_ORACLE, 0, 0)}
STRIP_ARMS = ("hier_dagger", "fixed_order", "flat_bc")  # the rollout strips plotted (first seed)


def validate(config):
  """Checks the config before anything runs: its fields against ``configs/cable_routing.py``'s declarations, then
  what relates fields (enough decisions for a goto and a route per clip). Errors name the field."""
  schema.validate(config)
  e = config.env
  require(e.decisions >= 2 * e.clips, "env.decisions", f"must be >= 2 * env.clips (goto + route per clip), got "
          f"{e.decisions}")


def env_of(config):
  e = config.env
  prm = cable.Params(n=e.particles, k=e.clips, p_snag=e.p_snag, slip_stretch=e.slip_stretch,
                     seg=1.35 / (e.particles - 1))
  ec = R.EpisodeCfg(decisions=e.decisions, steps=e.steps, res=e.res, goto_sigma=e.goto_sigma,
                    history=config.model.history)
  return prm, ec


def init_nets(key, config):
  """Initial parameters of the route and flat BC policies and the selector (one compiled function)."""
  m = config.model
  return _init_nets(key, tuple(m.widths), tuple(m.hidden), int(m.history), int(m.embed), int(m.selector_hidden))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _init_nets(key, widths, hidden, history, embed, selector_hidden):
  k1, k2, k3 = jax.random.split(key, 3)
  flat = pol.init_bc(k1, 2, 2, widths, hidden)
  route = pol.init_bc(k2, 2, 2, widths, hidden)
  sel = pol.init_selector(k3, 2 * widths[-1] + 16, P.NUM_PRIMS, history, embed, selector_hidden)
  return dict(route=route, flat=flat, sel=sel)


def make_runner(prm, ec, batch: int):
  """``runner(ids, keys, nets, modes, sigma, desc)`` -> numpy (progress, drec, srec) over layout ids, in
  batches of ``batch`` (one compiled function for every arm), with a progress bar; Ctrl-C stops between batches."""
  fn = jax.jit(jax.vmap(lambda key, lay, nets, modes, sig: R.episode(key, lay, nets, modes, sig, prm, ec),
                        in_axes=(0, 0, None, None, None)))

  def runner(ids, keys, nets, modes, sigma, desc):
    outs = []
    with progress(len(ids), desc=desc) as bar:
      for s in range(0, len(ids), batch):
        interrupt.check(f"in {desc}")
        i = np.asarray(ids[s:s + batch])
        k = keys[s:s + batch]
        n = len(i)
        if n < batch:  # pad to the compiled batch
          i = np.concatenate([i, np.repeat(i[-1:], batch - n)])
          k = jnp.concatenate([k, jnp.repeat(k[-1:], batch - n, 0)])
        lay = cable.layouts(i, prm)
        out = fn(k, lay, nets, tuple(jnp.int32(x) for x in modes), jnp.float32(sigma))
        outs.append(jax.tree.map(lambda x: np.asarray(x)[:n], out))
        bar.update(n)
    return jax.tree.map(lambda *x: np.concatenate(x), *outs)

  return runner


def _flat(x):
  return x.reshape((-1,) + x.shape[2:])


def stage_table(progress_B, k):
  return dict(stages=R.stage_success(progress_B, k), full=float((progress_B >= k).mean()))


# ------------------------------------------------------------------------------------------ the stages


def collect_demos(runner, config, seed: int, prm, nets) -> dict:
  """Stage ``s<seed>/demos``: one noisy-oracle episode per training layout 0..demos.episodes-1 (``nets``: any
  networks of the run's shapes, unused by the scripted arm). Outputs the active steps (views, grasp flag, clean
  label, primitive), the active decisions (views, grasp flag, history, oracle label) and counts."""
  E = config.demos.episodes
  keys = jnp.stack([rng_stream(seed, "demo", i) for i in range(E)])
  prog, drec, srec = runner(np.arange(E), keys, nets, ARM_MODES["scripted"], config.demos.action_sigma,
                            f"s{seed}/demos")
  drec, srec = jax.tree.map(_flat, drec), jax.tree.map(_flat, srec)
  smask, dmask = srec["active"], drec["active"]
  steps = {k: srec[k][smask] for k in ("top", "wrist", "grasped", "action", "prim")}
  decisions = {k: drec[k][dmask] for k in ("top", "wrist", "grasped", "hist", "oracle")}
  counts = np.bincount(decisions["oracle"], minlength=P.NUM_PRIMS).tolist()
  stats = dict(success=float((prog >= prm.k).mean()), steps=int(smask.sum()),
               route_steps=int((steps["prim"] == P.ROUTE).sum()), decisions=int(dmask.sum()),
               decision_counts=dict(zip(P.NAMES, counts)), slips=int(srec["slipped"].sum()),
               snags=int(srec["snagged"].sum()))
  summary_line(f"s{seed}/demos", dict(success=stats["success"], steps=stats["steps"],
                                      route_steps=stats["route_steps"], decisions=stats["decisions"])
               | stats["decision_counts"])
  return dict(steps=steps, decisions=decisions, stats=stats)


def run_seed(config, workdir: str, seed: int, runner, writer, prm, *, first: bool) -> dict:
  """One seed's stages (each skipped when finished): demos -> route BC -> flat BC -> selector -> DAgger rollouts
  -> DAgger fine-tuning -> evaluation of each arm on the held-out layouts."""
  t0 = time.time()
  tr, dg = config.train, config.dagger
  nets = init_nets(rng_stream(seed, "init"), config)
  s = f"s{seed}"
  demos = stages.run_stage(workdir, f"{s}/demos", lambda: collect_demos(runner, config, seed, prm, nets))
  steps, dec = demos["steps"], demos["decisions"]

  def bc_stage(arm, data):
    name = f"{s}/{arm}"
    params = T.train_bc(workdir, name, nets[arm], data, optim=tr.bc_optim, steps=tr.bc_steps, batch=tr.batch,
                        pad=tr.augment_shift, seed=seed, stream=arm, writer=writer)
    fit = T.bc_eval(params, data)
    summary_line(f"{name} BC, fit on its {len(data['action'])} demonstrated steps", fit)
    return dict(params=params, fit=fit)

  route_steps = {k: v[steps["prim"] == P.ROUTE] for k, v in steps.items()}
  route = stages.run_stage(workdir, f"{s}/route", lambda: bc_stage("route", route_steps))
  flat = stages.run_stage(workdir, f"{s}/flat", lambda: bc_stage("flat", steps))

  # the selector's inputs: frozen features of the flat policy's encoders
  demo_sel = {}

  def selector_data():
    if not demo_sel:
      demo_sel.update(feat=T.features(flat["params"], dec["top"], dec["wrist"], dec["grasped"]), hist=dec["hist"],
                      label=dec["oracle"])
    return demo_sel

  def sel_stage(name, params, data, optim, n_steps, stream):
    params = T.train_selector(workdir, name, params, data, optim=optim, steps=n_steps, batch=tr.batch, seed=seed,
                              stream=stream, writer=writer)
    fit = T.selector_eval(params, data)
    summary_line(f"{name}, fit on its {len(data['label'])} decisions", fit)
    return dict(params=params, fit=fit)

  sel = stages.run_stage(workdir, f"{s}/selector", lambda: sel_stage(
      f"{s}/selector", nets["sel"], selector_data(), tr.sel_optim, tr.sel_steps, "selector"))
  nets_hier = dict(route=route["params"], flat=flat["params"], sel=sel["params"])

  def dagger_rollouts():
    ids = config.demos.episodes + np.arange(dg.episodes)
    keys = jnp.stack([rng_stream(seed, "dagger", i) for i in range(dg.episodes)])
    _, drec, _ = runner(ids, keys, nets_hier, ARM_MODES["hier"], 0.0, f"{s}/dagger_rollouts")
    drec = jax.tree.map(_flat, drec)
    act = drec["active"]
    corr = {k: drec[k][act] for k in ("top", "wrist", "grasped", "hist", "oracle")}
    wrong = int((corr["oracle"] != drec["prim"][act]).sum())
    summary_line(f"{s}/dagger_rollouts", dict(decisions=int(act.sum()), corrected=wrong))
    return dict(feat=T.features(flat["params"], corr["top"], corr["wrist"], corr["grasped"]), hist=corr["hist"],
                label=corr["oracle"], corrected=wrong)

  corr = stages.run_stage(workdir, f"{s}/dagger_rollouts", dagger_rollouts)

  def dagger_stage():
    d = selector_data()
    agg = {k: np.concatenate([d[k], corr[k]]) for k in ("feat", "hist", "label")}
    return sel_stage(f"{s}/dagger", sel["params"], agg, dg.optim, dg.steps, "dagger")

  dagger = stages.run_stage(workdir, f"{s}/dagger", dagger_stage)
  nets_dagger = dict(nets_hier, sel=dagger["params"])

  eval_ids = cable.HELDOUT_BASE + np.arange(config.eval.episodes)
  eval_keys = jnp.stack([rng_stream(0, "eval", i) for i in range(config.eval.episodes)])  # every arm and seed

  def evaluate(arm, name):
    p, d, _ = runner(eval_ids, eval_keys, nets_dagger if arm == "hier_dagger" else nets_hier, ARM_MODES[arm], 0.0,
                     name)
    out = stage_table(p, prm.k) | dict(prims=d["prim"][: config.eval.strips].tolist())
    if first and arm in STRIP_ARMS:
      out["strip"] = d["top"][: config.eval.strips]
    return out

  arms = {}
  for arm in ARMS:  # the scripted demonstrator does not depend on the seed: evaluated once
    name = "eval/scripted" if arm == "scripted" else f"{s}/eval/{arm}"
    arms[arm] = stages.run_stage(workdir, name, lambda arm=arm, name=name: evaluate(arm, name),
                                 quiet=arm == "scripted" and not first)
  strips = {a: arms[a].pop("strip") for a in STRIP_ARMS if "strip" in arms[a]}
  summary_line(f"{s} held-out full-task success", {a: arms[a]["full"] for a in ARMS}
               | {"time_s": round(time.time() - t0, 1)})
  training = dict(route=route["fit"], flat=flat["fit"], selector=sel["fit"], dagger=dagger["fit"],
                  dagger_decisions=int(len(corr["label"])), dagger_corrected=int(corr["corrected"]))
  return dict(demos=demos["stats"], training=training, arms=arms, strips=strips)


def summarize(config, done: dict, t0: float) -> dict:
  """results.json from the finished seeds: per arm and stage the mean ± sample std over seeds (n), the paired
  differences of full-task success, and each seed's numbers."""
  seeds = [s for s in config.seeds if s in done]
  k = config.env.clips
  summary = {}
  for arm in ARMS:
    summary[arm] = dict(full=stages.mean_std([done[s]["arms"][arm]["full"] for s in seeds]),
                        stages=[stages.mean_std([done[s]["arms"][arm]["stages"][j] for s in seeds])
                                for j in range(k)])
  paired = {f"hier_dagger-{b}": stages.mean_std([done[s]["arms"]["hier_dagger"]["full"] - done[s]["arms"][b]["full"]
                                                 for s in seeds]) for b in ("flat_bc", "fixed_order", "hier")}
  return dict(
      method="cable_routing", variant=config.variant, seeds=seeds, heldout_episodes=int(config.eval.episodes),
      summary=summary, paired=paired,
      per_seed={str(s): {a: v for a, v in done[s]["arms"].items()} for s in seeds},
      demos={str(s): done[s]["demos"] for s in seeds}, training={str(s): done[s]["training"] for s in seeds},
      env=dict(config.env.to_dict()), primitive_names=list(P.NAMES), wall_s=round(time.time() - t0, 1))


def run(config, workdir: str):
  """The whole experiment (see the module docstring); writes results.json after each seed, metrics.jsonl, tb/,
  checkpoints/, plots/*.png."""
  validate(config)
  if config.source == "oxe":
    from lmx.methods.cable_routing import oxe

    return oxe.run_real(config, workdir)
  t0 = time.time()
  prm, ec = env_of(config)
  runner = make_runner(prm, ec, min(config.eval.batch, max(config.eval.episodes, config.demos.episodes)))
  first = config.seeds[0]
  with Writer(workdir) as writer:
    def after(done):
      res = summarize(config, done, t0)
      _plots(workdir, writer, res["summary"], done[first]["strips"] if first in done else {}, prm, len(done))

    done = stages.sweep(workdir, list(config.seeds), lambda seed: run_seed(config, workdir, seed, runner, writer,
                                                                            prm, first=seed == first),
                        lambda done: summarize(config, done, t0), after=after)
  results = summarize(config, done, t0)
  path = write_results(workdir, results)
  print(f"cable_routing: held-out full-task success over seeds {list(results['seeds'])} → {path}", flush=True)
  for arm in ARMS:
    print(f"  {arm:16s} {stages.fmt_mean_std(results['summary'][arm]['full'])}", flush=True)
  for name, ms in results["paired"].items():
    print(f"  {name:28s} {stages.fmt_mean_std(ms)}", flush=True)
  return results


def _plots(workdir, writer, summary, strips, prm, step):
  """plots/success.png (per-stage success, mean ± sample std over seeds) and the first seed's rollout strips
  (plots/rollouts_<arm>.png: the top view at each decision, one row per held-out episode), also in TensorBoard."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 3.5))
  xs = np.arange(prm.k + 1)
  w = 0.8 / len(summary)
  for i, (arm, s) in enumerate(summary.items()):
    ms = s["stages"] + [s["full"]]
    ax.bar(xs + i * w, [m["mean"] for m in ms], w, yerr=[m["std"] or 0.0 for m in ms], label=arm, capsize=2)
  ax.set_xticks(xs + 0.4 - w / 2, [f"clip {j + 1}" for j in range(prm.k)] + ["full"])
  ax.set_ylabel("success (held-out layouts)")
  ax.set_ylim(0, 1.05)
  ax.set_title(f"mean ± sample std over seeds (n={summary['scripted']['full']['n']})", fontsize=8, loc="left")
  ax.legend(fontsize=7, ncol=len(summary), loc="lower center", bbox_to_anchor=(0.5, 1.06), frameon=False)
  path = plots.save_figure(fig, plot_path(workdir, "success"))
  writer.image("plots/success", path, step)
  for arm, tops in strips.items():  # (episodes, D, H, W, 3) uint8: the top view at each decision
    x = np.asarray(tops).astype(np.float32) / 255.0
    path = plots.pixel_grid(plot_path(workdir, f"rollouts_{arm}"), x.reshape((-1,) + x.shape[2:]), nrow=x.shape[0],
                            scale=3)
    writer.image(f"plots/rollouts_{arm}", path, step)
