"""Hugging Face checkpoints in lmx (``lmx.models.hf``, ``lmx.datasets.tokenizer``) against the reference
implementation: logits, greedy continuations and tokenizer ids recorded with transformers by
``tests/data/hf/make_reference.py`` (tiny random Llama with llama3 RoPE scaling, GQA, head_dim != D/H, untied,
bf16 on disk; tiny random Qwen2 with q/k/v biases, tied, float32, sharded), the left-padded row scored through
``segment_ids_BT`` against HF with its attention mask; errors that name the tensor or file; and a live
comparison with freshly built transformers models when transformers and torch are importable."""
import dataclasses
import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lmx.core import mesh as mesh_lib
from lmx.core.config import ConfigError
from lmx.datasets.tokenizer import HFTokenizer
from lmx.models import generate as gen
from lmx.models import hf, registry

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "hf")
LLAMA, QWEN2 = os.path.join(DATA, "tiny_llama"), os.path.join(DATA, "tiny_qwen2")
QWEN3, MISTRAL = os.path.join(DATA, "tiny_qwen3"), os.path.join(DATA, "tiny_mistral")
ALL = pytest.mark.parametrize("path", [LLAMA, QWEN2, QWEN3, MISTRAL], ids=["llama", "qwen2", "qwen3", "mistral"])
TOL = 1e-4


def _reference(path):
  return dict(np.load(os.path.join(path, "reference.npz")))


def _logits(model, params, ref):
  seg_BT = jnp.asarray(ref["attention_mask"], jnp.int32)  # 1 = real, 0 = left padding
  return np.asarray(model.apply(params, jnp.asarray(ref["tokens"], jnp.int32), segment_ids_BT=seg_BT))


def _max_diff(logits, ref):
  real = ref["attention_mask"].astype(bool)  # HF's outputs at padding positions are not compared
  return float(np.abs(logits - ref["logits"])[real].max())


@ALL
def test_logits_match_transformers(path):
  cfg, model, params = hf.load_hf(path, dtype="float32")
  ref = _reference(path)
  diff = _max_diff(_logits(model, params, ref), ref)
  print(f"{os.path.basename(path)}: max |logit diff| vs transformers = {diff:.2e}")
  assert diff <= TOL
  assert cfg.param_dtype == "float32" and params["embed"].dtype == jnp.float32


