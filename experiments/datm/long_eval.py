r"""Re-evaluate saved synthetic sets with a longer evaluation (the "450-epoch" rows of experiments/datm/LOG.md).

    PYTHONPATH=. python experiments/datm/long_eval.py --workdir=runs/datm_ipc10 --other=runs/n10_it300 \
        --epochs=150,450 --nets=3 --out=ipc10_long_eval.json

Evaluates, with the default config's protocol and the run's learned step size: the *initial* synthetic set of
``--workdir`` (rebuilt from its expert buffer, as the run built it), the distilled set of ``--workdir`` and of each
``--other`` run.
"""
import argparse
import json
import os

import jax.numpy as jnp
import numpy as np

from configs import datm as cfgmod
from lmx.methods.datm import distill as D
from lmx.methods.datm import dsa, evaluate, experts

from lmx.methods.datm import driver as R  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--other", default="", help="comma-separated further run directories")
  ap.add_argument("--config", default="")
  ap.add_argument("--epochs", default="150,450")
  ap.add_argument("--nets", type=int, default=3)
  ap.add_argument("--out", default="long_eval.json")
  a = ap.parse_args()
  c = cfgmod.get_config(a.config)
  data = R.load_data(c)
  need = c.distill.max_start_epoch - 1 + c.distill.expert_epochs
  buf = experts.load_buffer(os.path.join(a.workdir, "experts"),
                            experts.expected_meta(c, data.image_shape, data.num_classes), min_epochs=need)
  syn0, _ = R.init_synthetic(c, data, buf)
  common = dict(num_classes=data.num_classes, model_cfg=c.model, num_nets=a.nets, batch=c.eval.batch,
                dsa_strategy=dsa.parse_strategy(c.data.dsa_strategy), use_vmap=False)
  z = np.load(os.path.join(a.workdir, "synthetic.npz"))
  sets = [("initial", syn0["x"], syn0["y"], float(z["lr"]))]
  for d in [a.workdir] + [o for o in a.other.split(",") if o]:
    z = np.load(os.path.join(d, "synthetic.npz"))
    sets.append((os.path.basename(os.path.normpath(d)), z["x"], z["y"], float(z["lr"])))
  out = {}
  for name, x, y, lr in sets:
    for ep in (int(e) for e in a.epochs.split(",")):
      accs = evaluate.train_and_test(c.seed, x, np.asarray(D.targets_of(jnp.asarray(y), c.distill.soft_labels)),
                                     data.x_test_NHWC, data.y_test_N, epochs=ep, lr=lr, **common)
      out[f"{name}_ep{ep}"] = evaluate.summarize(accs)
      print(name, ep, out[f"{name}_ep{ep}"], flush=True)
  with open(a.out, "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
