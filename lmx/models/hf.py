"""Hugging Face Llama / Qwen2 / Qwen3 / Mistral checkpoints in lmx's transformer: ``config.json`` + ``*.safetensors``, no torch.

``load_hf(path)`` reads a local checkpoint directory (one ``model.safetensors``, or shards named by
``model.safetensors.index.json``) into :class:`lmx.models.transformer.Transformer` and returns
``(cfg, model, params)``: the :class:`TransformerConfig`, the registry :class:`~lmx.models.registry.Model` and
the parameters as a pure dict, read tensor by tensor and placed on their shardings when a mesh is given (each
device receives only its shard). ``config_from_hf(config_json_dict)`` is the config mapping alone;
``model.name = "hf"`` with ``model.hf_path`` builds the same model through the registry (see :func:`build`).
Tokenizers: :mod:`lmx.datasets.tokenizer`.

What the mapping relies on (checked against transformers' modeling_llama / modeling_qwen2 by the tests, which
compare logits with the reference implementation):

* RoPE: HF applies it in the rotate-half form (the first and second halves of each head are the pairs), which
  is lmx's :func:`~lmx.models.transformer.apply_rope`, so q/k weights need no permutation (checkpoints converted
  from Meta's interleaved layout were permuted by HF's conversion script already). ``rope_scaling`` /
  ``rope_parameters`` types ``default``, ``linear`` and ``llama3`` are supported; others stop with a message.
* RMSNorm: ``weight * x / sqrt(mean(x^2) + eps)`` with the weight used as is (not ``1 + weight``), eps inside
  the root, statistics in float32; lmx's ``scale`` is HF's ``weight``. (In bfloat16, HF rounds the normalised
  activation to bf16 before the scale multiply, lmx after it: bf16 outputs differ by rounding.)
* Linear layers store ``weight [out, in]``; lmx keeps ``[in, out]``-style einsum layouts: q/k/v ``[D, heads, E]``,
  o ``[heads, E, D]``, SwiGLU ``w1`` = gate_proj, ``w3`` = up_proj, ``w2`` = down_proj, unembed ``[D, V]``.
* Embeddings are looked up unscaled (no sqrt(D) factor) in both; tied checkpoints have no ``lm_head.weight``
  (one is ignored if present) and lmx uses the table's transpose.
* Qwen2's q/k/v biases map to ``qkv_bias=True``; Qwen3's per-head q/k RMSNorms (``q_norm`` / ``k_norm``, over the
  head dim, after the projection and before RoPE) to ``qk_norm=True``. Mistral is Llama's computation when its
  ``sliding_window`` is null or at least the sequence length (then the window never binds; a shorter window is
  refused). Llama's ``attention_bias`` / ``mlp_bias`` (bias on o_proj and the MLP too) and Qwen's sliding window
  are not implemented and are refused.

Errors in the checkpoint (missing config.json or tensor, wrong shape, unknown architecture, unreadable
safetensors) raise :class:`lmx.core.config.ConfigError` naming the file or tensor, before any weight is read.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable

import jax
import numpy as np

from lmx.core.config import ConfigError
from lmx.models.transformer import TransformerConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                 "MistralForCausalLM": "mistral"}
MODEL_TYPES = {v: k for k, v in ARCHITECTURES.items()}
# Architectures people try that look close but compute something else.
REFUSED = {
    "MixtralForCausalLM": "its sparse MoE layers are not mapped onto lmx.models.moe yet",
    "GPTNeoXForCausalLM": "it uses LayerNorm, parallel attention/MLP and partial rotary embeddings",
    "Qwen2MoeForCausalLM": "its shared-expert MoE layers are not mapped onto lmx.models.moe",
    "GemmaForCausalLM": "it scales embeddings by sqrt(D) and uses (1 + weight) RMSNorm and GeGLU",
    "Gemma2ForCausalLM": "it scales embeddings by sqrt(D) and uses soft-capping and sliding windows",
}
ROPE_TYPES = ("default", "linear", "llama3")
# TransformerConfig fields a caller may set on a loaded model (the rest is the checkpoint's).
OVERRIDES = ("dtype", "param_dtype", "max_seq_len", "attention_impl", "remat", "batch_axes")
# Tensors of old checkpoints that are recomputed, not learned.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "fp32": "float32",
           "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def read_config(path: str) -> dict:
  """The ``config.json`` of the checkpoint directory ``path`` as a dict (ConfigError if missing/unreadable)."""
  if not os.path.isdir(path):
    raise ConfigError(f"Hugging Face checkpoint {path!r} is not a directory; give the local folder that holds "
                      "config.json and the *.safetensors files (e.g. a huggingface-cli download --local-dir)")
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise ConfigError(f"{file} is missing: a Hugging Face checkpoint directory needs its config.json")
  try:
    with open(file) as f:
      hf = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{file} is not readable JSON ({e})") from None
  if not isinstance(hf, dict):
    raise ConfigError(f"{file} must hold a JSON object, got {type(hf).__name__}")
  return hf


def architecture(hf: dict, where: str = "config.json") -> str:
  """``llama`` or ``qwen2`` from ``architectures`` (or ``model_type``); ConfigError for anything else."""
  archs = hf.get("architectures") or []
  names = [MODEL_TYPES[hf["model_type"]]] if not archs and hf.get("model_type") in MODEL_TYPES else list(archs)
  for a in names:
    if a in ARCHITECTURES:
      return ARCHITECTURES[a]
  known = sorted(ARCHITECTURES)
  for a in names:
    if a in REFUSED:
      raise ConfigError(f"{where}: architecture {a} is not supported ({REFUSED[a]}); supported: {known}")
  found = names or [f"model_type={hf.get('model_type')!r}"]
  raise ConfigError(f"{where}: architecture {found} is not supported; supported: {known}")


def _require(hf: dict, key: str, where: str):
  if key not in hf or hf[key] is None:
    raise ConfigError(f"{where}: required field {key!r} is missing")
  return hf[key]


def _rope(hf: dict, where: str) -> dict:
  """TransformerConfig's RoPE fields from ``rope_theta`` + ``rope_scaling`` (transformers 4) or
  ``rope_parameters`` (transformers 5)."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  params = {**scaling, **params}
  theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
  kind = params.get("rope_type", params.get("type", "default")) or "default"
  if kind not in ROPE_TYPES:
    raise ConfigError(f"{where}: RoPE scaling type {kind!r} is not implemented in lmx; supported: "
                      f"{list(ROPE_TYPES)} (rope_scaling / rope_parameters.rope_type)")
  if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
    raise ConfigError(f"{where}: partial_rotary_factor != 1 (RoPE on part of each head) is not implemented")
  if params.get("attention_factor") not in (None, 1, 1.0):
    raise ConfigError(f"{where}: rope attention_factor={params['attention_factor']} is not implemented")
  out = dict(rope_theta=float(theta))
  if kind == "linear":
    out.update(rope_scaling="linear", rope_scaling_factor=float(_require(params, "factor", f"{where} rope")))
  elif kind == "llama3":
    rp = f"{where} rope_parameters"
    out.update(rope_scaling="llama3", rope_scaling_factor=float(_require(params, "factor", rp)),
               rope_low_freq_factor=float(_require(params, "low_freq_factor", rp)),
               rope_high_freq_factor=float(_require(params, "high_freq_factor", rp)),
               rope_original_max_len=int(params.get("original_max_position_embeddings")
                                         or _require(hf, "max_position_embeddings", where)))
  return out


