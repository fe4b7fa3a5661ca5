r"""lmx's one entry point: ``python launch/run.py --config=configs/<method>.py[:variant] [--workdir=DIR]``.

Rerunning the same command on a workdir resumes it (or, when it finished, says so and changes nothing); Ctrl-C
or SIGTERM stops after the current step with a checkpoint (exit 130 / 143); see the README's workdir section.

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
_FRESH = flags.DEFINE_bool("allow_fresh_start", False, "Start again from step 0 when the workdir's checkpoints "
                           "are all unreadable (otherwise such a run stops and asks for this flag).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _FRESH.value:
    os.environ["LMX_ALLOW_FRESH_START"] = "1"
  return launcher.main(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  sys.exit(launcher.run_cli(main))