def test_configs_mapped():
  llama = hf.config_from_hf(hf.read_config(LLAMA))
  assert (llama.n_heads, llama.kv_heads, llama.head_dim, llama.d_model) == (4, 2, 24, 64)
  assert (llama.rope_scaling, llama.rope_scaling_factor, llama.rope_original_max_len) == ("llama3", 8.0, 32)
  assert (llama.norm_eps, llama.tie_embeddings, llama.qkv_bias, llama.dtype) == (1e-5, False, False, "bfloat16")
  qwen = hf.config_from_hf(hf.read_config(QWEN2))
  assert (qwen.qkv_bias, qwen.tie_embeddings, qwen.rope_theta, qwen.dtype) == (True, True, 1e6, "float32")
  # transformers-4 style fields (rope_theta + rope_scaling with "type", torch_dtype) map the same way.
  old = {k: v for k, v in hf.read_config(LLAMA).items() if k not in ("rope_parameters", "dtype")}
  old.update(rope_theta=10000.0, torch_dtype="bfloat16", rope_scaling={
      "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 32})
  assert hf.config_from_hf(old) == llama
  linear = dict(old, rope_scaling={"type": "linear", "factor": 2.0})
  assert hf.config_from_hf(linear).rope_scaling_factor == 2.0
  qwen3 = hf.config_from_hf(hf.read_config(QWEN3))
  assert (qwen3.qk_norm, qwen3.qkv_bias, qwen3.head_dim, qwen3.kv_heads, qwen3.tie_embeddings) == (True, False, 32, 2,
                                                                                                  True)
  mistral = hf.config_from_hf(hf.read_config(MISTRAL))
  assert (mistral.qk_norm, mistral.qkv_bias, mistral.max_seq_len) == (False, False, 128)


def test_qk_norm_and_a_binding_sliding_window():
  """Qwen3's q/k norm weights change the output (so the comparison with transformers sees them); a Mistral window
  shorter than the sequence length is refused, one at least as long is Llama's computation."""
  cfg, model, params = hf.load_hf(QWEN3, dtype="float32")
  ref = _reference(QWEN3)
  flat = jax.tree.map(lambda x: x, params)
  flat["blocks"][0]["attn"]["q_norm"]["scale"] = jnp.ones_like(flat["blocks"][0]["attn"]["q_norm"]["scale"])
  assert _max_diff(_logits(model, flat, ref), ref) > 100 * TOL
  windowed = dict(hf.read_config(MISTRAL), sliding_window=64)
  with pytest.raises(ConfigError, match="sliding_window=64 .Mistral's sliding-window attention. is not implemented"):
    hf.config_from_hf(windowed)
  assert hf.config_from_hf(windowed, max_seq_len=64).max_seq_len == 64
  assert hf.config_from_hf(dict(windowed, sliding_window=None)).max_seq_len == 128


def test_controls_each_feature_matters():
  """The comparison is sensitive to what the mapping gets right: no RoPE scaling, zeroed q/k/v biases or an
  untied copy of the wrong orientation each move the logits far past the tolerance."""
  cfg, _, params = hf.load_hf(LLAMA, dtype="float32")
  ref = _reference(LLAMA)
  plain = registry.transformer_model(dataclasses.replace(cfg, rope_scaling="none"))
  assert _max_diff(_logits(plain, params, ref), ref) > 1e-2
  cfg, model, params = hf.load_hf(QWEN2, dtype="float32")
  ref = _reference(QWEN2)
  no_bias = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if p[-1].key in ("bq", "bk", "bv") else x, params)
  assert _max_diff(_logits(model, no_bias, ref), ref) > 1e-2


def test_bf16_checkpoint_dtypes():
  """The bf16 checkpoint loads as bf16 by default (values equal to the float32 upcast), and its bf16 forward
  stays near the float32 reference (bf16 rounding only)."""
  cfg16, model16, p16 = hf.load_hf(LLAMA)
  _, _, p32 = hf.load_hf(LLAMA, dtype="float32")
  assert (cfg16.dtype, cfg16.param_dtype, p16["embed"].dtype) == ("bfloat16", "bfloat16", jnp.bfloat16)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b)), p16, p32)
  ref = _reference(LLAMA)
  logits = _logits(model16, p16, ref)
  assert logits.dtype == np.float32 and _max_diff(logits, ref) < 0.1 * np.abs(ref["logits"]).max()
  _, _, mixed = hf.load_hf(LLAMA, dtype="float32", param_dtype="bfloat16")
  assert mixed["embed"].dtype == jnp.bfloat16


@ALL
def test_greedy_generation_matches_transformers(path):
  make_reference = _make_reference()  # the prompts HF generated from
  _, model, params = hf.load_hf(path, dtype="float32")
  ref = _reference(path)
  prompt_BP, lens_B = gen.left_pad(make_reference.GEN_PROMPTS)
  out = gen.generate(nnx.merge(model.graphdef, params), prompt_BP, lens_B, jax.random.key(0), temperature=0.0,
                     max_new_tokens=make_reference.GEN_NEW)
  np.testing.assert_array_equal(np.asarray(out["new_tokens"]), ref["gen_new_tokens"])


def test_tokenizer_matches_transformers():
  tok = HFTokenizer.from_dir(LLAMA)
  with open(os.path.join(LLAMA, "tokenizer_reference.json")) as f:
    ref = json.load(f)
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (ref["bos_id"], ref["eos_id"], ref["pad_id"],
                                                                   ref["vocab_size"])
  for r in ref["records"]:
    assert tok.encode(r["text"]) == r["ids"]
    assert tok.encode(r["text"], add_special_tokens=False) == r["ids_no_special"]
    assert tok.decode(r["ids"]) == r["decoded"] == r["text"]
  assert tok.encode_batch([r["text"] for r in ref["records"]]) == [r["ids"] for r in ref["records"]]


