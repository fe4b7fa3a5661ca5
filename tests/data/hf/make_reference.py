"""Builds the tiny Hugging Face checkpoints and reference outputs that ``tests/test_hf.py`` compares lmx against.

Run in a separate venv with the reference implementation (not lmx's test extra: torch is several GB):

  python -m venv /tmp/hfref && /tmp/hfref/bin/pip install torch transformers safetensors tokenizers numpy
  /tmp/hfref/bin/python tests/data/hf/make_reference.py

Writes, next to this file:
  tiny_llama/  LlamaForCausalLM: GQA (4 query / 2 kv heads), explicit head_dim 24 != hidden / heads, llama3 RoPE
               scaling, untied lm_head, rms_norm_eps 1e-5, weights stored in bfloat16 (one model.safetensors);
               plus a byte-level BPE tokenizer (tokenizer.json, tokenizer_config.json) and generation_config.json.
  tiny_qwen2/  Qwen2ForCausalLM: q/k/v biases, tied embeddings, weights stored in float32, sharded
               (model.safetensors.index.json + several files).
  tiny_qwen3/  Qwen3ForCausalLM: per-head q/k RMSNorm, GQA, explicit head_dim 32 != hidden / heads, tied
               embeddings, float32.
  tiny_mistral/ MistralForCausalLM with sliding_window 4096 >= max_position_embeddings (the window never binds),
               untied, float32.
  */reference.npz  float32 logits of a fixed batch (one row left-padded, with attention_mask and the
               matching position_ids), greedy ``generate`` continuations of left-padded prompts.
  tiny_llama/tokenizer_reference.json  ids of a few strings from ``AutoTokenizer`` and their decodings.

Every parameter (norm weights and biases too) is redrawn from a seeded normal, so that the comparison sees
nonzero biases and non-unit norm weights. ``tests/test_hf.py``'s live test imports the builders below.
"""
from __future__ import annotations

import json
import os

import numpy as np

# torch and transformers are imported inside the functions, so that tests/test_hf.py can read the constants
# without them.

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = 300
TOKENS_SEED = 1234
TEXTS = ["Hello world!", "The quick brown fox jumps over the lazy dog.", "héllo wörld 🤗", "  spaces\tand\nnewlines"]
GEN_PROMPTS = [[1, 17, 88, 140, 33], [1, 250, 9]]  # left-padded to one length for generate
GEN_NEW = 6


def llama_config(**kw):
  from transformers import LlamaConfig
  base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=24, max_position_embeddings=128, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 32})
  base.update(kw)
  return LlamaConfig(**base)


def qwen2_config(**kw):
  from transformers import Qwen2Config
  base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1e6,
              tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  base.update(kw)
  return Qwen2Config(**base)


def qwen3_config(**kw):
  from transformers import Qwen3Config
  base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1e6,
              tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0, attention_bias=False,
              use_sliding_window=False)
  base.update(kw)
  return Qwen3Config(**base)


def mistral_config(**kw):
  from transformers import MistralConfig
  base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=1e4,
              sliding_window=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  base.update(kw)
  return MistralConfig(**base)


def build(config, seed: int, std: float = 0.15):
  """A causal LM of ``config`` in float32 eval mode with every parameter drawn from N(0, std) (norm weights
  around 1), seeded."""
  import torch
  from transformers import AutoModelForCausalLM
  torch.manual_seed(seed)
  model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * std
      p.copy_(1.0 + 2 * noise if name.endswith("norm.weight") else noise)
  return model


