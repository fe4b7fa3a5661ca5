"""Helpers for the methods' config tests: load a config file's variant, set one field by its dotted name, and check
that validation refuses it with a one-line ConfigError naming the field."""
from __future__ import annotations

import importlib.util
import os
import re

import pytest

from lmx.core.config import ConfigError, load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(method: str, variant: str = ""):
  """``configs/<method>.py`` at ``variant`` ("" = the default), as the launcher builds it."""
  return load_config_file(os.path.join(ROOT, "configs", f"{method}.py") + (f":{variant}" if variant else ""))


def module(method: str):
  """The module of ``configs/<method>.py`` (its constants: variants, choices it states again)."""
  spec = importlib.util.spec_from_file_location(f"{method}_config", os.path.join(ROOT, "configs", f"{method}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def set_field(c, field: str, value) -> None:
  """Sets ``a.b.c`` (a new key too, as a typo on the command line would)."""
  *path, key = field.split(".")
  node = c
  for k in path:
    node = node[k]
  with node.unlocked():
    node[key] = value


def refuses(validate, c, field: str, value, match: str, *, anchored: bool = False) -> str:
  """``validate(c)`` with ``field`` set to ``value`` raises a one-line ConfigError matching ``match`` (at the
  start of the message when ``anchored``); returns the message."""
  set_field(c, field, value)
  with pytest.raises(ConfigError) as e:
    validate(c)
  msg = str(e.value)
  assert (re.match if anchored else re.search)(match, msg), msg
  assert "\n" not in msg, msg
  return msg
