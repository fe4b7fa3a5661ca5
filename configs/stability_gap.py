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
import ml_collections

from lmx.core.config import parse_arg
from lmx.core.mesh import DEFAULT_AXIS_RULES

VARIANTS = ("", "smoke")


def get_config(arg=None):
  a = parse_arg(arg, variant="", variants=VARIANTS, seed=0)
  c = ml_collections.ConfigDict()
  c.method = "stability_gap"
  c.variant = a.variant
  c.seed = a.seed  # the base's seed (init and data order)
  c.seeds = (0, 1, 2)  # continual-pretraining seeds: data order, the random subset, the replay draws
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1, expert=1))
  c.axis_rules = DEFAULT_AXIS_RULES

  c.base = ml_collections.ConfigDict(dict(
      source="pretrain",  # 'pretrain' (an lm training, the stage 'base') | 'run' (restore base.workdir's params)
      workdir="",  # source='run': an lm run on data.general, or another stability_gap run (its base stage)
      steps=500,
      model=ml_collections.ConfigDict(dict(
          vocab_size=260, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=192, max_seq_len=64,
          tie_embeddings=False, dtype="float32", param_dtype="float32", remat="none", attention_impl="xla")),
      optim=ml_collections.ConfigDict(dict(
          name="adamw", lr=3e-3, warmup_steps=50, min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
          weight_decay=0.1, clip_norm=1.0))))

  c.data = ml_collections.ConfigDict(dict(
      general="stdlib_docstrings", domain="legal",  # embedded corpora (lmx.datasets.text)
      min_domain_chars=100_000,  # fewer characters of domain text on this machine: a ConfigError
      max_domain_chars=0,  # > 0: keep documents (corpus order) up to this many characters (smoke)
      seq_len=64, global_batch=32, eval_fraction=0.05, split_seed=0, worker_count=0))

  c.ngram = ml_collections.ConfigDict(dict(order=5, add_k=0.1))

  c.strategies = ml_collections.ConfigDict(dict(
      names=("full", "random", "hq", "hq_mix"), epochs=4, domain_ratio=0.82, resample_each_epoch=True))

  # Continual pretraining: the paper's AdamW (0.9, 0.95), weight decay 0.01, cosine with warmup ratio 0.1; the lr
  # is a tiny model's (the paper: 3e-4 for 1.1B, 3e-5 for 3B; smaller models want larger rates).
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01, clip_norm=1.0))

  c.probe = ml_collections.ConfigDict(dict(n_items=48, distractors=3, context_len=48, cont_len=16, seed=0))
  c.weights = ml_collections.ConfigDict(dict(k=1))  # bottom-k / top-k blocks (the paper: 5 of 26)

  c.train = ml_collections.ConfigDict(dict(
      warmup_ratio=0.1, log_every=25, eval_every=10, eval_batches=2, ckpt_keep=1, async_checkpointing=False,
      plot=True))

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
