"""Benchmark helpers: the matmul precision and peak tables against hand-written spec values, and one tiny run of
benchmarks/lm_step.py whose JSON must agree with itself and with the analytic FLOP count."""
import json

import jax.numpy as jnp
import pytest

from benchmarks import common, lm_step


@pytest.mark.parametrize("dtype,backend,level,expected", [
    (jnp.bfloat16, "gpu", None, "bfloat16"),
    (jnp.float16, "tpu", "highest", "float16"),  # 16-bit inputs ignore the float32 precision setting
    (jnp.float32, "gpu", "default", "tf32"),  # JAX's default: TF32 tensor cores
    (jnp.float32, "cuda", "tensorfloat32", "tf32"),
    (jnp.float32, "gpu", "highest", "float32"),
    (jnp.float32, "tpu", "default", "bfloat16"),  # one bf16 pass
    (jnp.float32, "tpu", "high", "bf16_3x"),
    (jnp.float32, "tpu", "float32", "bf16_6x"),
    (jnp.float32, "cpu", "default", "float32"),
])
def test_matmul_precision(dtype, backend, level, expected):
  assert common.matmul_precision(dtype, backend, level) == expected


@pytest.mark.parametrize("kind,precision,expected", [
    ("NVIDIA H100 80GB HBM3", "tf32", 494.7e12),
    ("NVIDIA H200", "bfloat16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "float32", 19.5e12),
    ("TPU v5 lite", "bfloat16", 197e12),  # not v5p's 459
    ("TPU v5p", "bfloat16", 459e12),
    ("TPU v4", "bf16_6x", 275e12 / 6),
    ("TPU v4", "tf32", None),
    ("cpu", "float32", None),
])
def test_spec_peak_flops(kind, precision, expected):
  got = common.spec_peak_flops(kind, precision)
  assert got == (pytest.approx(expected) if expected else None)


def test_measured_matmul_peak_counts_2n3_flops():
  m = common.measured_matmul_peak("float32", n=128, steps=2)
  assert m["flops_per_sec"] == pytest.approx(2 * 128 ** 3 / m["seconds_median"])
  assert m["flops_per_sec"] > 1e6


def test_lm_step_writes_consistent_json(tmp_path):
  out = tmp_path / "lm_step.json"
  lm_step.SIZES["tiny"] = (("dense", "", {"n_layers": 1, "d_model": 64, "d_ff": 128}),)
  try:
    lm_step.main(["--size=tiny", "--batch=8", "--seq=32", "--steps=2", "--out", str(out)])
  finally:
    del lm_step.SIZES["tiny"]
  r = json.loads(out.read_text())
  ts = r["models"]["dense"]["train_step"]
  assert ts["tokens_per_step"] == 256
  assert ts["tokens_per_sec"] == pytest.approx(256 / ts["step_seconds_median"])
  assert ts["matmul_precision"] == "float32" and ts["mfu"] is None  # CPU: no spec peak
  assert ts["of_measured_matmul_peak"] == pytest.approx(
      ts["analytic_flops"] / ts["step_seconds_median"]
      / (ts["devices"] * r["matmul_peak"]["float32"]["flops_per_sec"]))
  # Dense model, no remat: XLA's count agrees with 6·N·D + attention to within the elementwise work.
  assert 0.9 < ts["flops_ratio"] < 1.6
  assert ts["nonfinite_steps_skipped"] == 0
  att = r["models"]["dense"]["attention"]
  assert att["auto"]["chooses"] == "xla" and "xla" in att and att["xla"]["max_abs_diff_vs_xla"] == 0.0
  assert att["pallas"]["max_abs_diff_vs_xla"] < 1e-4  # the interpreted kernel, checked against XLA


@pytest.mark.parametrize("platform,impl,marker", [("cuda", "pallas", "cuda_kernel_calls"),
                                                  ("tpu", "auto", "tpu_kernel_calls")])
def test_the_125m_train_step_lowers_for_its_accelerator_with_the_compiled_kernels(tmp_path, platform, impl, marker):
  out = tmp_path / "lowered.json"
  lm_step.main(["--size=125m", f"--lower_for={platform}", f"--attention_impl={impl}", "--out", str(out)])
  low = json.loads(out.read_text())["models"]["125m"]["lowered"]
  other = "tpu_kernel_calls" if platform == "cuda" else "cuda_kernel_calls"
  assert low[marker] >= 1 and low[other] == 0


def test_device_suite_dry_lowers_every_item_for_cuda(tmp_path):
  """benchmarks/device_suite.py --dry: the GPU call's programs (attention impls, the 125m train step, SmolLM2 decode
  and LoRA step, DATM's CIFAR meta-step) all lower for cuda from this host, the Pallas flash kernel among them (cuDNN's
  attention is not traceable without cuDNN: noted, timed on the GPU), in one JSON."""
  from benchmarks import device_suite

  out = tmp_path / "dry.json"
  assert device_suite.main(["--dry", f"--out={out}"]) == 0
  r = json.loads(out.read_text())
  runs = {x["item"]: x for x in r["runs"]}
  assert sorted(runs) == sorted(device_suite.ITEMS) and all(x["ok"] for x in runs.values())
  att = runs["attention"]
  assert att["pallas"]["fwd"]["pallas_kernel_calls"] >= 1 and att["pallas"]["fwd_bwd"]["pallas_kernel_calls"] >= 2
  assert att["xla"]["fwd"]["pallas_kernel_calls"] == 0 and "note" in att["cudnn"]
  assert runs["lm_125m"]["cuda_kernel_calls"] >= 1  # the 125m config's auto attention is the Pallas kernel on GPU
  assert runs["smollm2"]["decode_b16"]["stablehlo_chars"] > 0 and runs["smollm2"]["lora_step"]["stablehlo_chars"] > 0
  assert runs["datm_w128"]["stablehlo_chars"] > 0
  assert device_suite.main(["--dry", "--items=attention,warp_drive", f"--out={out}"]) == 2