def checkpoint_dtype(hf: dict) -> str | None:
  """The dtype the checkpoint says it was saved in (``dtype`` / ``torch_dtype``), as an lmx dtype name."""
  name = hf.get("dtype", hf.get("torch_dtype"))
  return _DTYPES.get(str(name).replace("torch.", "")) if name else None


def config_from_hf(hf: dict, *, where: str = "config.json", axis_rules=None, **overrides) -> TransformerConfig:
  """The :class:`TransformerConfig` of a Llama / Qwen2 / Qwen3 / Mistral ``config.json`` dict.

  ``overrides`` may set any of :data:`OVERRIDES` (``dtype``/``param_dtype`` default to the checkpoint's dtype,
  else float32; ``max_seq_len`` to ``max_position_embeddings``). Unsupported variants raise ConfigError.
  """
  bad = sorted(set(overrides) - set(OVERRIDES))
  if bad:
    raise ConfigError(f"hf: cannot override {bad}; the checkpoint fixes them (overridable: {list(OVERRIDES)})")
  arch = architecture(hf, where)
  act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
  if act != "silu":
    raise ConfigError(f"{where}: hidden_act={act!r} is not supported (lmx's SwiGLU uses silu)")
  if arch == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
    raise ConfigError(f"{where}: attention_bias / mlp_bias (biases on o_proj and the MLP) are not implemented; "
                      "only q/k/v biases (Qwen2) are")
  if arch in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
    raise ConfigError(f"{where}: use_sliding_window=true (sliding-window attention) is not implemented")
  if arch == "qwen3" and hf.get("attention_bias"):
    raise ConfigError(f"{where}: attention_bias=true on Qwen3 is not implemented")
  window = hf.get("sliding_window") if arch == "mistral" else None
  max_len = int(hf.get("max_position_embeddings") or 2048)
  if window is not None and int(window) < int(overrides.get("max_seq_len") or max_len):
    raise ConfigError(f"{where}: sliding_window={window} (Mistral's sliding-window attention) is not implemented; "
                      f"it never binds for sequences up to the window: set max_seq_len <= {window}")
  d = _require(hf, "hidden_size", where)
  n_heads = _require(hf, "num_attention_heads", where)
  head_dim = hf.get("head_dim") or d // n_heads
  dtype = checkpoint_dtype(hf) or "float32"
  fields = dict(
      vocab_size=_require(hf, "vocab_size", where), d_model=d, n_layers=_require(hf, "num_hidden_layers", where),
      n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
      d_head=0 if head_dim * n_heads == d else head_dim, d_ff=_require(hf, "intermediate_size", where),
      max_seq_len=max_len, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3",
      init_std=float(hf.get("initializer_range", 0.02)), dtype=dtype, param_dtype=dtype, **_rope(hf, where))
  fields.update({k: v for k, v in overrides.items() if v is not None})
  if overrides.get("param_dtype") is None and overrides.get("dtype"):
    fields["param_dtype"] = overrides["dtype"]  # one dtype given: store and compute in it
  return TransformerConfig.from_config(fields, prefix="hf", axis_rules=axis_rules)


