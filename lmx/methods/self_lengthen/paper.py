"""The paper-scale pieces of Self-Lengthen (``configs/self_lengthen.py:qwen2_7b``): Qwen2-7B-Instruct's SFT step
(cutoff 16384 tokens, batch 1, lr 1e-4) and its cached sampler (temperature 0.7, top_p 0.8, top_k 20), lowered for
a GPU target on any host with abstract shapes (``jax.ShapeDtypeStruct``): no weights are read, no paper-size
array is allocated. With a local checkpoint (``base.model.hf_path``) the same functions take its parameters
(``lmx.models.registry.build_model`` with ``name='hf'``).

Differences from the released training: full fine-tuning here, the paper trains LoRA adapters on all linear
layers (ZeRO-3 offload); the sampler has no repetition penalty (the released decoding uses 1.1).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lmx.core import loop
from lmx.core import mesh as mesh_lib
from lmx.methods.self_lengthen import lm as sl_lm
from lmx.models import generate as gen_lib
from lmx.models import hf as hf_lib
from lmx.models.registry import transformer_model

# The architecture fields of Qwen/Qwen2-7B-Instruct's config.json.
QWEN2_7B = {
  "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 3584,
  "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
  "vocab_size": 152064, "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
  "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False,
}


def paper_model(config, *, attention_impl: str | None = None):
  """The registry Model of Qwen2-7B-Instruct's architecture with ``base.model``'s overrides."""
  m = config.base.model
  cfg = hf_lib.config_from_hf(QWEN2_7B, where="QWEN2_7B", axis_rules=config.axis_rules, dtype=m.dtype,
                              max_seq_len=m.max_seq_len, attention_impl=attention_impl or m.attention_impl,
                              remat=m.remat)
  return transformer_model(cfg, name="hf")


def lower(config, target: str = "cuda", *, seq_len: int = 16384, gen_batch: int = 8, prompt_len: int = 2048,
          new_tokens: int = 16384, attention_impl: str | None = None, sft_steps: int = 1000) -> dict:
  """Lowers (1) the SFT step (:func:`lm.sft_loss` under ``loop.optax_step`` with :func:`lm.sft_optimizer` for a
  run of ``sft_steps`` steps) on a [``sft.batch``, ``seq_len``] batch with parameters and optimiser state sharded by ``config.mesh`` /
  ``axis_rules``, and (2) the cached sampler on [``gen_batch``, ``prompt_len``] prompts for ``new_tokens``
  tokens, both for ``target``. Returns ``{"sft": Lowered, "generate": Lowered, "params": count}``."""
  from lmx.kernels import attention as attention_lib

  model = paper_model(config, attention_impl=attention_impl)
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = config.axis_rules
  abstract = model.abstract_params()
  psh = model.shardings(mesh, rules)
  tx, schedule = sl_lm.sft_optimizer(config.sft.optim, sft_steps, warmup_ratio=config.sft.warmup_ratio)
  state_sh = loop.optax_shardings(psh, tx, abstract, mesh)
  abs_state = {"params": abstract, "opt_state": jax.eval_shape(tx.init, abstract)}
  abs_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state,
                           {"params": state_sh["params"], "opt_state": state_sh["opt_state"]})
  abs_state["step"] = jax.ShapeDtypeStruct((), jnp.int32, sharding=mesh_lib.replicated(mesh))  # the schedule's
  bsh = mesh_lib.batch_sharding(mesh, rules)
  b = config.sft.batch * mesh_lib.batch_size_divisor(mesh, rules)  # per-device batch 1, as LLaMA-Factory's
  batch = {"tokens_BT": jax.ShapeDtypeStruct((b, seq_len), jnp.int32, sharding=bsh),
           "loss_mask_BT": jax.ShapeDtypeStruct((b, seq_len), jnp.float32, sharding=bsh)}
  step = loop.optax_step(sl_lm.sft_loss(model.apply), tx, schedule)
  s = config.sampling
  sampling = gen_lib.SamplingConfig(max_new_tokens=new_tokens, temperature=s.temperature, top_k=s.top_k,
                                    top_p=s.top_p, eos_id=151645, pad_id=151643)  # <|im_end|>, <|endoftext|>
  gen = gen_lib.make_generate_fn(model.graphdef, sampling)
  params_sh = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, psh)
  key = jax.eval_shape(lambda: jax.random.key(0))
  with jax.set_mesh(mesh), attention_lib.target_platform(target):
    sft = jax.jit(lambda st, bt: step(st, None, bt, jax.random.key(0))).trace(abs_state, batch).lower(
        lowering_platforms=(target,))
    g = gen.trace(params_sh, jax.ShapeDtypeStruct((gen_batch, prompt_len), jnp.int32),
                  jax.ShapeDtypeStruct((gen_batch,), jnp.int32), key).lower(lowering_platforms=(target,))
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
  return {"sft": sft, "generate": g, "params": n}
