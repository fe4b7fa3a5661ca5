"""Config variants, overrides and validation errors."""
import glob
import os

import pytest

from lmx import launcher
from lmx.core import config as config_lib
from lmx.core.config import ConfigError
from lmx.core.mesh import mesh_shape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def _variants(path):
  import importlib.util

  spec = importlib.util.spec_from_file_location("cfg_mod", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return getattr(mod, "VARIANTS", ("",))


@pytest.mark.parametrize("path", [p for p in CONFIG_FILES if not p.endswith("common.py")])
def test_every_variant_builds_and_names_a_method(path):
  for v in _variants(path):
    cfg = config_lib.load_config_file(f"{path}:{v}" if v else path)
    assert cfg.method in launcher.available_methods(), (path, v)


def test_parse_arg_forms():
  a = config_lib.parse_arg("smoke", seed=0)
  assert a.variant == "smoke" and a.seed == 0
  b = config_lib.parse_arg("variant=smoke,seed=3,flag=true", seed=0, flag=False)
  assert (b.variant, b.seed, b.flag) == ("smoke", 3, True)
  with pytest.raises(ConfigError, match="unknown; valid args"):
    config_lib.parse_arg("nope=1", seed=0)
  with pytest.raises(ConfigError, match="expected int"):
    config_lib.parse_arg("seed=x", seed=0)
  with pytest.raises(ConfigError, match="valid variants"):
    config_lib.parse_arg("bogus", variants=("", "smoke"))


def test_override_error_names_field_and_choices():
  argv = ["run.py", f"--config={ROOT}/configs/lm.py:smoke", "--config.train.stepz=3"]
  msg = launcher._explain_override(argv, AttributeError("stepz"))
  assert "train has no field 'stepz'" in msg and "'steps'" in msg


def test_mesh_validation():
  assert mesh_shape({"data": -1, "fsdp": 2, "model": 2}, 8) == {"data": 2, "fsdp": 2, "model": 2, "expert": 1}
  with pytest.raises(ConfigError, match="multiply to"):
    mesh_shape({"data": 2, "fsdp": 2}, 8)
  with pytest.raises(ConfigError, match="unknown axis"):
    mesh_shape({"tensor": 2}, 8)
  with pytest.raises(ConfigError, match="only one axis"):
    mesh_shape({"data": -1, "fsdp": -1}, 8)


def test_model_validation_names_fields():
  from lmx.models.transformer import TransformerConfig

  with pytest.raises(ConfigError, match="model.d_model=64 is not divisible by model.n_heads=3"):
    TransformerConfig.from_config(dict(d_model=64, n_heads=3))
  with pytest.raises(ConfigError, match="unknown field"):
    TransformerConfig.from_config(dict(d_modle=64))


def test_lm_validation_rejects_bad_fields():
  from lmx.train.lm import validate

  cfg = config_lib.load_config_file(f"{ROOT}/configs/lm.py:smoke")
  cfg.data.seq_len = 10_000
  with pytest.raises(ConfigError, match="data.seq_len"):
    validate(cfg)


def test_range_helpers_and_the_launcher_reject_nan_and_inf():
  import ml_collections

  for bad in (float("inf"), float("nan"), float("-inf")):
    for check in (config_lib.positive, config_lib.finite_positive, config_lib.non_negative, config_lib.finite):
      with pytest.raises(ConfigError, match=r"distill.lr_img: must be a finite number"):
        check(bad, "distill.lr_img")
  config_lib.positive(3, "experts.num")
  config_lib.non_negative(0.0, "experts.weight_decay")
  with pytest.raises(ConfigError, match=r"experts.num: must be > 0, got 0"):
    config_lib.positive(0, "experts.num")
  with pytest.raises(ConfigError, match="must be a finite number, got '1e-3'"):
    config_lib.finite("1e-3", "optim.lr")
  cfg = ml_collections.ConfigDict({"method": "lm", "optim": {"lr": 1e-3, "b1": 0.9}, "data": {"sizes": [1.0, 2.0]},
                                   "name": "x", "flag": True})
  config_lib.check_finite_numbers(cfg)
  cfg.data.sizes = [1.0, float("nan")]
  with pytest.raises(ConfigError, match=r"^data.sizes.1: must be a finite number, got nan$"):
    config_lib.check_finite_numbers(cfg)
  cfg.data.sizes = [1.0]
  cfg.optim.lr = float("inf")
  with pytest.raises(ConfigError, match=r"^optim.lr: must be a finite number, got inf$"):
    config_lib.check_finite_numbers(cfg)