# --- tensor names and layouts ------------------------------------------------------------------------------

def tensor_map(cfg: TransformerConfig) -> dict[str, tuple[tuple, tuple, Callable]]:
  """``{hf_name: (lmx_path, hf_shape, to_lmx)}`` for every tensor the model needs; ``to_lmx`` maps the HF
  array [out, in] to lmx's layout (see the module docstring)."""
  d, h, k, e, f, v = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
  same = lambda w: w  # noqa: E731
  t = lambda w: w.T  # noqa: E731

  def heads_in(n):  # [n*E, D] -> [D, n, E]
    return lambda w: w.reshape(n, e, d).transpose(2, 0, 1)

  out = {"model.embed_tokens.weight": (("embed",), (v, d), same),
         "model.norm.weight": (("final_norm", "scale"), (d,), same)}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = (("unembed",), (v, d), t)
  for i in range(cfg.n_layers):
    p = f"model.layers.{i}."
    out.update({
        p + "input_layernorm.weight": (("blocks", i, "attn_norm", "scale"), (d,), same),
        p + "post_attention_layernorm.weight": (("blocks", i, "ffn_norm", "scale"), (d,), same),
        p + "self_attn.q_proj.weight": (("blocks", i, "attn", "wq"), (h * e, d), heads_in(h)),
        p + "self_attn.k_proj.weight": (("blocks", i, "attn", "wk"), (k * e, d), heads_in(k)),
        p + "self_attn.v_proj.weight": (("blocks", i, "attn", "wv"), (k * e, d), heads_in(k)),
        p + "self_attn.o_proj.weight": (("blocks", i, "attn", "wo"), (d, h * e), lambda w: w.T.reshape(h, e, d)),
        p + "mlp.gate_proj.weight": (("blocks", i, "ffn", "w1"), (f, d), t),
        p + "mlp.up_proj.weight": (("blocks", i, "ffn", "w3"), (f, d), t),
        p + "mlp.down_proj.weight": (("blocks", i, "ffn", "w2"), (d, f), t),
    })
    if cfg.qk_norm:
      out.update({
          p + "self_attn.q_norm.weight": (("blocks", i, "attn", "q_norm", "scale"), (e,), same),
          p + "self_attn.k_norm.weight": (("blocks", i, "attn", "k_norm", "scale"), (e,), same),
      })
    if cfg.qkv_bias:
      out.update({
          p + "self_attn.q_proj.bias": (("blocks", i, "attn", "bq"), (h * e,), lambda b: b.reshape(h, e)),
          p + "self_attn.k_proj.bias": (("blocks", i, "attn", "bk"), (k * e,), lambda b: b.reshape(k, e)),
          p + "self_attn.v_proj.bias": (("blocks", i, "attn", "bv"), (k * e,), lambda b: b.reshape(k, e)),
      })
  return out


