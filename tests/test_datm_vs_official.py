"""Pure helpers of benchmarks/datm_vs_official.py: the FLOP/s accounting, the round summary and the parameter layout
conversion between lmx's ConvNet and the official PyTorch ConvNet (checked against an NCHW/OIHW forward written
here in jax; against the official module itself only where torch and a checkout are present)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import datm_vs_official as B
from lmx.models import convnet


def test_flops_rate():
  r = B.flops_rate(6e9, 2.0, 12e9)
  assert r["flops_per_sec"] == pytest.approx(3e9)
  assert r["fraction_of_matmul_peak"] == pytest.approx(0.25)
  assert B.flops_rate(None, 2.0, 12e9) == {"flops_per_sec": None, "fraction_of_matmul_peak": None}
  assert B.flops_rate(6e9, 2.0, None)["fraction_of_matmul_peak"] is None
  assert B.flops_rate(6e9, 0.0, 1e9)["flops_per_sec"] is None


def test_summarize_medians_over_all_iterations():
  rounds = [{"times": [1.0, 3.0], "matmul_peak_flops_per_sec": 10e9},
            {"times": [2.0, 2.5], "matmul_peak_flops_per_sec": 20e9},
            {"times": [9.0, 1.5], "matmul_peak_flops_per_sec": 30e9}]
  s = B.summarize(rounds, flops=4e9)
  assert s["seconds_per_iteration"] == pytest.approx(2.25)  # median of the six
  assert s["seconds_min"] == 1.0 and s["timed_iterations"] == 6
  assert s["round_medians"] == [2.0, 2.25, 5.25]
  assert s["matmul_peak_flops_per_sec"] == pytest.approx(20e9)
  assert s["flops_per_sec"] == pytest.approx(4e9 / 2.25)
  assert s["fraction_of_matmul_peak"] == pytest.approx(4e9 / 2.25 / 20e9)


def test_rel_diff():
  d = B.rel_diff(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 2.0]))
  assert d["max_abs"] == pytest.approx(1.0)
  assert d["rel_l2"] == pytest.approx(1.0 / 3.0)


def _params(image_HWC, width=8):
  return jax.tree.map(np.asarray, convnet.init_params(jax.random.key(0), image_HWC, 10, depth=3, width=width))


def _forward_torch_layout(flat, x_NCHW, first_pad):
  """The official ConvNet's forward (conv OIHW → GroupNorm(C, C) → ReLU → AvgPool2d(2) ×3 → NCHW flatten →
  x @ W.T + b) in jax, from the flat parameter list in ``parameters()`` order."""
  h, j = jnp.asarray(x_NCHW), 0
  for i in range(3):
    w, b, g, beta = (jnp.asarray(a) for a in flat[j:j + 4])
    j += 4
    pad = first_pad if i == 0 else 1
    h = jax.lax.conv_general_dilated(h, w, (1, 1), [(pad, pad)] * 2, dimension_numbers=("NCHW", "OIHW", "NCHW"))
    h = h + b[None, :, None, None]
    mean = h.mean(axis=(2, 3), keepdims=True)
    var = ((h - mean) ** 2).mean(axis=(2, 3), keepdims=True)
    h = (h - mean) / jnp.sqrt(var + 1e-5) * g[None, :, None, None] + beta[None, :, None, None]
    h = jax.nn.relu(h)
    n, c, hh, ww = h.shape
    h = h.reshape(n, c, hh // 2, 2, ww // 2, 2).mean(axis=(3, 5))
  h = h.reshape(h.shape[0], -1)
  return h @ jnp.asarray(flat[j]).T + jnp.asarray(flat[j + 1])


@pytest.mark.parametrize("image_HWC", [(28, 28, 1), (32, 32, 3)])
def test_param_layout_round_trip_and_forward(image_HWC):
  p = _params(image_HWC)
  flat = B.lmx_to_torch_params(p)
  shapes = [a.shape for a in flat]
  c = image_HWC[2]
  assert shapes[:4] == [(8, c, 3, 3), (8,), (8,), (8,)]
  assert shapes[-2:] == [(10, 8 * 4 * 4), (10,)]
  back = B.torch_to_lmx_params(flat)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(p)):
    np.testing.assert_array_equal(a, b)
  x = np.random.default_rng(0).standard_normal((4,) + image_HWC).astype(np.float32)
  want = convnet.apply(p, jnp.asarray(x), conv_impl="xla")
  got = _forward_torch_layout(flat, x.transpose(0, 3, 1, 2), convnet.first_padding(image_HWC[0], c))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_rss_helpers():
  with B.RssSampler(interval=0.001) as s:
    junk = np.ones(4 << 20)  # 32 MiB
    junk[::4096] += 1
  assert s.peak >= B.rss_bytes() - (64 << 20)
  assert B.highwater_bytes() >= s.peak - (1 << 20)
  del junk


def test_official_convnet_matches_lmx():
  """The official ConvNet (``--official`` checkout in $DATM_OFFICIAL) on lmx's converted parameters."""
  torch = pytest.importorskip("torch")
  official = os.environ.get("DATM_OFFICIAL", "/tmp/datm_official")
  if not os.path.exists(os.path.join(official, "networks.py")):
    pytest.skip("no official DATM checkout (set DATM_OFFICIAL)")
  ub, ReparamModule, _ = B._import_official(official, 8)
  p = _params((28, 28, 1))
  net = ReparamModule(ub.get_network("ConvNet", 1, 10, (28, 28), dist=False))
  flat = torch.cat([torch.from_numpy(a).reshape(-1) for a in B.lmx_to_torch_params(p)])
  x = np.random.default_rng(0).standard_normal((4, 28, 28, 1)).astype(np.float32)
  got = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), flat_param=flat).detach().numpy()
  np.testing.assert_allclose(got, np.asarray(convnet.apply(p, jnp.asarray(x))), rtol=1e-4, atol=1e-5)


def test_markdown_table():
  runs = [{"kind": "round"},
          {"kind": "summary", "config": "B", "arm": "lmx", "threads": "XLA default", "seconds_per_iteration": 0.5,
           "rss_exec_peak_MiB": 800.0, "rss_exec_growth_MiB": 150.0, "xla_temp_plus_argument_plus_output_MiB": 152.1,
           "flops_per_iteration": 6e9, "flops_per_sec": 12e9, "matmul_peak_flops_per_sec": 60e9,
           "fraction_of_matmul_peak": 0.2},
          {"kind": "summary", "config": "B", "arm": "torch_t1", "threads": 1, "seconds_per_iteration": 0.6,
           "rss_exec_peak_MiB": 450.0, "rss_exec_growth_MiB": 120.0, "flops_per_iteration": 6e9,
           "flops_per_sec": 10e9, "matmul_peak_flops_per_sec": 50e9, "fraction_of_matmul_peak": 0.2}]
  t = B.markdown_table(runs).splitlines()
  assert len(t) == 4
  assert t[2].startswith("| B | lmx | XLA default | 0.500 | 800 (150) | 152 | 6.0 | 12.00 | 60.0 | 0.200 |")
  assert "| torch_t1 | 1 | 0.600 | 450 (120) | – |" in t[3]
