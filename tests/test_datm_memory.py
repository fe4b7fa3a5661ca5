"""DATM peak-memory estimate: checked against XLA's compiled memory analysis of the real jitted steps, and every
paper preset's device parts against the 80 GB device budget."""
import pytest

from configs import datm as datm_config
from lmx.methods.datm import memory as M


def _config(**fields):
  c = datm_config.get_config("")
  for key, value in fields.items():
    section, name = key.split("__")
    c[section][name] = value
  return c


CASES = [  # small shapes that compile in seconds on CPU
    ("meta_step", dict(model__width=16, distill__batch_syn=20, distill__syn_steps=3, distill__unroll=False,
                       distill__remat=True)),
    pytest.param("meta_step", dict(data__dataset="cifar10", model__width=16, distill__batch_syn=50,
                                   distill__syn_steps=4, distill__unroll=False, distill__remat=True),
                 marks=pytest.mark.slow),
    ("expert_step", dict(data__dataset="cifar10", model__width=32, experts__parallel=2, experts__batch=32,
                         experts__gsam=True)),
    ("init_forward", dict(experts__fwd_chunk_experts=3, experts__fwd_chunk_images=200)),
    ("init_forward", dict(data__dataset="cifar10", model__width=64, experts__fwd_chunk_experts=2,
                          experts__fwd_chunk_images=100)),
]


@pytest.mark.parametrize("part,fields", CASES)
def test_estimate_within_2x_of_compiled_memory_analysis(part, fields):
  c = _config(**fields)
  measured = M.measure(c, part)  # argument + temp bytes of the real jitted step (native convolutions)
  est = M.estimate(c)[part]
  assert 0.5 <= est / measured <= 2.0, (part, est, measured)


def test_estimate_scales_with_what_it_should():
  c, big = _config(distill__batch_syn=20), _config(distill__batch_syn=40)
  assert M.estimate(big)["meta_step"] > 1.5 * M.estimate(c)["meta_step"]  # activations dominate at this size
  # the chunked forward block does not grow with the number of experts beyond one chunk
  assert (M.estimate(_config(experts__num=100))["init_forward"] == M.estimate(_config(experts__num=20))["init_forward"]
          < M.estimate(_config(experts__num=20, experts__fwd_chunk_experts=20))["init_forward"])
  # hand count: ConvNet-3 width 128 on CIFAR-10 has 320,010 parameters (datm.md §3), 504,420 with 100 classes
  assert M.convnet_sizes((32, 32, 3), 10, 3, 128)["P"] == 320010
  assert M.convnet_sizes((32, 32, 3), 100, 3, 128)["P"] == 504420


PAPER = [v for v in datm_config.VARIANTS if v.startswith("cifar")]


@pytest.mark.parametrize("variant", PAPER)
def test_paper_presets_fit_the_device_budget(variant):
  c = datm_config.get_config(variant)
  assert c.experts.batch == 256  # the paper's expert batch (buffer_FTD.py --batch_train=256)
  est = M.estimate(c)
  largest, size = M.check(c)  # raises ConfigError naming the part and its fields when over budget
  assert all(v <= M.DEVICE_BUDGET_BYTES for v in M.device_parts(est).values())
  assert largest == "expert_step" and size == max(M.device_parts(est).values())
  # the forward passes as they were before the chunking over experts (all 100 experts × 1000 images): over budget
  c.experts.update(fwd_chunk_experts=100, fwd_chunk_images=1000)
  assert M.estimate(c)["init_forward"] > M.DEVICE_BUDGET_BYTES