def test_tokenizer_special_ids_from_generation_config(tmp_path):
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(LLAMA, name), tmp_path / name)
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
  tok = HFTokenizer.from_dir(str(tmp_path))
  assert tok.eos_ids == (2, 0) and tok.eos_id == 2 and tok.bos_id == 1
  (tmp_path / "tokenizer.json").unlink()
  with pytest.raises(ConfigError, match="tokenizer.json is missing"):
    HFTokenizer.from_dir(str(tmp_path))


def test_registry_and_mesh_placement():
  """``model.name='hf'`` through the registry: shapes without reading weights, a jitted sharded init that reads
  the checkpoint (what the loop does), and load_hf's tensor-by-tensor placement on a (fsdp=4, model=2) mesh."""
  model = registry.build_model(ml_collections.ConfigDict(dict(name="hf", hf_path=QWEN2, dtype="float32")))
  reads = []
  orig = hf.Checkpoint.read
  hf.Checkpoint.read = lambda self, name: reads.append(name) or orig(self, name)
  try:
    abstract = model.abstract_params()
    assert not reads and abstract["blocks"][1]["attn"]["bq"].shape == (4, 16)
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 4, "model": 2, "expert": 1})
    shardings = model.shardings(mesh, mesh_lib.DEFAULT_AXIS_RULES)
    with jax.set_mesh(mesh):
      params = jax.block_until_ready(jax.jit(model.init, out_shardings=shardings)(jax.random.key(0)))
    assert sorted(reads) == sorted(hf.tensor_map(model.cfg))  # each tensor read once for all 8 devices
  finally:
    hf.Checkpoint.read = orig
  _, _, placed = hf.load_hf(QWEN2, dtype="float32", mesh=mesh)
  assert placed["blocks"][0]["ffn"]["w1"].sharding.spec == shardings["blocks"][0]["ffn"]["w1"].spec
  assert placed["blocks"][0]["ffn"]["w1"].sharding.spec != jax.sharding.PartitionSpec()
  jax.tree.map(lambda a, b, s: (np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                                 assert_sharded(a, s), assert_sharded(b, s)), params, placed, shardings)
  ref = _reference(QWEN2)
  assert _max_diff(_logits(model, params, ref), ref) <= TOL
  eager = model.init(jax.random.key(0))  # no mesh: whole tensors on the default device
  np.testing.assert_array_equal(np.asarray(eager["blocks"][1]["attn"]["wq"]),
                                np.asarray(placed["blocks"][1]["attn"]["wq"]))


def assert_sharded(x, sharding):
  assert x.sharding.is_equivalent_to(sharding, x.ndim), (x.sharding, sharding)


def test_registry_field_errors():
  with pytest.raises(ConfigError, match="model.hf_path is required"):
    registry.build_model(ml_collections.ConfigDict(dict(name="hf")))
  with pytest.raises(ConfigError, match=r"unknown field\(s\) \['d_model'\]"):
    registry.build_model(ml_collections.ConfigDict(dict(name="hf", hf_path=QWEN2, d_model=8)))


# --- broken checkpoints ---------------------------------------------------------------------------------------

def _copy(src, tmp_path):
  dst = tmp_path / os.path.basename(src)
  shutil.copytree(src, dst)
  return dst


def _rewrite_tensors(file, fn):
  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(file))
  fn(tensors)
  save_file(tensors, str(file), metadata={"format": "pt"})


def test_wrong_shape_names_tensor(tmp_path):
  d = _copy(LLAMA, tmp_path)
  name = "model.layers.1.mlp.up_proj.weight"
  _rewrite_tensors(d / "model.safetensors", lambda t: t.update({name: t[name][:-1]}))
  with pytest.raises(ConfigError, match=rf"tensor '{name}' in model.safetensors has shape \[95, 64\], but "
                                        r"config.json implies \[96, 64\]"):
    hf.load_hf(str(d))


