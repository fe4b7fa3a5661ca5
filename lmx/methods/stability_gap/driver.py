"""Stability-gap driver: a base LM on a general corpus, then continual pretraining on a domain with four data
strategies at one token budget, each evaluated every few steps (domain / general loss, probes, weight updates).

The run (see ``configs/stability_gap.py``), its training stages resumable stages of the one workdir
(:mod:`lmx.core.stages`):
  1. corpora: the general corpus (stdlib docstrings) and the domain corpus (licence texts), each split by
     document into train / validation (``lmx.datasets.text.split_documents``); size and content hash recorded;
  2. the stage ``base``: an ``lm`` training on the general train split (``base.source='pretrain'``; checkpoints in
     ``checkpoints/base/``) or the run in ``base.workdir`` (``'run'``), restored params-only (``load_run``);
  3. the n-gram quality filter (:mod:`.ngram`) fit on the general train documents ranks the domain documents;
     the lowest-perplexity 1/E (in windows) is the hq subset;
  4. a sweep of one stage ``<strategy>/s<seed>`` per seed and strategy (:mod:`.data`): continual pretraining from
     the base params with a fresh AdamW (lr re-warmup, then cosine), ``steps`` = one epoch of all domain windows for
     everyone; the eval hook every ``train.eval_every`` steps (and at step 0, the base) logs
     ``<stage>/eval/domain_ce``, ``general_ce``, the probes (:mod:`.probe`) and the relative weight update
     (:mod:`.weights`); results.json is rewritten after each stage;
  5. per strategy: max drop / recovery / final values (:mod:`.report`), mean ± std over seeds, the reduction of
     the max general-loss rise versus ``full``, curve PNGs and ``results.json``.
"""
from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from lmx.core import data as data_lib
from lmx.core import workdir as wd
from lmx.core import loop, mesh as mesh_lib, plots, stages
from lmx.core import schema
from lmx.core.config import ConfigError, require
from lmx.core import metrics as metrics_lib
from lmx.core.metrics import Writer
from lmx.core.optim import make_optimizer
from lmx.core.results import plot_path, summary_line, write_results
from lmx.datasets import text
from lmx.methods.stability_gap import data as sg_data
from lmx.methods.stability_gap import ngram, probe as probe_lib, report, weights
from lmx.train.lm import heldout_eval, lm_loss, load_base as load_lm, stage_config, unprefixed
from lmx.models.registry import build_model
from lmx.models.transformer import num_params

STEPS_FIELD = None  # the step count follows from the domain corpus (one epoch of it), not from a field
CURVES = {  # metric -> higher is better
    "general_ce": False, "domain_ce": False, "probe_general_acc": True, "probe_domain_acc": True,
    "probe_general_margin": True, "probe_domain_margin": True}


def validate(config):
  """Checks the config before anything is built (each field against its declaration in ``configs/stability_gap.py``,
  then what relates fields or needs the corpora and the model); returns the base Model (from ``base.model`` when
  pretraining, else None: the run's own config gives it once loaded)."""
  # before the schema's "unknown field": say why the optimiser has no warmup_steps
  require("warmup_steps" not in config.optim, "optim.warmup_steps",
          "is set by train.warmup_ratio (a fraction of the continual-pretraining steps); remove it")
  schema.validate(config)
  d, b, s = config.data, config.base, config.strategies
  for f in ("general", "domain"):
    require(d[f] in text.CORPORA, f"data.{f}", f"{d[f]!r} is not an embedded corpus; valid: {sorted(text.CORPORA)}")
  require(d.general != d.domain, "data.domain", f"must differ from data.general ({d.general!r})")
  if b.source == "run":
    require(bool(b.workdir), "base.workdir", "is required for base.source='run' (an lmx run's workdir)")
  names = list(s.names)
  require(len(set(names)) == len(names), "strategies.names", f"lists a strategy twice: {names}")
  seeds = list(config.seeds)
  require(all(isinstance(x, int) for x in seeds) and len(set(seeds)) == len(seeds), "seeds",
          f"must be distinct integers >= 0, got {seeds}")
  model = None
  if b.source == "pretrain":
    model = build_model(b.model, axis_rules=config.axis_rules)
    check_model(config, model)
  elif not os.path.isdir(os.path.join(os.path.expanduser(b.workdir), "checkpoints")):
    raise FileNotFoundError(f"base.workdir={b.workdir!r} has no checkpoints/: name the workdir of a finished lmx "
                            "run (e.g. an lm run on the general corpus), or set base.source='pretrain'")
  return model


