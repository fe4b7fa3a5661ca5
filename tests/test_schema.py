"""lmx.core.schema: one declaration per field gives the defaults, the checks and their messages, the safe fields."""
import pytest

from lmx.core import schema
from lmx.core.config import ConfigError
from lmx.core.schema import F


def _config():
  return schema.build("schema_test", dict(
      seeds=F((0, 1), each=dict(ge=0, integer=True), nonempty=True),
      arms=F(("a", "b"), each=dict(choices=("a", "b", "c"))),
      rl=dict(steps=F(10, ge=1, integer=True), lr=F(3e-4, gt=0), every=F(2, ge=1, safe=True), whiten=True,
              mode=F("x", choices=("x", "y"))),
      model=schema.open_block(dict(d=8, anything="goes")),
      cache=F("", safe=True),
  ))


def test_defaults_and_safe_fields():
  c = _config()
  assert c.method == "schema_test" and c.rl.steps == 10 and c.rl.whiten is True and c.model.anything == "goes"
  assert set(schema.safe_fields("schema_test")) == {"rl.every", "cache"}
  schema.validate(c)


@pytest.mark.parametrize("path,value,needle", [
    ("rl.steps", 0, "rl.steps: must be a whole number and >= 1, got 0"),
    ("rl.lr", float("inf"), "rl.lr: must be a finite number, got inf"),
    ("rl.lr", float("nan"), "rl.lr: must be a finite number"),
    ("rl.lr", -1e-3, "rl.lr: must be > 0, got -0.001"),
    ("rl.mode", "z", "rl.mode: 'z' is not one of ['x', 'y']"),
    ("seeds", (0, -1), "seeds[1]: must be a whole number and >= 0, got -1"),
    ("seeds", (), "seeds: must not be empty"),
    ("arms", ("a", "d"), "arms[1]: 'd' is not one of ['a', 'b', 'c']"),
])
def test_each_wrong_value_is_named_with_what_is_allowed(path, value, needle):
  c = _config()
  block, _, key = path.rpartition(".")
  node = c[block] if block else c
  with node.unlocked() if hasattr(node, "unlocked") else _null():
    node[key] = value
  with pytest.raises(ConfigError) as e:
    schema.validate(c)
  assert str(e.value) == needle or str(e.value).startswith(needle)


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


def test_unknown_and_missing_fields_and_wrong_types():
  c = _config()
  c.rl.lr_typo = 1.0
  with pytest.raises(ConfigError, match=r"rl: unknown field\(s\) \['lr_typo'\]; valid: \['every', 'lr', 'mode', "):
    schema.validate(c)
  c = _config()
  del c.rl["every"]  # a config built by code may leave out a field: the code that reads it has the default
  schema.validate(c)
  c = _config()
  c.model.new_key = 3  # an open block's keys are its owner's to check
  schema.validate(c)
  c = _config()
  with c.rl.ignore_type():
    c.rl.whiten = "yes"
  with pytest.raises(ConfigError, match="rl.whiten: must be a boolean, got 'yes'"):
    schema.validate(c)


def test_a_resume_ignores_fields_declared_since_at_their_default(tmp_path):
  """A run recorded before a field existed resumes when the new field holds its declared default; any other
  value of it is a change the launcher refuses."""
  from lmx import launcher
  from lmx.core.results import jsonable

  c = _config()
  new = jsonable(c.to_dict())
  saved = jsonable(c.to_dict())
  del saved["rl"]["whiten"]  # the older run's config had no rl.whiten
  module = type("M", (), {})()
  assert launcher.plan_resume(module, saved, new, {"status": "running"}, str(tmp_path), quiet=True) == "resume"
  new["rl"]["whiten"] = False
  with pytest.raises(ConfigError, match=r"rl.whiten: '<absent>' → False"):
    launcher.plan_resume(module, saved, new, {"status": "running"}, str(tmp_path), quiet=True)


def test_block_of_reuses_a_declared_block_with_new_defaults():
  """Another config reuses a block with its checks and only the defaults replaced; a field the block lacks, or a
  block the method lacks, is a KeyError at config-build time."""
  _config()
  block = schema.block_of("schema_test", "rl", steps=7)
  assert block["steps"].default == 7 and block["steps"].ge == 1 and block["steps"].integer
  assert block["lr"] == schema.declared("schema_test")["rl.lr"]
  with pytest.raises(KeyError, match=r"no field\(s\) \['env_steps'\]"):
    schema.block_of("schema_test", "rl", env_steps=3)
  with pytest.raises(KeyError, match="no block 'nope'"):
    schema.block_of("schema_test", "nope")