def test_missing_tensor_names_tensor(tmp_path):
  d = _copy(LLAMA, tmp_path)
  name = "model.layers.0.self_attn.k_proj.weight"
  _rewrite_tensors(d / "model.safetensors", lambda t: t.pop(name))
  with pytest.raises(ConfigError, match=rf"tensor '{name}' is missing from the checkpoint"):
    hf.load_hf(str(d))
  # config.json that promises more layers than the checkpoint has
  d2 = _copy(QWEN2, tmp_path / "q")
  cfg = json.loads((d2 / "config.json").read_text())
  (d2 / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=3)))
  with pytest.raises(ConfigError, match=r"tensor 'model.layers.2.[a-z_.]+' is missing"):
    registry.build_model(ml_collections.ConfigDict(dict(name="hf", hf_path=str(d2))))


@pytest.mark.parametrize("arch,extra,match", [
    ("MixtralForCausalLM", {}, "MixtralForCausalLM is not supported .its sparse MoE"),
    ("GPTNeoXForCausalLM", {}, "GPTNeoXForCausalLM is not supported"),
    ("FancyNewForCausalLM", {}, r"\['FancyNewForCausalLM'\] is not supported; supported: \['LlamaForCausalLM'"),
])
def test_unknown_architecture(tmp_path, arch, extra, match):
  d = _copy(LLAMA, tmp_path)
  cfg = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps(dict(cfg, architectures=[arch], **extra)))
  with pytest.raises(ConfigError, match=match) as e:
    hf.load_hf(str(d))
  assert "config.json" in str(e.value)


