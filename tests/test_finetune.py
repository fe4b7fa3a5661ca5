"""Fine-tuning through the shared loop (``lmx.models.finetune``, ``configs/lm.py:smollm2_*``): LoRA adapters merged
as ``W + (alpha/r) A B`` (numpy), their gradient (finite differences), what trains and what stays frozen, the
checkpoint holding the adapters only, SIGTERM resume through the launcher, export with the adapters merged, and a
text file as the training data."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file

from lmx.core.config import ConfigError
from lmx.core.rng import rng_stream
from lmx.models import finetune, registry

import resume_check as rc

TINY = "configs/lm.py:smollm2_tiny_lora"


def _tiny():
  return registry.build_model(ml_collections.ConfigDict(dict(name="smollm2-tiny")))


def test_merge_is_w_plus_scaled_a_b_in_numpy():
  """Each adapted weight becomes W + (alpha/r) · A B: the [D, H, E] q/k/v layout, the [H, E, D] output layout
  (two input axes) and a 2-d SwiGLU weight, against numpy einsums; weights without adapters are untouched."""
  model = _tiny()
  params = model.init(jax.random.key(0))
  ft = finetune.Finetune(n_layers=2, lora_rank=3, lora_alpha=6.0, lora_targets=("q_proj", "o_proj", "down_proj"),
                         freeze_layers=1)
  ad = ft.init_adapters(jax.random.key(1), model.abstract_params())
  assert list(ad["blocks"]) == [1]  # only the layers at or above freeze_layers
  ad = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape), ad)  # B ≠ 0
  merged = ft.full_params(ad, params)
  a, b = (np.asarray(ad["blocks"][1]["attn"]["wq"][k]) for k in "ab")
  want = np.asarray(params["blocks"][1]["attn"]["wq"]) + 2.0 * np.einsum("dr,rhe->dhe", a, b)
  np.testing.assert_allclose(np.asarray(merged["blocks"][1]["attn"]["wq"]), want, rtol=1e-5, atol=1e-6)
  a, b = (np.asarray(ad["blocks"][1]["attn"]["wo"][k]) for k in "ab")
  want = np.asarray(params["blocks"][1]["attn"]["wo"]) + 2.0 * np.einsum("her,rd->hed", a, b)
  np.testing.assert_allclose(np.asarray(merged["blocks"][1]["attn"]["wo"]), want, rtol=1e-5, atol=1e-6)
  a, b = (np.asarray(ad["blocks"][1]["ffn"]["w2"][k]) for k in "ab")
  want = np.asarray(params["blocks"][1]["ffn"]["w2"]) + 2.0 * a @ b
  np.testing.assert_allclose(np.asarray(merged["blocks"][1]["ffn"]["w2"]), want, rtol=1e-5, atol=1e-6)
  for path in (("blocks", 0, "attn", "wq"), ("blocks", 1, "attn", "wk"), ("embed",)):
    x, y = merged, params
    for k in path:
      x, y = x[k], y[k]
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_fresh_adapters_leave_the_model_unchanged_and_a_has_the_stated_scale():
  model = _tiny()
  params = model.init(jax.random.key(0))
  ft = finetune.Finetune(n_layers=2, lora_rank=8)
  ad = ft.init_adapters(jax.random.key(1), model.abstract_params())
  tokens = jnp.arange(24, dtype=jnp.int32).reshape(2, 12)
  np.testing.assert_array_equal(np.asarray(model.apply(ft.full_params(ad, params), tokens)),
                                np.asarray(model.apply(params, tokens)))
  a = np.concatenate([np.asarray(ad["blocks"][i][m][w]["a"]).ravel() for i in (0, 1)
                      for m, w in (("attn", "wq"), ("ffn", "w1"))])
  assert abs(a.std() * np.sqrt(64) - 1.0) < 0.05  # std 1/sqrt(fan_in), fan_in = d_model = 64
  assert all(not np.any(np.asarray(x["b"])) for x in jax.tree.leaves(ad, is_leaf=lambda x: "b" in x))


def test_adapters_beside_the_weights_compute_the_merged_model():
  """The step's forward (``x W + (x A)(alpha/r) B`` in every adapted projection, MoE-free blocks) equals the
  forward of the merged weights ``W + (alpha/r) A B``, with and without rematerialisation."""
  import dataclasses

  model = _tiny()
  params = model.init(jax.random.key(0))
  ft = finetune.Finetune(n_layers=2, lora_rank=4, lora_alpha=12.0)
  ad = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(5), x.shape),
                    ft.init_adapters(jax.random.key(1), model.abstract_params()))
  tokens = jax.random.randint(jax.random.key(6), (2, 20), 0, 49152)
  merged = np.asarray(model.apply(ft.full_params(ad, params), tokens))
  base = np.asarray(model.apply(params, tokens))
  assert np.abs(merged - base).max() > 1e-3  # the adapters change the output
  p, lora = ft.apply_args(ad, params)
  np.testing.assert_allclose(np.asarray(model.apply(p, tokens, lora=lora)), merged, rtol=2e-4, atol=2e-4)
  remat = registry.transformer_model(dataclasses.replace(model.cfg, remat="full"))
  np.testing.assert_allclose(np.asarray(jax.jit(lambda q, lo: remat.apply(q, tokens, lora=lo))(p, lora)), merged,
                             rtol=2e-4, atol=2e-4)


def test_adapter_gradient_matches_finite_differences():
  """d loss / d A and d B through the merged weights, against central differences of the loss (float32)."""
  from lmx.train.lm import lm_loss

  model = _tiny()
  params = model.init(jax.random.key(0))
  ft = finetune.Finetune(n_layers=2, lora_rank=2, lora_alpha=4.0, lora_targets=("v_proj", "up_proj"))
  ad = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape),
                    ft.init_adapters(jax.random.key(1), model.abstract_params()))
  tokens = jax.random.randint(jax.random.key(4), (2, 17), 0, 49152)
  loss = jax.jit(lambda a: lm_loss(model, ft)(a, params, tokens, None)[0])
  grads = jax.grad(loss)(ad)
  eps = 1e-2
  for path in ((1, "attn", "wv", "a", (3, 1)), (0, "ffn", "w3", "b", (1, 5)), (1, "ffn", "w3", "a", (7, 0))):
    i, mod, w, kind, idx = path
    base = np.asarray(ad["blocks"][i][mod][w][kind])

    def at(delta):
      x = base.copy()
      x[idx] += delta
      new = jax.tree.map(lambda t: t, ad)
      new["blocks"][i][mod][w] = dict(new["blocks"][i][mod][w], **{kind: jnp.asarray(x)})
      return float(loss(new))

    fd = (at(eps) - at(-eps)) / (2 * eps)
    g = float(np.asarray(grads["blocks"][i][mod][w][kind])[idx])
    assert abs(fd - g) <= 2e-2 * abs(g) + 2e-4, (path, fd, g)


def test_full_finetune_split_freezes_the_bottom_layers_and_embeddings():
  params = _tiny().abstract_params()
  ft = finetune.Finetune(n_layers=2, freeze_layers=1, freeze_embeddings=True)
  trainable, frozen = ft.split(params)
  assert sorted(trainable) == ["blocks", "final_norm"] and list(trainable["blocks"]) == [1]
  assert sorted(frozen) == ["blocks", "embed"] and list(frozen["blocks"]) == [0]
  assert jax.tree.structure(ft.full_params(trainable, frozen)) == jax.tree.structure(params)


@pytest.mark.parametrize("block, needle", [
    (dict(lora_rank=4, lora_targets=("q_proj", "qkv")), "unknown module(s) ['qkv']"),
    (dict(lora_rank=4, freeze_layers=2), "LoRA needs at least one trained layer"),
    (dict(freeze_layers=3), "the model has 2 layers"),
    (dict(lora_rank=4, lora_targets=()), "empty"),
])
def test_finetune_block_mistakes_name_the_field(block, needle):
  with pytest.raises(ConfigError, match="finetune") as e:
    finetune.from_config(ml_collections.ConfigDict(block), _tiny().cfg)
  assert needle in str(e.value)


def test_nothing_frozen_and_no_rank_is_plain_training():
  assert finetune.from_config(ml_collections.ConfigDict(dict(lora_rank=0)), _tiny().cfg) is None


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  return rc.reference_run(tmp_path_factory, "lora", TINY)


def test_lora_run_trains_the_adapters_only_and_keeps_them_alone_in_its_checkpoints(lora_run):
  """The tiny LoRA run: 8,192 trainable parameters (r=4 adapters on 7 projections of 2 layers, counted by hand),
  checkpoints holding the adapters and their Adam moments only, and load_run giving base + merged adapters."""
  import orbax.checkpoint as ocp

  work, _ = lora_run
  res = rc.results(work)
  # per layer: q 64·4+4·64, k and v 64·4+4·32 each, o 64·4+4·64, gate/up 64·4+4·128 each, down 128·4+4·64
  per_layer = (256 + 256) + 2 * (256 + 128) + (256 + 256) + 2 * (256 + 512) + (512 + 256)
  assert res["trainable_params"] == 2 * per_layer == 8192 and res["params"] > 3_000_000
  assert res["finetune"].startswith("LoRA r=4 alpha=8")
  step_dir = os.path.join(work, "checkpoints", str(res["steps"]), "state")
  raw = ocp.StandardCheckpointer().restore(step_dir)
  sizes = [np.size(x) for x in jax.tree.leaves(raw["params"])]
  assert sum(sizes) == 8192
  opt_sizes = sum(np.size(x) for x in jax.tree.leaves(raw["opt_state"]))
  assert opt_sizes < 3 * 8192  # Adam's two moments of the adapters and a few counters: no 3M-parameter tree
  # load_run: the model's own weights (rng_stream(seed, "base") for this random stand-in) + (alpha/r) A B
  config, model, params = registry.load_run(str(work))
  base = jax.jit(model.init)(rng_stream(0, "base"))
  ad = raw["params"]["blocks"]["1"]["attn"]["wq"]
  want = np.asarray(base["blocks"][1]["attn"]["wq"]) + 2.0 * np.einsum("dr,rhe->dhe", ad["a"], ad["b"])
  np.testing.assert_allclose(np.asarray(params["blocks"][1]["attn"]["wq"]), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(params["embed"]), np.asarray(base["embed"]))
  assert np.abs(np.asarray(ad["b"])).max() > 0  # the adapters moved


def test_lora_finetune_resumes_after_sigterm_exactly(lora_run, tmp_path):
  rc.check_sigterm_resume(tmp_path, TINY, reference=lora_run[0])


def test_export_of_a_lora_run_writes_the_merged_weights_and_the_tokenizer(lora_run, tmp_path):
  """tools/export_hf.py --workdir of a LoRA run: q_proj in HF's [out, in] layout equals the merged weight, and the
  tokenizer the run trained with is written next to it."""
  import subprocess
  import sys

  work, _ = lora_run
  out = tmp_path / "export"
  r = subprocess.run([sys.executable, os.path.join(rc.ROOT, "tools", "export_hf.py"), f"--workdir={work}",
                      f"--out={out}"], capture_output=True, text=True, env=rc.env(), cwd=rc.ROOT, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  _, _, params = registry.load_run(str(work))
  w = load_file(str(out / "model.safetensors"))["model.layers.1.self_attn.q_proj.weight"]
  np.testing.assert_allclose(w, np.asarray(params["blocks"][1]["attn"]["wq"]).reshape(64, -1).T, rtol=1e-6)
  assert json.load(open(out / "tokenizer_config.json")).get("chat_template")
  assert os.path.exists(out / "tokenizer.json")


def test_full_finetune_with_frozen_bottom_layer_trains_only_the_rest(tmp_path):
  """lora_rank=0, freeze_layers=1, freeze_embeddings: after the run, layer 0 and the embedding are the model's
  initial weights bit for bit, layer 1 moved."""
  work = tmp_path / "full"
  r = rc.run(TINY, work, "--config.finetune.lora_rank=0", "--config.finetune.freeze_layers=1",
             "--config.finetune.freeze_embeddings=True", "--config.train.steps=4", "--config.train.ckpt_every=4",
             "--config.train.eval_every=4")
  assert r.returncode == 0, rc.fail(r, "full fine-tune")
  _, model, params = registry.load_run(str(work))
  base = jax.jit(model.init)(rng_stream(0, "base"))
  for path in (("embed",), ("blocks", 0, "attn", "wq"), ("blocks", 0, "ffn", "w2")):
    x, y = params, base
    for k in path:
      x, y = x[k], y[k]
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert not np.array_equal(np.asarray(params["blocks"][1]["attn"]["wq"]), np.asarray(base["blocks"][1]["attn"]["wq"]))
  assert rc.results(work)["finetune"] == "full, layers < 1 frozen, embeddings frozen"


def test_a_text_file_is_the_training_data_and_mistakes_are_one_line(tmp_path):
  text_file = tmp_path / "notes.txt"
  text_file.write_text("\n\n".join(f"Note {i}: the quick brown fox jumps over {i} lazy dogs." * 6
                                   for i in range(40)), encoding="utf-8")
  work = tmp_path / "file"
  r = rc.run(TINY, work, f"--config.data.text_file={text_file}", "--config.train.steps=2",
             "--config.train.ckpt_every=2", "--config.train.eval_every=2", "--config.data.seq_len=32")
  assert r.returncode == 0, rc.fail(r, "text file run")
  split = rc.results(work)["data_split"]
  assert split["train_documents"] + split["eval_documents"] == 40
  assert split["eval_document_ids"][0].startswith("notes.txt:")
  missing = rc.run(TINY, tmp_path / "missing", "--config.data.text_file=/nonexistent/notes.txt")
  assert missing.returncode == 2 and "data.text_file='/nonexistent/notes.txt': no such file" in missing.stderr
  assert not os.path.exists(tmp_path / "missing" / "checkpoints")
  bad = tmp_path / "latin1.txt"
  bad.write_bytes("caf\xe9\n\nna\xefve".encode("latin-1"))
  r = rc.run(TINY, tmp_path / "bad", f"--config.data.text_file={bad}")
  assert r.returncode == 2 and "not UTF-8 text" in r.stderr


def test_model_tokenizer_needs_a_model_that_has_one(tmp_path):
  r = rc.run("configs/lm.py:smoke", tmp_path / "w", "--config.data.tokenizer=model")
  assert r.returncode == 2 and "model.name='transformer' has no tokenizer of its own" in r.stderr
