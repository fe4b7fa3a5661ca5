r"""XManager launcher: one job per point of a sweep over config overrides, on local Docker or Vertex AI.

  pip install -e ".[launch]"
  xmanager launch launch/xm_launch.py -- --config=configs/datm.py:cifar10_ipc10 \
      --sweep='distill.syn_steps=40,80;seed=0,1' --executor=vertex --accelerator=A100=1 \
      --workdir_root=gs://BUCKET/lmx

``--sweep`` is ``;``-separated axes of ``field=v1,v2,...``; the jobs are their Cartesian product. Each job runs
``python -m launch.run --config=... --workdir=<root>/<title>/<index> --config.<field>=<value> ...``.
Open-source XManager's TPU path is Vertex (TPU_V2/V3 devices); for TPU VM pods use launch/tpu_vm.sh.
"""
from __future__ import annotations

import itertools
import re

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", None, "Config spec, e.g. configs/datm.py:smoke.")
_SWEEP = flags.DEFINE_string("sweep", "", "';'-separated 'field=v1,v2' axes (Cartesian product).")
_EXECUTOR = flags.DEFINE_enum("executor", "local", ["local", "vertex"], "Where jobs run.")
_ACCEL = flags.DEFINE_string("accelerator", "", "e.g. 'A100=1', 'T4=2', 'TPU_V3=8' (empty: CPU).")
_ROOT = flags.DEFINE_string("workdir_root", "runs", "Root directory (a gs:// path on Vertex).")
_TITLE = flags.DEFINE_string("title", "", "Experiment title (default: config file name).")
_BASE_IMAGE = flags.DEFINE_string("base_image", "python:3.11", "Docker base image.")
_EXTRA = flags.DEFINE_string("extra", "", "pip extra to install in the image: '', 'gpu' or 'tpu'.")


def parse_sweep(spec: str) -> list[dict[str, str]]:
  """'a.b=1,2;c=x' → [{'a.b': '1', 'c': 'x'}, {'a.b': '2', 'c': 'x'}] (one dict per job)."""
  axes = []
  for part in filter(None, (p.strip() for p in spec.split(";"))):
    if "=" not in part:
      raise ValueError(f"--sweep axis {part!r} must look like field=v1,v2")
    field, values = part.split("=", 1)
    field = field.strip().removeprefix("config.")
    if not re.fullmatch(r"[A-Za-z_][\w.]*", field):
      raise ValueError(f"--sweep field {field!r} is not a config path")
    axes.append([(field, v.strip()) for v in values.split(",")])
  return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def job_args(config: str, workdir_root: str, title: str, index: int, overrides: dict[str, str]) -> dict[str, str]:
  """Flags for one job of the sweep (XManager turns the dict into ``--key=value`` arguments)."""
  args = {"config": config, "workdir": f"{workdir_root.rstrip('/')}/{title}/{index}"}
  args.update({f"config.{k}": v for k, v in overrides.items()})
  return args


def requirements_kwargs(accelerator: str) -> dict[str, int]:
  """'A100=2' → {'A100': 2} for ``xm.JobRequirements``."""
  if not accelerator:
    return {}
  name, _, count = accelerator.partition("=")
  return {name.strip(): int(count or 1)}


def default_title(config: str) -> str:
  return re.sub(r"[^\w-]+", "-", config.split("/")[-1].replace(".py", "")).strip("-")


def main(argv):
  del argv
  from xmanager import xm, xm_local  # needs the `launch` extra

  title = _TITLE.value or default_title(_CONFIG.value)
  jobs = parse_sweep(_SWEEP.value)
  extra = f"[{_EXTRA.value}]" if _EXTRA.value else ""
  with xm_local.create_experiment(experiment_title=title) as experiment:
    if _EXECUTOR.value == "vertex":
      executor = xm_local.Vertex(requirements=xm.JobRequirements(**requirements_kwargs(_ACCEL.value)))
      spec = xm_local.Vertex.Spec()
    else:
      executor = xm_local.Local(requirements=xm.JobRequirements(**requirements_kwargs(_ACCEL.value)))
      spec = xm_local.Local.Spec()
    [executable] = experiment.package([xm.python_container(
        executor_spec=spec, path=".", base_image=_BASE_IMAGE.value,
        docker_instructions=["COPY lmx/ workdir/", "WORKDIR workdir", f"RUN pip install -e '.{extra}'"],
        entrypoint=xm.ModuleName("launch.run"), use_deep_module=True)])
    for i, overrides in enumerate(jobs):
      experiment.add(xm.Job(executable=executable, executor=executor,
                            args=job_args(_CONFIG.value, _ROOT.value, title, i, overrides)))


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
