"""Hugging Face tokenizers (``tokenizer.json``) through the ``tokenizers`` library, without transformers.

``HFTokenizer.from_dir(path)`` reads ``tokenizer.json`` from a checkpoint directory and the special-token ids
from ``tokenizer_config.json`` (``bos_token`` / ``eos_token`` / ``pad_token``, strings or AddedToken dicts),
``generation_config.json`` (``eos_token_id``, possibly a list: Llama 3 instruct stops at several) and
``config.json``, in that order of preference for bos and pad; for eos the generation config comes first
(it is what ``generate`` stops at). ``encode`` applies the tokenizer's own post-processor, so BOS is added
exactly when Hugging Face's fast tokenizer adds it.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

from lmx.core.config import ConfigError


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  try:
    with open(path) as f:
      out = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} is not readable JSON ({e})") from None
  return out if isinstance(out, dict) else {}


def _token_text(value) -> str | None:
  """A special token from tokenizer_config.json: a string or an AddedToken dict with ``content``."""
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


def _ids(value) -> tuple[int, ...]:
  if value is None:
    return ()
  return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


class HFTokenizer:
  """A ``tokenizers.Tokenizer`` with the checkpoint's special-token ids.

  ``bos_id`` / ``eos_id`` / ``pad_id`` are ints or None; ``eos_ids`` every stop id (generation config);
  ``vocab_size`` counts added tokens.
  """

  def __init__(self, tokenizer, *, bos_id: int | None = None, eos_ids: Sequence[int] = (),
               pad_id: int | None = None, chat_template: str | None = None):
    self.tokenizer = tokenizer
    self.bos_id, self.pad_id = bos_id, pad_id
    self.eos_ids = tuple(int(i) for i in eos_ids)
    self.chat_template = chat_template

  def apply_chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str:
    """The prompt text of ``messages`` (``[{"role": "user", "content": "..."}, ...]``) under the model's chat
    template (Jinja, rendered in a sandbox as transformers does); ``add_generation_prompt`` opens the assistant's
    turn."""
    if not self.chat_template:
      raise ConfigError("this tokenizer has no chat template (tokenizer_config.json's chat_template, or the GGUF "
                        "file's tokenizer.chat_template)")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    special = {k: self.tokenizer.id_to_token(i) if i is not None else None
               for k, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id))}
    return env.from_string(self.chat_template).render(messages=list(messages),
                                                      add_generation_prompt=add_generation_prompt, **special)

  @property
  def eos_id(self) -> int | None:
    return self.eos_ids[0] if self.eos_ids else None

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  @classmethod
  def from_dir(cls, path: str) -> "HFTokenizer":
    """The tokenizer of the checkpoint directory ``path`` (ConfigError if tokenizer.json is missing/unreadable)."""
    from tokenizers import Tokenizer
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
      extra = [n for n in ("tokenizer.model", "vocab.json") if os.path.isfile(os.path.join(path, n))]
      hint = (f" (found {extra}: slow-tokenizer files; save the tokenizer with transformers' "
              "AutoTokenizer.from_pretrained(...).save_pretrained(...) to get tokenizer.json)") if extra else ""
      raise ConfigError(f"{file} is missing{hint}")
    try:
      tok = Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
      raise ConfigError(f"{file} is not a readable tokenizer ({e})") from None
    tcfg = _read_json(os.path.join(path, "tokenizer_config.json"))
    gcfg = _read_json(os.path.join(path, "generation_config.json"))
    mcfg = _read_json(os.path.join(path, "config.json"))

    def from_text(key):
      text = _token_text(tcfg.get(key))
      return tok.token_to_id(text) if text is not None else None

    def first(*values):
      for v in values:
        if _ids(v):
          return _ids(v)
      return ()

    bos = first(from_text("bos_token"), gcfg.get("bos_token_id"), mcfg.get("bos_token_id"))
    eos = first(gcfg.get("eos_token_id"), from_text("eos_token"), mcfg.get("eos_token_id"))
    pad = first(from_text("pad_token"), gcfg.get("pad_token_id"), mcfg.get("pad_token_id"))
    template = tcfg.get("chat_template")
    return cls(tok, bos_id=bos[0] if bos else None, eos_ids=eos, pad_id=pad[0] if pad else None,
               chat_template=template if isinstance(template, str) else None)

  def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Token ids of ``text`` (with the post-processor's special tokens, e.g. BOS, unless turned off)."""
    return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[int]]:
    return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
    """Text of ``ids`` (special tokens dropped by default)."""
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def load_tokenizer(path: str) -> HFTokenizer:
  """``HFTokenizer.from_dir(path)``."""
  return HFTokenizer.from_dir(path)
