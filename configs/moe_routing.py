r"""MoE routing phases ("Three Phases of Expert Routing", Mouzouni 2026): γ_eff, load balance and their evolution
over checkpoints, for lmx's MoE trained here or for any MoE's exported routing records.

  python launch/run.py --config=configs/moe_routing.py --workdir=runs/moe-default
  python launch/run.py --config=configs/moe_routing.py:smoke --workdir=runs/moe-smoke
  python launch/run.py --config=configs/moe_routing.py:analyze --config.routing_dir=D --workdir=runs/moe-analyze
  python tools/export_hf_routing.py --model=allenai/OLMoE-1B-7B-0924 --revision=... --out=D/olmoe  # then analyze

Variants: default (CPU-sized: three 600-step MoE LMs, one per load-balancing weight), ``smoke`` (CI: tiny, two
arms), ``analyze`` (no training: analyse the routing ``.npz`` files under ``routing_dir``; see
lmx/methods/moe_routing/records.py for the format), ``olmoe`` (the OLMoE-1B-7B MoE shape with its 0.01
load-balancing weight, for an accelerator; its train step lowers for cuda in the slow test).

Stages (default/smoke; named stages of the one workdir, each skipped when finished): for each ``sweep.lb_loss_coef``
w, ``lb<w>``: an MoE LM (configs/lm.py's ``moe`` model, smaller) trained from scratch on the embedded corpus
(checkpoints in ``checkpoints/lb<w>/``) with a params-only snapshot at every step of ``routing.ckpt_steps`` (dense
early, sparse later) in ``snapshots/lb<w>/``; then ``routing/lb<w>``: per snapshot (restored params-only) the routing
records of ``routing.n_batches`` fixed held-out batches, written to ``routing/lb<w>/step_S/layer_L.npz``; then the
analysis of ``routing/`` (exactly what ``analyze`` does on a directory).
"""
import dataclasses
import os

from lmx.core import blocks, schema
from lmx.core.config import load_config_file, parse_arg
from lmx.core.schema import F, build

VARIANTS = ("", "smoke", "analyze", "olmoe")
# congestion functions φ of the routing game (lmx.methods.moe_routing.estimators.PHIS; a test checks them)
PHIS = ("linear", "log")
# Of the LM training cadence a resume may change the logging, evaluation and plotting (not the checkpointing).
TRAIN_SAFE = ("log_every", "eval_every", "eval_batches", "plot")

_COUNT = dict(ge=1, integer=True)  # a positive whole number


def _lm(variant: str):
  return load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"lm.py:{variant}"))


LM_ONLY = ("text_file", "tokenizer")  # configs/lm.py data fields this method does not read


def get_config(arg=None):
  a = parse_arg(arg, variant="", variants=VARIANTS, seed=0)
  # The arms are trained as configs/lm.py trains its MoE (mesh, rules, model, data, optimiser, loop blocks from
  # there); this file states what moe_routing changes.
  lm = _lm("moe")
  train = blocks.lm_train(**dict(lm.train, steps=600, log_every=50, eval_every=200, eval_batches=4, ckpt_every=200,
                                 ckpt_keep=1, async_checkpointing=False))
  c = build("moe_routing", dict(
      variant=F(a.variant, choices=VARIANTS),
      seed=F(a.seed, ge=0, integer=True),
      mesh=blocks.mesh(**lm.mesh),
      axis_rules=F(lm.axis_rules, safe=True),
      # CPU-sized MoE: 2 layers of 8 experts, top-2, dropless; aux losses summed over layers (Switch style); the
      # load-balancing weight is set per arm by the sweep.
      model=blocks.transformer(**dict(lm.model, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192,
                                      moe_d_ff=128, max_seq_len=64, moe_stats_per_expert=False)),
      # 10 % of the documents held out: the routing batches (50 x 8 windows) come from there
      # bytes of an embedded corpus (configs/lm.py's data block without its text_file / tokenizer)
      data=schema.block_of("lm", "data", exclude=LM_ONLY, **{
          **{k: v for k, v in lm.data.items() if k not in LM_ONLY}, "seq_len": 64, "global_batch": 16,
          "eval_fraction": 0.1}),
      optim=blocks.optim(**lm.optim),
      train={k: dataclasses.replace(spec, safe=k in TRAIN_SAFE) for k, spec in train.items()},
      # analyze: a directory of routing files (step_<S>/layer_<L>.npz, or sub-folders of runs holding them)
      routing_dir="",
      # one arm per load-balancing weight (distinct; the driver checks)
      sweep=dict(lb_loss_coef=F((0.0, 0.01, 0.1), each=dict(ge=0), nonempty=True)),
      routing=dict(
          # params-only snapshots: every 10 steps early (the surge region), then sparser; >= 2 strictly
          # increasing steps in [1, train.steps] (the driver checks)
          ckpt_steps=F((10, 20, 30, 40, 60, 80, 100, 130, 160, 200, 250, 300, 400, 500, 600), each=_COUNT),
          # fixed held-out text batches (the paper bootstraps over 50): at least a fit and a held-out half
          n_batches=F(50, ge=2, integer=True),
          batch_windows=F(8, **_COUNT)),  # windows of data.seq_len tokens per batch
      analysis=dict(
          n_types=F(4, **_COUNT),  # token types (k-means clusters) of the multi-type extension
          sigma=F(1.0, gt=0),  # logit-response temperature of the game (1: logit units) [reconstructed]
          # congestion φ(ρ) for γ_eff: 'linear' (default) or 'log' (γ is then τ − σ exactly)
          phi=F("linear", choices=PHIS),
          # the L1 fit's search interval (gamma_lo < gamma_hi): γ >= 0 (congestion; below 0 the damped fixed
          # point is unstable once |γ|·max ρ > σ); a fit at a bound is flagged (at 0: the routing is sharper than
          # softmax(q/σ))
          gamma_lo=0.0, gamma_hi=200.0,
          iters=F(400, **_COUNT),  # damped fixed-point iterations of the equilibrium
          n_boot=F(1000, **_COUNT)),  # bootstrap resamples over batches
  ))

  if a.variant == "smoke":
    c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, n_experts=4, moe_d_ff=32)
    c.data.update(seq_len=32, global_batch=8)
    c.optim.update(warmup_steps=5)
    c.train.update(steps=30, log_every=10, eval_every=30, eval_batches=1, ckpt_every=30)
    c.sweep.lb_loss_coef = (0.0, 0.1)
    c.routing.update(ckpt_steps=(10, 20, 30), n_batches=4, batch_windows=4)
    c.analysis.update(n_boot=200, iters=200)
  elif a.variant == "olmoe":
    # OLMoE-1B-7B's MoE (configs/lm.py:moe_1b7b): 16 layers of 64 experts, top-8, weight 0.01; for an
    # accelerator (the checkpoint schedule dense in the surge region, as the paper's 20 checkpoints).
    big = _lm("moe_1b7b")
    for f in ("mesh", "model", "data", "optim"):
      c[f] = big[f]
    c.train.update(steps=50_000, log_every=50, eval_every=2000, ckpt_every=1000, ckpt_keep=2,
                   async_checkpointing=True)
    c.sweep.lb_loss_coef = (0.01,)
    c.routing.update(ckpt_steps=(500, 1000, 2000, 3000, 4000, 6000, 8000, 10_000, 15_000, 20_000, 25_000, 30_000,
                                 35_000, 40_000, 45_000, 50_000), n_batches=50, batch_windows=8)
  elif a.variant == "analyze":
    c.analysis.update(n_boot=1000)
  return c