class Checkpoint:
  """The safetensors files of a checkpoint directory: which file holds each tensor, its shape and dtype
  (from the headers only), and ``read(name)`` one tensor as a NumPy array (bfloat16 via ml_dtypes)."""

  def __init__(self, path: str):
    self.path = path
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{index} is not a readable safetensors index (needs a 'weight_map'): {e!r}") from None
      files = sorted(set(weight_map.values()))
    elif os.path.isfile(single):
      weight_map, files = None, ["model.safetensors"]
    else:
      files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
      weight_map = None
      if not files:
        bins = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth"))]
        hint = (f" (found PyTorch weights {bins}: convert them to safetensors, e.g. by loading with transformers "
                "and calling save_pretrained)") if bins else ""
        raise ConfigError(f"{path}: no model.safetensors, model.safetensors.index.json or *.safetensors file{hint}")
    self.files = [os.path.join(path, n) for n in files]
    self.where: dict[str, str] = {}
    self.shapes: dict[str, tuple] = {}
    self.dtypes: dict[str, str] = {}
    for file in self.files:
      if not os.path.isfile(file):
        raise ConfigError(f"{file} is missing (named by {index})")
      with self._open(file) as st:
        for name in st.keys():
          sl = st.get_slice(name)
          self.where[name], self.shapes[name], self.dtypes[name] = file, tuple(sl.get_shape()), sl.get_dtype()
    if weight_map is not None:
      for name, fname in weight_map.items():
        if self.where.get(name) != os.path.join(path, fname):
          raise ConfigError(f"tensor {name!r}: {index} places it in {fname}, which does not hold it")

  @staticmethod
  @contextlib.contextmanager
  def _open(file: str, framework: str = "np"):
    from safetensors import safe_open
    try:
      handle = safe_open(file, framework=framework)
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
      raise ConfigError(f"{file} is not a readable safetensors file ({type(e).__name__}: {e}); re-download "
                        "it") from None
    with handle as st:
      yield st

  def read(self, name: str) -> np.ndarray:
    """Tensor ``name`` as a NumPy array in its stored dtype."""
    file = self.where[name]
    if self.dtypes[name] not in _SAFETENSORS_DTYPES:
      raise ConfigError(f"tensor {name!r} in {file} has dtype {self.dtypes[name]}; only F32, BF16 and F16 "
                        "checkpoints load (quantised weights do not)")
    try:
      with self._open(file) as st:
        return st.get_tensor(name)
    except ConfigError:
      raise
    except Exception as e:  # older safetensors: no bf16 in the numpy backend; a truncated data section
      if self.dtypes[name] == "BF16":
        with self._open(file, "flax") as st:
          return np.asarray(st.get_tensor(name))
      raise ConfigError(f"tensor {name!r} in {file} could not be read ({type(e).__name__}: {e})") from None

  def check(self, cfg: TransformerConfig) -> dict:
    """Checks names and shapes against ``cfg`` (ConfigError naming the tensor); returns :func:`tensor_map`."""
    tmap = tensor_map(cfg)
    for name, (_, shape, _) in tmap.items():
      if name not in self.where:
        raise ConfigError(f"tensor {name!r} is missing from the checkpoint {self.path} (config.json describes "
                          f"{cfg.n_layers} layers, tie_word_embeddings={cfg.tie_embeddings}, "
                          f"qkv bias={cfg.qkv_bias})")
      if self.shapes[name] != shape:
        raise ConfigError(f"tensor {name!r} in {os.path.basename(self.where[name])} has shape "
                          f"{list(self.shapes[name])}, but config.json implies {list(shape)}")
    extra = [n for n in self.where if n not in tmap and not n.endswith(IGNORED_SUFFIXES)
             and not (cfg.tie_embeddings and n == "lm_head.weight")]
    if extra:
      raise ConfigError(f"{self.path}: tensors {sorted(extra)[:5]}{' ...' if len(extra) > 5 else ''} are not part "
                        "of the model config.json describes (wrong config, or an unsupported variant)")
    return tmap

  def lmx_array(self, name: str, to_lmx: Callable, dtype) -> np.ndarray:
    """Tensor ``name`` in lmx's layout and ``dtype``, C-contiguous."""
    return np.ascontiguousarray(to_lmx(self.read(name)).astype(dtype, copy=False))


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def load_params(ckpt: Checkpoint, cfg: TransformerConfig, shardings=None) -> dict:
  """The parameters (pure dict, as ``nnx.to_pure_dict``) read tensor by tensor in ``cfg.param_dtype``.

  ``shardings`` (the model's NamedShardings, same tree) places each tensor as it is read: each device gets
  only its slice (``jax.make_array_from_callback``; every host reads the file), so host memory holds one
  tensor at a time. Without it the arrays go to the default device.
  """
  tmap = ckpt.check(cfg)
  dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
  params: dict = {}
  for name, (path, _, to_lmx) in tmap.items():
    arr = ckpt.lmx_array(name, to_lmx, dtype)
    if shardings is None:
      value = jax.device_put(arr)
    else:
      value = jax.make_array_from_callback(arr.shape, _get(shardings, path), lambda idx, a=arr: a[idx])
    _set(params, path, value)
    del arr
  return params


