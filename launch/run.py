r"""lmx's one entry point: ``python launch/run.py --config=configs/<method>.py[:variant] [--workdir=DIR]``.

Overrides: ``--config.train.steps=100 --config.optim.lr=1e-3`` (typed, checked against the config's fields).
Multi-host: set ``LMX_DISTRIBUTED=1`` (auto on TPU pods) to call ``jax.distributed.initialize()``; for GPU
clusters or a CPU test also set ``LMX_COORDINATOR=host:port``, ``LMX_NUM_PROCESSES`` and ``LMX_PROCESS_ID``.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lmx import launcher  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/datm.py:smoke.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default runs/<method>-<timestamp>).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  return launcher.main(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  sys.exit(launcher.run_cli(main))