def check_model(config, model, field: str = "base.model") -> None:
  """The base model against the data and probe lengths and the byte tokenizer."""
  cfg = model.cfg
  require(config.data.seq_len <= cfg.max_seq_len, "data.seq_len",
          f"{config.data.seq_len} exceeds {field}.max_seq_len={cfg.max_seq_len}")
  n = config.probe.context_len + config.probe.cont_len - 1
  require(n <= cfg.max_seq_len, "probe.context_len",
          f"context_len + cont_len - 1 = {n} exceeds {field}.max_seq_len={cfg.max_seq_len}")
  require(cfg.vocab_size >= text.VOCAB_SIZE, f"{field}.vocab_size", f"must be >= {text.VOCAB_SIZE} (byte tokenizer)")
  require(cfg.n_layers >= 2 * config.weights.k, "weights.k",
          f"bottom-k/top-k needs 2k <= n_layers = {cfg.n_layers}, got k={config.weights.k}")


# ------------------------------------------------------------------------------------------ pieces


def load_corpora(config) -> dict:
  """Both corpora split by document: ``{general: (train, eval), domain: (train, eval), info: {...}}``."""
  d = config.data
  out, info = {}, {}
  for role in ("general", "domain"):
    name = d[role]
    try:
      docs = text.DOCUMENTS[name]()
    except (OSError, ImportError) as e:
      raise ConfigError(f"data.{role}={name!r}: the corpus cannot be read on this machine ({e})") from None
    ci = text.corpus_info(name)
    if role == "domain" and ci["chars"] < d.min_domain_chars:
      raise ConfigError(
          f"data.domain={name!r} has {ci['chars']:,} characters on this machine ({ci['documents']} documents), "
          f"fewer than data.min_domain_chars={d.min_domain_chars:,}: the licence corpus is read from installed "
          f"packages and {text.COMMON_LICENSES}; install the project ('pip install -e .[test]') or choose another "
          "data.domain")
    capped = None
    if role == "domain" and d.max_domain_chars:  # a smaller domain (CI): documents in corpus order up to the cap
      kept, n = [], 0
      for doc in docs:
        if n + len(doc[1]) <= d.max_domain_chars:
          kept.append(doc)
          n += len(doc[1])
      docs, capped = tuple(kept), {"max_domain_chars": d.max_domain_chars, "documents_kept": len(kept),
                                   "chars_kept": n}
    train, held = text.split_documents(docs, d.eval_fraction, d.split_seed)
    out[role] = (train, held)
    info[role] = {**ci, "capped": capped, "train_documents": len(train), "eval_documents": len(held),
                  "train_chars": sum(len(t) for _, t in train), "eval_chars": sum(len(t) for _, t in held),
                  "eval_document_ids": [k for k, _ in held]}
  out["info"] = {**info, "split": {"split": "document", "seed": d.split_seed, "eval_fraction": d.eval_fraction}}
  return out


def base_lm_config(config):
  """The ``lm`` run config that pretrains the base in-process on the general corpus's train split."""
  d = config.data
  return stage_config(config, variant="stability_gap_base", model=config.base.model, optim=config.base.optim,
                      data=dict(corpus=d.general, seq_len=d.seq_len, global_batch=d.global_batch,
                                eval_fraction=d.eval_fraction, split="document", split_seed=d.split_seed,
                                shuffle_seed=int(config.seed), worker_count=d.worker_count),
                      steps=config.base.steps, seed=config.seed)