def _shard_slices(shape, spec, sizes: dict, index: dict) -> tuple:
  """The slices of an array of ``shape`` that the device at mesh position ``index`` ({axis: i}) holds under
  PartitionSpec ``spec`` (a dim split over several axes is indexed major-to-minor, as JAX lays it out)."""
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    k, n = 0, dim
    for a in axes:
      k, n = k * sizes[a] + index[a], n // sizes[a]
    out.append(slice(k * n, (k + 1) * n) if axes else slice(None))
  return tuple(out)


def open_checkpoint(path: str, *, axis_rules=None, **overrides):
  """``(cfg, checkpoint)`` of a checkpoint directory, or of a ``.gguf`` file (:mod:`lmx.models.gguf`); no weights
  are read."""
  if path.endswith(".gguf"):
    from lmx.models import gguf
    return gguf.open_checkpoint(path, axis_rules=axis_rules, **overrides)
  hf = read_config(path)
  cfg = config_from_hf(hf, where=os.path.join(path, "config.json"), axis_rules=axis_rules, **overrides)
  return cfg, Checkpoint(path)


def build(hf_path: str, *, axis_rules=None, **overrides):
  """The registry :class:`~lmx.models.registry.Model` of the checkpoint in ``hf_path`` (its config and tensor
  headers are checked now; no weights are read).

  Its ``init(key)`` ignores the key and returns the checkpoint's parameters, read by host callbacks when the
  computation runs: ``jax.eval_shape(init, key)`` reads nothing, and ``jax.jit(init, out_shardings=...)`` (what
  :class:`lmx.core.loop.Loop` does for a fresh state) reads the files instead of baking the weights into the
  program as constants. Under a mesh (``jax.set_mesh``) each device's callback (inside ``jax.shard_map``)
  returns only its shard of the parameter's sharding under ``axis_rules`` (default
  :data:`lmx.core.mesh.DEFAULT_AXIS_RULES`), so no device ever holds a whole tensor it does not keep.
  """
  import threading

  from lmx.core import mesh as mesh_lib
  from lmx.models import registry
  cfg, ckpt = open_checkpoint(hf_path, axis_rules=axis_rules, **overrides)
  tmap = ckpt.check(cfg)
  dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
  rules = axis_rules if axis_rules is not None else mesh_lib.DEFAULT_AXIS_RULES
  model = registry.transformer_model(cfg, name="hf")
  abstract = model.abstract_params()
  lock, cache = threading.Lock(), {}  # {name: [array, devices still to serve]}

  def whole(name, to_lmx, users: int = 1):
    """The converted tensor; read once for the ``users`` local devices that ask for it (concurrently, in any
    order), dropped when the last has taken its shard."""
    with lock:
      if name not in cache:
        cache[name] = [ckpt.lmx_array(name, to_lmx, dtype), users]
      entry = cache[name]
      entry[1] -= 1
      if entry[1] <= 0:
        del cache[name]
      return entry[0]

  def init(key):
    del key  # the weights are the checkpoint's
    mesh = jax.sharding.get_abstract_mesh()
    sharded = mesh is not None and not mesh.empty and mesh.size > 1
    if sharded:
      specs = jax.tree.map(lambda sh: sh.spec, model.shardings(mesh, rules))
      sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
      users = max(1, mesh.size // jax.process_count())  # this host's devices of the mesh
    params: dict = {}
    for name, (path, _, to_lmx) in tmap.items():
      full = _get(abstract, path)
      if not sharded:
        value = jax.pure_callback(functools.partial(whole, name, to_lmx), jax.ShapeDtypeStruct(full.shape, dtype))
      else:
        spec = _get(specs, path)
        local = tuple(n // math.prod(sizes[a] for a in (() if e is None else (e,) if isinstance(e, str) else e))
                      for n, e in zip(full.shape, tuple(spec) + (None,) * (full.ndim - len(spec))))

        def read_shard(*idx, name=name, to_lmx=to_lmx, spec=spec, shape=full.shape):
          index = dict(zip(sizes, (int(i) for i in idx)))
          return whole(name, to_lmx, users)[_shard_slices(shape, spec, sizes, index)]

        def per_device(read_shard=read_shard, local=local):
          idx = [jax.lax.axis_index(a) for a in sizes]
          return jax.pure_callback(read_shard, jax.ShapeDtypeStruct(local, dtype), *idx)

        value = jax.shard_map(per_device, in_specs=(), out_specs=spec, check_vma=False)()
      _set(params, path, value)
    return params

  return dataclasses.replace(model, init=init)


def load_hf(path: str, *, dtype: str | None = None, param_dtype: str | None = None, mesh=None, axis_rules=None,
            **overrides) -> tuple[TransformerConfig, Any, dict]:
  """``(cfg, model, params)`` of the Llama / Qwen2 checkpoint in the local directory ``path``.

  ``dtype`` (compute) and ``param_dtype`` (storage) default to the checkpoint's dtype; one of them given sets
  both unless the other is given too (e.g. ``dtype="float32"`` upcasts a bf16 checkpoint exactly). With
  ``mesh`` the parameters are placed on ``model.shardings(mesh, axis_rules)`` (default rules:
  :data:`lmx.core.mesh.DEFAULT_AXIS_RULES`) as they are read. ``overrides``: ``max_seq_len``,
  ``attention_impl``, ``remat``, ``batch_axes``. ``model`` is a registry Model: ``model.apply(params, tokens_BT,
  segment_ids_BT=...)``; ``nnx.merge(model.graphdef, params)`` is the NNX module (e.g. for
  ``lmx.models.generate.generate``).
  """
  from lmx.core import mesh as mesh_lib
  from lmx.models import registry
  if param_dtype is not None and dtype is None:
    dtype = param_dtype
  cfg, ckpt = open_checkpoint(path, axis_rules=axis_rules, dtype=dtype, param_dtype=param_dtype, **overrides)
  model = registry.transformer_model(cfg, name="hf")
  shardings = None
  if mesh is not None:
    rules = axis_rules if axis_rules is not None else mesh_lib.DEFAULT_AXIS_RULES
    shardings = model.shardings(mesh, rules)
  return cfg, model, load_params(ckpt, cfg, shardings)


# --- export ---------------------------------------------------------------------------------------------------

def hf_config_dict(cfg: TransformerConfig, *, dtype: str = "float32", bos_id: int | None = None,
                   eos_id: int | None = None, pad_id: int | None = None) -> dict:
  """The ``config.json`` of ``cfg`` as a Llama (or, with q/k/v biases, Qwen2; with q/k norms, Qwen3) checkpoint that
  transformers loads."""
  if getattr(cfg, "n_experts", 0) and getattr(cfg, "moe_every", 0):
    raise ConfigError("export: MoE transformers have no Hugging Face Llama/Qwen2 equivalent")
  if cfg.qk_norm and cfg.qkv_bias:
    raise ConfigError("export: q/k norms with q/k/v biases have no Hugging Face Llama/Qwen2/Qwen3 equivalent")
  arch = "Qwen3ForCausalLM" if cfg.qk_norm else "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
  out = dict(
      architectures=[arch], model_type=ARCHITECTURES[arch], hidden_size=cfg.d_model,
      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
      head_dim=cfg.head_dim, intermediate_size=cfg.d_ff, vocab_size=cfg.vocab_size,
      max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
      tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", initializer_range=cfg.init_std,
      torch_dtype=dtype, use_cache=True)
  if arch == "LlamaForCausalLM":
    out.update(attention_bias=False, mlp_bias=False)
  else:
    out.update(use_sliding_window=False)
  if arch == "Qwen3ForCausalLM":
    out.update(attention_bias=False)
  if cfg.rope_scaling == "linear":
    out["rope_scaling"] = dict(rope_type="linear", factor=cfg.rope_scaling_factor)
  elif cfg.rope_scaling == "llama3":
    out["rope_scaling"] = dict(rope_type="llama3", factor=cfg.rope_scaling_factor,
                               low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                               original_max_position_embeddings=cfg.rope_original_max_len)
  for key, value in (("bos_token_id", bos_id), ("eos_token_id", eos_id), ("pad_token_id", pad_id)):
    if value is not None:
      out[key] = int(value)
  return out


def to_hf_layout(name: str, a: np.ndarray, cfg: TransformerConfig) -> np.ndarray:
  """The inverse of :func:`tensor_map`'s ``to_lmx`` for tensor ``name``: lmx's layout back to HF's [out, in]."""
  d = cfg.d_model
  if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):  # [D, n, E] -> [n*E, D]
    return a.transpose(1, 2, 0).reshape(-1, d)
  if name.endswith("o_proj.weight"):  # [H, E, D] -> [D, H*E]
    return a.reshape(-1, d).T
  if name.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight")) or name == "lm_head.weight":
    return a.T
  if name.endswith("_proj.bias"):
    return a.reshape(-1)
  return a


