r"""Write a model as a Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer files) that
transformers and ``lmx.models.hf.load_hf`` load with the same logits.

  python tools/export_hf.py --model=smollm2-135m-instruct --out=exports/smollm2        # the GGUF, dequantised
  python tools/export_hf.py --workdir=runs/lm-smoke --out=exports/lm-smoke             # an lmx run's newest params
  python tools/export_hf.py --workdir=runs/ft --step=200 --tokenizer=smollm2-135m-instruct --out=exports/ft

``--model`` takes a name, a ``.gguf`` file or a checkpoint directory; ``--workdir`` an lmx run of a Llama/Qwen2-
shaped transformer (dense; a fine-tune's LoRA adapters merged into the weights; the tokenizer it trained with, or
``--tokenizer``). ``--dtype``: float32 (default), bfloat16 or float16.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--model", help="smollm2-135m-instruct, a .gguf file or a Hugging Face checkpoint directory")
  src.add_argument("--workdir", help="an lmx run whose params to export")
  p.add_argument("--step", type=int, default=None, help="the run's checkpoint step (default: its newest)")
  p.add_argument("--tokenizer", default=None, help="the tokenizer to write with a run's params (a model as --model)")
  p.add_argument("--out", required=True)
  p.add_argument("--dtype", default="float32")
  a = p.parse_args(argv)
  from lmx.core.config import ConfigError
  from lmx.models import chat, hf
  try:
    if a.model:
      lm = chat.load(a.model)
      cfg, params, tok = lm.cfg, lm.params, lm.tokenizer
    else:
      from lmx.models import registry
      config, model, params = registry.load_run(a.workdir, a.step)
      cfg = model.cfg
      tok = chat.load_tokenizer(a.tokenizer) if a.tokenizer else chat.run_tokenizer(config)
    out = hf.save_hf(a.out, cfg, params, tok, dtype=a.dtype)
  except (ConfigError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out}: {sorted(os.listdir(out))}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