def test_unsupported_variants(tmp_path):
  base = hf.read_config(LLAMA)
  yarn = dict(base, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
  with pytest.raises(ConfigError, match="RoPE scaling type 'yarn' is not implemented"):
    hf.config_from_hf(yarn)
  with pytest.raises(ConfigError, match="attention_bias"):
    hf.config_from_hf(dict(base, attention_bias=True))
  with pytest.raises(ConfigError, match="sliding-window"):
    hf.config_from_hf(dict(hf.read_config(QWEN2), use_sliding_window=True))
  with pytest.raises(ConfigError, match="required field 'hidden_size' is missing"):
    hf.config_from_hf({k: v for k, v in base.items() if k != "hidden_size"})


def test_missing_config_and_weights(tmp_path):
  d = _copy(LLAMA, tmp_path)
  (d / "config.json").unlink()
  with pytest.raises(ConfigError, match=r"config.json is missing"):
    hf.load_hf(str(d))
  d2 = _copy(LLAMA, tmp_path / "w")
  (d2 / "model.safetensors").unlink()
  with pytest.raises(ConfigError, match=r"no model.safetensors, model.safetensors.index.json"):
    hf.load_hf(str(d2))
  d3 = _copy(QWEN2, tmp_path / "s")
  (d3 / "model-00002-of-00003.safetensors").unlink()
  with pytest.raises(ConfigError, match=r"model-00002-of-00003.safetensors is missing"):
    hf.load_hf(str(d3))
  with pytest.raises(ConfigError, match="is not a directory"):
    hf.load_hf(str(tmp_path / "nowhere"))


def test_corrupt_safetensors_names_file(tmp_path):
  d = _copy(LLAMA, tmp_path)
  (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
  with pytest.raises(ConfigError, match=r"model.safetensors is not a readable safetensors file"):
    hf.load_hf(str(d))
  d2 = _copy(LLAMA, tmp_path / "t")
  data = (d2 / "model.safetensors").read_bytes()
  (d2 / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated download
  with pytest.raises(ConfigError, match=r"model.safetensors is not a readable safetensors file"):
    hf.load_hf(str(d2))


# --- live comparison with transformers (skipped unless it is installed) --------------------------------------

def _make_reference():
  spec = importlib.util.spec_from_file_location("make_reference", os.path.join(DATA, "make_reference.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize("variant", ["llama_linear_tied_mha", "qwen2_untied_gqa"])
def test_live_against_transformers(tmp_path, variant):
  """Fresh random transformers models (other settings than the recorded ones) saved and loaded into lmx."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  mr = _make_reference()
  if variant == "llama_linear_tied_mha":
    config = mr.llama_config(num_key_value_heads=4, head_dim=16, tie_word_embeddings=True, rms_norm_eps=1e-6,
                             rope_theta=5e5, rope_scaling={"rope_type": "linear", "factor": 3.0})
  else:
    config = mr.qwen2_config(num_key_value_heads=2, tie_word_embeddings=False, num_hidden_layers=3)
  model = mr.build(config, seed=7)
  mr.save(model, str(tmp_path))
  tokens, mask, positions = mr.batch(seed=5, b=3, t=16, pad=5)
  ref = {"tokens": tokens, "attention_mask": mask, "logits": mr.reference_logits(model, tokens, mask, positions)}
  _, lmx_model, params = hf.load_hf(str(tmp_path), dtype="float32")
  diff = _max_diff(_logits(lmx_model, params, ref), ref)
  print(f"live {variant}: max |logit diff| vs transformers = {diff:.2e}")
  assert diff <= TOL
  prompt_BP, lens_B = gen.left_pad(mr.GEN_PROMPTS)
  out = gen.generate(nnx.merge(lmx_model.graphdef, params), prompt_BP, lens_B, jax.random.key(0), temperature=0.0,
                     max_new_tokens=mr.GEN_NEW)
  np.testing.assert_array_equal(np.asarray(out["new_tokens"]), mr.reference_generate(model))


def test_lm_validates_a_hugging_face_model_by_its_own_vocabulary():
  """configs/lm.py with model.name='hf': the vocabulary check reads the checkpoint's config.json (300 here), so a
  config without model.vocab_size validates."""
  from lmx.core.config import load_config_file
  lm_run = importlib.import_module("lmx.train.lm")

  c = load_config_file(os.path.join(os.path.dirname(DATA), "..", "..", "configs", "lm.py") + ":smoke")
  c.model = ml_collections.ConfigDict(dict(name="hf", hf_path=QWEN2, dtype="float32"))
  model = lm_run.validate(c)
  assert model.cfg.vocab_size == 300


@pytest.mark.parametrize("path", [LLAMA, QWEN2, QWEN3], ids=["llama", "qwen2", "qwen3"])
def test_export_reloads_with_the_same_weights_and_the_recorded_logits(tmp_path, path):
  """save_hf writes config.json, model.safetensors and the tokenizer files; load_hf reads back every tensor
  exactly, and the reloaded model matches transformers' recorded logits (so the export's layouts are HF's)."""
  cfg, model, params = hf.load_hf(path, dtype="float32")
  tok = HFTokenizer.from_dir(LLAMA)
  out = hf.save_hf(str(tmp_path / "export"), cfg, params, tok)
  written = json.load(open(os.path.join(out, "config.json")))
  original = hf.read_config(path)
  for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
              "vocab_size", "tie_word_embeddings", "rope_theta"):
    assert written[key] == original.get(key, written[key]), key
  assert written["architectures"] == original["architectures"]
  cfg2, model2, params2 = hf.load_hf(out, dtype="float32")
  assert cfg2 == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ref = _reference(path)
  assert _max_diff(_logits(model2, params2, ref), ref) <= TOL
  tok2 = HFTokenizer.from_dir(out)
  assert tok2.encode("Hello world!") == tok.encode("Hello world!") and tok2.eos_ids == tok.eos_ids
  with pytest.raises(ConfigError, match="export dtype 'int8'"):
    hf.save_hf(str(tmp_path / "bad"), cfg, params, dtype="int8")


def test_export_loads_in_transformers_with_the_same_logits(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  import torch
  from transformers import AutoModelForCausalLM

  cfg, model, params = hf.load_hf(QWEN2, dtype="float32")
  out = hf.save_hf(str(tmp_path / "export"), cfg, params)
  ref = _reference(QWEN2)
  tokens = np.asarray(ref["tokens"])[:-1]  # the rows without left padding
  theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    want = theirs(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
  got = np.asarray(model.apply(params, jnp.asarray(tokens, jnp.int32)))
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