def load_base(config, workdir: str, mesh, writer):
  """``(model, params, info)``: pretrained as the stage ``base`` of the run in ``workdir`` (skipped when finished)
  or read from the run in ``base.workdir``."""
  b = config.base
  model, params, info = load_lm(b.source, mesh=mesh, axis_rules=config.axis_rules,
                                stage=base_lm_config(config) if b.source == "pretrain" else None,
                                workdir=workdir, writer=writer, run_dir=b.workdir)
  bdir = info.get("workdir", workdir)
  if b.source == "run":
    base_cfg = wd.saved_config(bdir) or {}
    data_cfg = base_cfg.get("data", {})  # an lm run's corpus, or a stability_gap run's general corpus
    corpus = data_cfg.get("corpus", data_cfg.get("general", config.data.general))
    require(corpus == config.data.general, "base.workdir",
            f"the run in {bdir} was trained on {corpus!r}, not data.general={config.data.general!r}")
  check_model(config, model, field="base.model" if b.source == "pretrain" else f"{bdir}: model")
  return model, params, info


def select_hq(config, general_train, domain_train, n_windows: int):
  """The n-gram filter: fit on the general train docs, rank the domain train docs, take the lowest-perplexity
  documents until they hold ``n_windows`` windows. ``(windows, taken indices, info)``."""
  t0 = time.time()
  lm = ngram.fit([t for _, t in general_train], order=config.ngram.order, add_k=config.ngram.add_k)
  order, ppl = ngram.rank_by_perplexity(lm, [t for _, t in domain_train])
  pool, taken = sg_data.take_documents(domain_train, order, n_windows, config.data.seq_len)
  sel = ppl[taken]
  info = {"kind": f"byte {config.ngram.order}-gram, add-k (k={config.ngram.add_k}), fit on data.general train",
          "wall_s": time.time() - t0, "domain_ppl": {q: float(np.quantile(ppl, float(q))) for q in
                                                      ("0", "0.25", "0.5", "0.75", "1")},
          "hq_documents": len(taken), "hq_ppl_max": float(sel.max()), "hq_ppl_mean": float(sel.mean()),
          "hq_first_ids": [domain_train[i][0] for i in taken[:10]],
          "highest_ppl_ids": [domain_train[i][0] for i in order[-5:][::-1]]}
  return pool, taken, info


def make_step(optim_cfg, steps: int, model, mesh, rules, init_params):
  """``(step_fn, init_fn, state_shardings)`` of continual pretraining: the LM loss (``lm_loss``), a fresh
  optimiser over ``steps`` (its warmup is the lr re-warmup) and the state initialised by ``init_params(key)``."""
  tx, schedule = make_optimizer(optim_cfg, steps)
  abstract = model.abstract_params()
  shardings = loop.optax_shardings(model.shardings(mesh, rules), tx, abstract, mesh)
  return loop.optax_step(lm_loss(model), tx, schedule), (lambda key: loop.optax_state(init_params(key), tx)), \
      shardings


def cpt_optim(config, steps: int):
  """``config.optim`` with ``warmup_steps = round(train.warmup_ratio · steps)``."""
  o = ml_collections.ConfigDict(config.optim.to_dict())
  o.warmup_steps = int(round(config.train.warmup_ratio * steps))
  return o


def make_evaluator(config, model, base_params, corpora, divisor: int, batch_sharding):
  """``evaluate(params) -> dict`` of the eval metrics (all jitted once, shared by every strategy run)."""
  d, p = config.data, config.probe
  n_windows = config.train.eval_batches * d.global_batch
  ce = {role: heldout_eval(model, sg_data.windows(corpora[role][1], d.seq_len), n_windows=n_windows,
                           divisor=divisor, batch_sharding=batch_sharding).ce for role in ("general", "domain")}
  probes = {role: probe_lib.make_probe(model.apply, probe_lib.make_items(
      corpora[role][1], n_items=p.n_items, context_len=p.context_len, cont_len=p.cont_len, n_distractors=p.distractors,
      seed=p.seed, name=f"probe_{role}")) for role in ("general", "domain")}
  k = config.weights.k

  def evaluate(params):
    out = {f"{role}_ce": ce[role](params) for role in ce}
    for role, f in probes.items():
      for key, v in f(params).items():
        out[f"probe_{role}_{key}"] = v
    rel = weights.relative_update(params, base_params)
    out.update({f"relupd/{g}": v for g, v in rel.items()})
    out["relupd_ratio"] = weights.bottom_top_ratio(rel, k) if any(v > 0 for v in rel.values()) else float("nan")
    return out

  return evaluate


