r"""Plain language-model pretraining on an embedded corpus (the runtime's end-to-end proof).

  python launch/run.py --config=configs/lm.py:smoke --workdir=runs/lm-smoke
  python launch/run.py --config=configs/lm.py --config.train.steps=500

Variants: ``smoke`` (CI), default (CPU-sized), ``moe`` (CPU-sized mixture-of-experts), and accelerator-sized
``125m``, ``1b``, ``moe_1b7b`` (same code, bigger numbers).
"""
from lmx.core import blocks
from lmx.core.config import parse_arg
from lmx.core.mesh import DEFAULT_AXIS_RULES
from lmx.core.schema import F, build

VARIANTS = ("", "smoke", "moe", "125m", "1b", "moe_1b7b")


def get_config(arg=None):
  a = parse_arg(arg, variant="", variants=VARIANTS, seed=0)
  c = build("lm", dict(
      # the variant this file built (get_config refuses others); LM pretraining stages of other methods name theirs
      variant=F(a.variant),
      seed=F(a.seed, ge=0, integer=True),
      # Mesh axis sizes; -1 fills the remaining devices. One list of logical-axis rules maps parameter names and
      # the batch ("batch": the mesh axes batches and activations are split over) to mesh axes.
      mesh=blocks.mesh(),
      axis_rules=F(DEFAULT_AXIS_RULES, safe=True),
      # the transformer (lmx.models.transformer.TransformerConfig checks it; numerics-neutral choices may change
      # on resume: attention kernel, rematerialisation, MoE implementation)
      model=blocks.transformer(
          vocab_size=260, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384, max_seq_len=256,
          tie_embeddings=False, dtype="float32", param_dtype="float32", remat="none", attention_impl="xla"),
      data=dict(
          corpus=F("python_docs", doc="an embedded corpus of lmx.datasets.text.CORPORA"),
          seq_len=F(128, ge=1, integer=True),
          global_batch=F(32, ge=1, integer=True),
          # validation: whole documents held out at random (split_seed), ~eval_fraction of the text
          eval_fraction=F(0.05, gt=0, lt=1),
          split=F("document", choices=("document", "tail")),
          split_seed=F(0, ge=0, integer=True),
          shuffle_seed=F(0, ge=0, integer=True),
          worker_count=F(0, ge=0, integer=True)),
      optim=blocks.optim(name="adamw", lr=3e-3, warmup_steps=50, min_lr_ratio=0.1, b1=0.9, b2=0.95,
                         weight_decay=0.1, clip_norm=1.0),
      train=blocks.lm_train(steps=600, log_every=25, eval_every=200, eval_batches=4, ckpt_every=200),
  ))

  if a.variant == "smoke":
    c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192, max_seq_len=64)
    c.data.update(seq_len=64, global_batch=16)
    c.optim.update(warmup_steps=10)
    c.train.update(steps=150, log_every=10, eval_every=50, eval_batches=2, ckpt_every=50)
  elif a.variant == "moe":
    # Every block MoE: 8 SwiGLU experts of width 128, top-2, dropless; routing statistics in metrics.
    # moe_impl="tiled": pure-jnp tiled grouped matmul; on CPU ragged_dot runs densely and is slower.
    # Aux losses summed over layers (Switch / ST-MoE).
    c.model.update(moe_every=1, n_experts=8, top_k=2, moe_d_ff=128, capacity_factor=0.0, moe_impl="tiled",
                   router_softmax="before", norm_topk_prob=False, lb_loss_norm="assign_frac",
                   moe_aux_layers="sum", lb_loss_coef=0.01, z_loss_coef=0.001, moe_stats_per_expert=True)
  elif a.variant == "125m":
    c.model.update(vocab_size=260, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=2048,
                   max_seq_len=2048, dtype="bfloat16", attention_impl="auto", remat="dots")
    c.data.update(seq_len=1024, global_batch=256)
    c.optim.update(lr=6e-4, warmup_steps=1000)
    c.train.update(steps=20_000, log_every=50, eval_every=1000, ckpt_every=1000)
  elif a.variant == "1b":
    c.model.update(vocab_size=260, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=8, d_ff=5632,
                   max_seq_len=4096, dtype="bfloat16", attention_impl="auto", remat="dots")
    c.mesh.update(data=1, fsdp=-1)
    c.data.update(seq_len=2048, global_batch=512)
    c.optim.update(lr=3e-4, warmup_steps=2000)
    c.train.update(steps=50_000, log_every=50, eval_every=2000, ckpt_every=1000)
  elif a.variant == "moe_1b7b":
    c.model.update(vocab_size=260, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16, d_ff=1024,
                   max_seq_len=4096, dtype="bfloat16", attention_impl="auto", remat="dots",
                   # OLMoE-1B-7B's MoE: 64 experts of width 1024, top-8, softmax before top-k, no top-k
                   # renormalisation, dropless; load balancing 0.01 with the HF/OLMoE global formula
                   # (E · Σ_e f_e P_e, f = assignments per token, f and P over all layers), router z-loss 0.001.
                   # (OLMo's megablocks training code averages assign_frac over layers instead: ~k times smaller.)
                   moe_every=1, n_experts=64, top_k=8, moe_d_ff=1024, capacity_factor=0.0, moe_impl="ragged",
                   router_softmax="before", norm_topk_prob=False, lb_loss_norm="assign_per_token",
                   moe_aux_layers="global", lb_loss_coef=0.01, z_loss_coef=0.001, moe_stats_per_expert=False)
    c.mesh.update(data=1, fsdp=-1, expert=8)
    c.data.update(seq_len=2048, global_batch=512)
    c.optim.update(lr=4e-4, warmup_steps=2000)
    c.train.update(steps=50_000, log_every=50, eval_every=2000, ckpt_every=1000)
  return c