def batch(seed: int = TOKENS_SEED, b: int = 3, t: int = 10, pad: int = 3):
  """(tokens [B, T], attention_mask [B, T], position_ids [B, T]) int64; the last row is left-padded by ``pad``
  (pad id 0) and its positions start at 0 at its first real token, as lmx's segment positions do."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, VOCAB, size=(b, t))
  mask = np.ones((b, t), np.int64)
  tokens[-1, :pad] = 0
  mask[-1, :pad] = 0
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
  return tokens, mask, positions


def reference_logits(model, tokens, mask, positions):
  """float32 logits [B, T, V] of the HF model with the attention mask and explicit position ids."""
  import torch
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask),
                position_ids=torch.as_tensor(positions))
  return out.logits.float().numpy()


def left_pad(prompts, pad_id: int = 0):
  p = max(len(x) for x in prompts)
  ids = np.full((len(prompts), p), pad_id, np.int64)
  mask = np.zeros((len(prompts), p), np.int64)
  for i, x in enumerate(prompts):
    ids[i, p - len(x):] = x
    mask[i, p - len(x):] = 1
  return ids, mask


def reference_generate(model, prompts=GEN_PROMPTS, n_new: int = GEN_NEW):
  """Greedy ``generate`` of left-padded prompts, no EOS stop: the new tokens [B, n_new]."""
  import torch
  ids, mask = left_pad(prompts)
  with torch.no_grad():
    out = model.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False,
                         max_new_tokens=n_new, min_new_tokens=n_new, eos_token_id=None, pad_token_id=0)
  return out[:, ids.shape[1]:].numpy()


def save(model, path: str, **kw):
  model.save_pretrained(path, **kw)


def train_tokenizer(path: str):
  """A byte-level BPE (vocab 300: <pad>, <s>, </s>, 256 bytes, merges) that prepends <s>, saved through
  ``PreTrainedTokenizerFast`` so that tokenizer_config.json names the special tokens."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  corpus = (__doc__ + " ".join(TEXTS)).splitlines() * 4  # this file's docstring is the training text
  trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(corpus, trainer)
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                     special_tokens=[("<s>", 1)])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
  fast.save_pretrained(path)
  from transformers import AutoTokenizer
  ref = AutoTokenizer.from_pretrained(path)
  records = [{"text": s, "ids": ref(s)["input_ids"],
              "ids_no_special": ref(s, add_special_tokens=False)["input_ids"]} for s in TEXTS]
  for r in records:
    r["decoded"] = ref.decode(r["ids"], skip_special_tokens=True)
  with open(os.path.join(path, "tokenizer_reference.json"), "w") as f:
    json.dump({"records": records, "bos_id": ref.bos_token_id, "eos_id": ref.eos_token_id,
               "pad_id": ref.pad_token_id, "vocab_size": len(ref)}, f, indent=1, ensure_ascii=False)


def write_reference(path: str):
  import torch
  from transformers import AutoModelForCausalLM
  # Re-read what was saved (bf16 weights upcast to float32): the reference is the checkpoint, not the
  # in-memory float32 model.
  loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  tokens, mask, positions = batch()
  np.savez_compressed(os.path.join(path, "reference.npz"), tokens=tokens, attention_mask=mask,
                      position_ids=positions, logits=reference_logits(loaded, tokens, mask, positions),
                      gen_new_tokens=reference_generate(loaded))


def main(argv=None):
  import argparse
  import torch
  a = argparse.ArgumentParser()
  a.add_argument("--only", default="", help="comma-separated: llama,qwen2,qwen3,mistral (default: all)")
  only = set(filter(None, a.parse_args(argv).only.split(",")))
  for name, config, seed in (("qwen3", qwen3_config, 2), ("mistral", mistral_config, 3)):
    if not only or name in only:
      d = os.path.join(HERE, f"tiny_{name}")
      save(build(config(), seed=seed), d)
      write_reference(d)
      print(f"wrote {d}")
  if only and not only & {"llama", "qwen2"}:
    return
  llama_dir, qwen_dir = os.path.join(HERE, "tiny_llama"), os.path.join(HERE, "tiny_qwen2")
  llama = build(llama_config(), seed=0).to(torch.bfloat16)
  save(llama, llama_dir)
  write_reference(llama_dir)
  train_tokenizer(llama_dir)
  qwen = build(qwen2_config(), seed=1)
  save(qwen, qwen_dir, max_shard_size="150KB")
  write_reference(qwen_dir)
  total = sum(os.path.getsize(os.path.join(d, f)) for d in (llama_dir, qwen_dir) for f in os.listdir(d))
  print(f"wrote {llama_dir} and {qwen_dir}: {total / 1024:.0f} KiB")


if __name__ == "__main__":
  main()