def eval_curves(workdir: str, stage: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``{metric: (steps, values)}`` of a strategy stage's ``<stage>/eval/*`` records (last record per step)."""
  return metrics_lib.curves(os.path.join(workdir, "metrics.jsonl"), prefix=f"{stage}/eval/")


def run_stats(curves: dict) -> dict:
  """One run's numbers: gap statistics of every :data:`CURVES` metric, final domain CE, weight ratios."""
  out = {}
  for m, higher in CURVES.items():
    g = report.gap_stats(*curves[m], higher_is_better=higher)
    out.update({f"{m}_{k}": v for k, v in g.items()})
  steps, ratio = curves["relupd_ratio"]
  finite = np.isfinite(ratio)
  out["relupd_ratio_first"] = float(ratio[finite][0]) if finite.any() else None
  out["relupd_ratio_final"] = float(ratio[-1]) if np.isfinite(ratio[-1]) else None
  return out


# ------------------------------------------------------------------------------------------ the run


def run(config, workdir: str) -> dict:
  validate(config)
  d, t = config.data, config.train
  t_start = time.time()
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = config.axis_rules
  divisor = mesh_lib.batch_size_divisor(mesh, rules)
  require(d.global_batch % divisor == 0, "data.global_batch",
          f"{d.global_batch} must be divisible by the batch mesh axes' size {divisor}")
  corpora = load_corpora(config)  # before the base: a missing domain corpus stops the run before any training
  os.makedirs(workdir, exist_ok=True)
  writer = Writer(workdir, console_exclude=r"relupd/")
  try:
    model, base_params, base_info = load_base(config, workdir, mesh, writer)
    model.cfg.check_mesh(dict(mesh.shape))
    s = config.strategies
    domain_pool = sg_data.windows(corpora["domain"][0], d.seq_len)
    hq, hq_docs, ngram_info = select_hq(config, corpora["general"][0], corpora["domain"][0],
                                        len(domain_pool) // s.epochs)
    pools = sg_data.Pools(domain=domain_pool, general=sg_data.windows(corpora["general"][0], d.seq_len), hq=hq,
                          hq_docs=hq_docs, domain_docs=corpora["domain"][0], seq_len=d.seq_len, epochs=s.epochs)
    steps = sg_data.budget_steps(pools, d.global_batch)
    optim_cfg = cpt_optim(config, steps)
    bsh = mesh_lib.batch_sharding(mesh, rules)
    evaluate = make_evaluator(config, model, base_params, corpora, divisor, bsh)
    start = evaluate(base_params)
    n_params = num_params(model.abstract_params())
    print(f"stability_gap: base {n_params:,} params ({base_info['source']}; general CE {start['general_ce']:.3f}, "
          f"domain CE {start['domain_ce']:.3f} nats/byte); budget {steps} steps x {d.global_batch} x {d.seq_len} "
          f"tokens = one epoch of {len(domain_pool)} domain windows; subsets of {pools.subset_windows} windows x "
          f"{s.epochs} epochs; strategies {', '.join(s.names)}; seeds {', '.join(map(str, config.seeds))}; "
          f"workdir {workdir}", flush=True)
    tokens = steps * d.global_batch * d.seq_len
    head = {
        "method": "stability_gap", "variant": config.variant, "params": n_params, "seeds": list(config.seeds),
        "strategies": list(s.names), "corpora": corpora["info"], "base": base_info, "start": start,
        "ngram": ngram_info,
        "budget": {"steps": steps, "global_batch": d.global_batch, "seq_len": d.seq_len, "tokens": tokens,
                   "domain_train_windows": len(domain_pool), "subset_windows": pools.subset_windows,
                   "epochs": s.epochs, "domain_ratio": s.domain_ratio, "warmup_steps": optim_cfg.warmup_steps}}

    def cell(c):
      name, seed = c
      return run_strategy(config, name, seed, workdir, model=model, base_params=base_params, pools=pools,
                          steps=steps, optim_cfg=optim_cfg, mesh=mesh, bsh=bsh, evaluate=evaluate, start=start,
                          writer=writer)

    cells = [(name, int(seed)) for seed in config.seeds for name in s.names]
    done = stages.sweep(workdir, cells, cell, lambda done: summarize_runs(head, done, s.names),
                        after=lambda done: plot_curves(workdir, config, done, writer) if t.plot else None)
    results = {**summarize_runs(head, done, s.names), "wall_s": time.time() - t_start}
    path = write_results(workdir, results)
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(report.markdown(results))
  finally:
    writer.close()
  hm = results["drop_reduction_vs_full"].get("hq_mix", {}).get("general_ce", {})
  summary_line("stability_gap", {
      **{f"{st} max general CE rise": results["summary"][st]["general_ce_max_drop"]["mean"] for st in s.names},
      "hq_mix reduction vs full": hm.get("of_means"), "beyond noise": hm.get("beyond_noise")}, path)
  return results


def summarize_runs(head: dict, done: dict, names) -> dict:
  """results.json from the finished strategy stages ``done`` (``{(strategy, seed): outputs}``): per seed, the
  mean ± std over the seeds whose every strategy finished, and the reductions versus ``full``."""
  per_seed, infos = {}, {}
  for (name, seed), r in done.items():
    per_seed.setdefault(seed, {})[name] = r["stats"]
    infos[stages.cell_name((name, seed))] = r["data"]
  complete = {seed: row for seed, row in per_seed.items() if all(n in row for n in names)}
  out = {**head, "budget": {**head["budget"], "tokens_by_run": {k: v["tokens"] for k, v in infos.items()}},
         "runs": infos, "per_seed": {str(k): v for k, v in per_seed.items()},
         "summary": {}, "drop_reduction_vs_full": {}}
  if complete:
    keys = sorted(next(iter(next(iter(complete.values())).values())))
    out["summary"] = report.summarize(complete, keys)
    if "full" in names:
      # 1 − (max general drop of the strategy) / (that of 'full')
      out["drop_reduction_vs_full"] = {
          st: {m: report.reduction(complete, f"{m}_max_drop", st, "full")
               for m in ("general_ce", "probe_general_acc", "probe_general_margin")}
          for st in ("hq", "hq_mix", "random", "full_mix") if st in names}
  return out


def run_strategy(config, name: str, seed: int, workdir: str, *, model, base_params, pools, steps: int, optim_cfg,
                 mesh, bsh, evaluate, start, writer) -> dict:
  """Continual pretraining of the base with strategy ``name`` at ``seed``: the stage ``<name>/s<seed>`` of the run
  in ``workdir`` (checkpoints in ``checkpoints/<name>/s<seed>/``); returns its statistics."""
  d, t, s = config.data, config.train, config.strategies
  stage = stages.cell_name((name, seed))
  ds, info = sg_data.strategy_stream(name, pools, steps=steps, global_batch=d.global_batch, seed=seed,
                                     domain_ratio=s.domain_ratio, resample=s.resample_each_epoch)
  assert info["items"] == steps * d.global_batch  # the equal token budget, by construction
  local = sg_data.batched(ds, d.global_batch, process_index=jax.process_index(), process_count=jax.process_count())
  batches = data_lib.GlobalBatches(data_lib.make_iterator(local, worker_count=d.worker_count), bsh)
  # every run starts from the base's parameters (a copy inside the init: the state's buffers are donated)
  step_fn, init_fn, shardings = make_step(optim_cfg, steps, model, mesh, config.axis_rules,
                                          lambda key: jax.tree.map(lambda x: x + 0, base_params))
  writer.scalars(0, start, prefix=f"{stage}/eval/")  # the base, shared by every strategy: the curves' start

  def eval_hook(step, state, w):  # every metric to metrics.jsonl / TensorBoard, the main ones to the console
    out = evaluate(state["params"])
    w.scalars(step, out, prefix=f"{stage}/eval/")
    if w.enabled:
      tqdm.write(f"[{stage} step {step}/{steps}] held-out CE (nats/byte): general {out['general_ce']:.3f}, domain "
                 f"{out['domain_ce']:.3f}; probe accuracy: general {out['probe_general_acc']:.2f}, domain "
                 f"{out['probe_domain_acc']:.2f}")

  res = stages.train(workdir, stage, writer=writer, total_steps=steps, step_fn=step_fn, init_fn=init_fn,
                     state_shardings=shardings, mesh=mesh, seed=seed, data=batches, config=config,
                     hooks=[loop.every(t.eval_every, eval_hook, name=f"{stage}/eval")],
                     log_every=t.log_every, ckpt_keep=t.ckpt_keep, async_checkpointing=t.async_checkpointing,
                     desc=f"{name} s{seed}", items_per_step=d.global_batch * d.seq_len)
  return {"strategy": name, "seed": seed, "steps": steps, "data": info, "stats": run_stats(eval_curves(workdir, stage)),
          "final_train": unprefixed(res.last_metrics, f"{stage}/"), "steps_per_sec": res.steps_per_sec,
          "compile_wall_s": res.compile_seconds}


def plot_curves(workdir: str, config, done: dict, writer) -> list[str]:
  """One PNG per metric, and all of them as panels of ``plots/curves.png``: each strategy's mean over the finished
  seeds with a ± std band (sample std; none with one seed); each also sent to TensorBoard."""
  import matplotlib.pyplot as plt  # lmx.core.plots has selected the Agg backend

  paths, panels = [], {}
  n_seeds = len({seed for _, seed in done})
  for m in list(CURVES) + ["relupd_ratio"]:
    series, bands = {}, {}
    for name in config.strategies.names:
      runs = [eval_curves(workdir, stages.cell_name(c)).get(m) for c in done if c[0] == name]
      runs = [r for r in runs if r is not None]
      if not runs:
        continue
      steps = runs[0][0]
      ms = [stages.mean_std(col) for col in np.stack([np.interp(steps, r[0], r[1]) for r in runs]).T]
      series[name] = (steps, np.array([x["mean"] if x["mean"] is not None else np.nan for x in ms]))
      bands[name] = np.array([x["std"] or 0.0 for x in ms])
    if series:
      paths.append(plots.curves(plot_path(workdir, m), series, bands=bands, ylabel=m,
                                title=f"{m} during continual pretraining ({n_seeds} seed(s))"))
      panels[m] = (series, bands)
  if panels:
    fig, axes = plt.subplots(2, (len(panels) + 1) // 2, figsize=(4.2 * ((len(panels) + 1) // 2), 7), squeeze=False)
    for ax, (m, (series, bands)) in zip(axes.ravel(), panels.items()):
      for name, (xs, ys) in series.items():
        ax.plot(xs, ys, label=name)
        ax.fill_between(xs, ys - bands[name], ys + bands[name], alpha=0.2)
      ax.set(title=m, xlabel="step")
      ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(panels):]:
      ax.axis("off")
    axes.ravel()[0].legend()
    fig.suptitle(f"continual pretraining from the base, mean ± std over {n_seeds} seed(s)")
    paths.append(plots.save_figure(fig, plot_path(workdir, "curves"), dpi=110))
  for path in paths:
    writer.image(f"plots/{os.path.splitext(os.path.basename(path))[0]}", path, len(done))
  return paths