def save_hf(out_dir: str, cfg: TransformerConfig, params: dict, tokenizer=None, *, dtype: str = "float32") -> str:
  """Writes ``params`` of a Llama/Qwen2-shaped lmx transformer as a Hugging Face checkpoint directory:
  ``config.json``, ``model.safetensors`` (in ``dtype``: float32, bfloat16 or float16) and, with ``tokenizer`` (an
  :class:`lmx.datasets.tokenizer.HFTokenizer`), ``tokenizer.json``, ``tokenizer_config.json`` (special tokens, chat
  template) and ``generation_config.json``. ``load_hf`` and transformers read it back with the same logits."""
  from safetensors.numpy import save_file

  if dtype not in ("float32", "bfloat16", "float16"):
    raise ConfigError(f"export dtype {dtype!r}: choose float32, bfloat16 or float16")
  np_dtype = np.dtype(jax.numpy.dtype(dtype))
  os.makedirs(out_dir, exist_ok=True)
  special = {}
  if tokenizer is not None:
    special = dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config_dict(cfg, dtype=dtype, **special), f, indent=2)
  tensors = {}
  for name, (path, shape, _) in tensor_map(cfg).items():
    arr = to_hf_layout(name, np.asarray(jax.device_get(_get(params, path)), np.float32), cfg)
    if tuple(arr.shape) != tuple(shape):
      raise ConfigError(f"export: {name} has shape {list(arr.shape)}, expected {list(shape)}")
    tensors[name] = np.ascontiguousarray(arr.astype(np_dtype))
  save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  if tokenizer is not None:
    tokenizer.tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    tok_name = lambda i: tokenizer.tokenizer.id_to_token(i) if i is not None else None  # noqa: E731
    tcfg = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=tok_name(tokenizer.bos_id),
                eos_token=tok_name(tokenizer.eos_id), pad_token=tok_name(tokenizer.pad_id),
                add_bos_token=False, clean_up_tokenization_spaces=False, model_max_length=cfg.max_seq_len)
    if tokenizer.chat_template:
      tcfg["chat_template"] = tokenizer.chat_template
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
      json.dump(tcfg, f, indent=2, ensure_ascii=False)
    gcfg = {k: v for k, v in dict(bos_token_id=tokenizer.bos_id, eos_token_id=list(tokenizer.eos_ids) or None,
                                  pad_token_id=tokenizer.pad_id).items() if v is not None}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
      json.dump(gcfg, f, indent=2)
  return out_dir
