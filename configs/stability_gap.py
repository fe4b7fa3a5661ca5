r"""Efficient continual pretraining and the stability gap (Guo et al. 2024, arXiv 2406.14833) in miniature.

  python launch/run.py --config=configs/stability_gap.py --workdir=runs/sg
  python launch/run.py --config=configs/stability_gap.py:smoke --workdir=runs/sg-smoke
  python launch/run.py --config=configs/stability_gap.py --config.seeds="(0,)" --workdir=runs/sg-1seed

Variants: ``smoke`` (CI) and the default (CPU-sized: base pretraining plus four strategies x three seeds).

Stages (named stages of the one workdir, each skipped when finished): (1) general corpus = the CPython stdlib
docstrings, domain corpus = licence texts present on the machine (``lmx.datasets.text``), both split by document;
(2) ``base``: ``base.source='pretrain'`` trains an ``lm`` model on the general train split (checkpoints in
``checkpoints/base/``); ``'run'`` restores the params of the lmx run in ``base.workdir``; (3) one stage
``<strategy>/s<seed>`` per seed and strategy of ``strategies.names``: continual pretraining for the same number of
steps (one epoch of all domain windows), lr re-warmup (``train.warmup_ratio``) then cosine, eval every
``train.eval_every`` steps:
  full     all domain windows, 1 epoch                                       (a)
  random   a random 1/epochs of the domain documents, ``epochs`` epochs       (b)
  hq       the lowest byte-5-gram-perplexity 1/epochs (n-gram fit on the general corpus), ``epochs`` epochs (c)
  hq_mix   hq with general replay: each epoch ``domain_ratio`` hq + the rest general windows, redrawn per epoch (d)
  full_mix (a control, not in the default list) all domain windows with the same general replay
``strategies.domain_ratio`` = 0.82: the paper replaces the Llama mixture's CC + C4 share (82%) by domain tokens.
"""
from lmx.core import blocks
from lmx.core.config import parse_arg
from lmx.core.mesh import DEFAULT_AXIS_RULES
from lmx.core.schema import F, build

VARIANTS = ("", "smoke")
# The data strategies of lmx.methods.stability_gap.data (a test checks them against it).
STRATEGIES = ("full", "random", "hq", "hq_mix", "full_mix")

_COUNT = dict(ge=1, integer=True)  # a positive whole number


def get_config(arg=None):
  a = parse_arg(arg, variant="", variants=VARIANTS, seed=0)
  c = build("stability_gap", dict(
      variant=F(a.variant, choices=VARIANTS),
      seed=F(a.seed, ge=0, integer=True, doc="the base's seed (init and data order)"),
      # continual-pretraining seeds: data order, the random subset, the replay draws (each distinct)
      seeds=F((0, 1, 2), each=dict(ge=0, integer=True), nonempty=True),
      mesh=blocks.mesh(),
      axis_rules=F(DEFAULT_AXIS_RULES, safe=True),
      base=dict(
          # 'pretrain' (an lm training, the stage 'base') | 'run' (restore base.workdir's params)
          source=F("pretrain", choices=("pretrain", "run")),
          workdir=F("", doc="source='run': an lm run on data.general, or another stability_gap run (its base stage)"),
          steps=F(500, **_COUNT),
          model=blocks.transformer(
              vocab_size=260, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=192, max_seq_len=64,
              tie_embeddings=False, dtype="float32", param_dtype="float32", remat="none", attention_impl="xla"),
          optim=blocks.optim(name="adamw", lr=3e-3, warmup_steps=50, min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
                             weight_decay=0.1, clip_norm=1.0)),
      data=dict(
          general=F("stdlib_docstrings", doc="an embedded corpus (lmx.datasets.text.CORPORA)"),
          domain=F("legal", doc="an embedded corpus (lmx.datasets.text.CORPORA), not data.general"),
          min_domain_chars=F(100_000, **_COUNT),  # fewer characters of domain text on this machine: a ConfigError
          max_domain_chars=F(0, ge=0, integer=True),  # > 0: keep documents (corpus order) up to this many characters
          seq_len=F(64, **_COUNT),
          global_batch=F(32, **_COUNT),
          eval_fraction=F(0.05, gt=0, lt=1),
          split_seed=0,
          worker_count=F(0, ge=0, integer=True)),
      ngram=dict(order=F(5, ge=2, le=7, integer=True), add_k=F(0.1, gt=0)),
      strategies=dict(
          names=F(("full", "random", "hq", "hq_mix"), each=dict(choices=STRATEGIES), nonempty=True),
          epochs=F(4, **_COUNT, doc="the subsets hold 1/epochs of the domain"),
          # the domain share of a mixture epoch; the rest is general replay
          domain_ratio=F(0.82, gt=0, lt=1),
          resample_each_epoch=True),
      # Continual pretraining: the paper's AdamW (0.9, 0.95), weight decay 0.01, cosine with warmup ratio 0.1; the
      # lr is a tiny model's (the paper: 3e-4 for 1.1B, 3e-5 for 3B; smaller models want larger rates). No
      # warmup_steps: train.warmup_ratio sets it from the continual-pretraining steps.
      optim={k: spec for k, spec in blocks.optim(
          name="adamw", lr=1e-3, min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01,
          clip_norm=1.0).items() if k != "warmup_steps"},
      probe=dict(n_items=F(48, **_COUNT), distractors=F(3, **_COUNT), context_len=F(48, **_COUNT),
                 cont_len=F(16, **_COUNT), seed=0),
      weights=dict(k=1),  # bottom-k / top-k blocks (the paper: 5 of 26)
      # eval_every / eval_batches shape the reported curves, so they are not safe to change on resume
      train=dict(
          warmup_ratio=F(0.1, ge=0, lt=1),
          log_every=F(25, **_COUNT, safe=True),
          eval_every=F(10, **_COUNT),
          eval_batches=F(2, **_COUNT),
          ckpt_keep=F(1, **_COUNT, safe=True),
          async_checkpointing=F(False, safe=True),
          plot=F(True, safe=True)),
  ))

  if a.variant == "smoke":
    c.seeds = (0,)
    c.base.update(steps=30)
    c.base.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64)
    c.base.optim.update(warmup_steps=5)
    c.data.update(seq_len=32, global_batch=8, general="python_docs", eval_fraction=0.1, max_domain_chars=20_000)
    c.probe.update(n_items=8, context_len=16, cont_len=8)
    c.strategies.update(epochs=2)
    c.train.update(log_every=20, eval_every=40, eval_batches=1)
  return c
