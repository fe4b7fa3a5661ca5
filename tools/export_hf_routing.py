r"""Export a Hugging Face MoE checkpoint's routing as lmx routing records (``.npz`` per layer; the format of
lmx/methods/moe_routing/records.py), so that ``configs/moe_routing.py:analyze`` can analyse OLMoE, Mixtral,
Qwen-MoE, ... checkpoints that lmx did not train.

  python tools/export_hf_routing.py --model=allenai/OLMoE-1B-7B-0924 --revision=<ckpt branch> --step=<S> \
      --out=D/olmoe [--text_file=held_out.txt] [--n_batches=50 --batch_size=8 --seq_len=256]
  python launch/run.py --config=configs/moe_routing.py:analyze --config.routing_dir=D --workdir=/tmp/moe/olmoe

(one export per checkpoint: ``--revision`` picks the checkpoint, ``--step`` names it in ``D/olmoe/step_<S>``.)

Router logits come from the model's own forward with ``output_router_logits=True`` (Mixtral, Qwen2/3-MoE, OLMoE,
...: one [B·T, E] tensor per MoE layer, MoE layers numbered 0.. in depth order). The choices follow the HF routers'
rule: softmax, then top-K (``config.num_experts_per_tok``); gates are the top-K probabilities, renormalised when
``config.norm_topk_prob`` (Mixtral always renormalises). HF inference is dropless: ``kept`` is all True. The
contribution estimator's ``contrib`` field is not exported. Text: ``--text_file`` (UTF-8) or, by default, the
held-out documents of lmx's embedded corpus, tokenised by the checkpoint's tokenizer; ``--random_tokens`` (no
tokenizer; for tests) draws uniform token ids.

Needs ``torch`` and ``transformers`` (not lmx dependencies: install them to use this script).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmx.methods.moe_routing import records  # noqa: E402


def routing_rule(config) -> tuple[int, bool]:
  """``(top_k, renormalise)`` of a HF MoE config."""
  k = getattr(config, "num_experts_per_tok", None) or getattr(config, "moe_topk", None)
  if k is None:
    raise ValueError(f"{type(config).__name__} has no num_experts_per_tok: not a routed MoE config")
  norm = getattr(config, "norm_topk_prob", None)
  if norm is None:
    norm = getattr(config, "model_type", "") == "mixtral"
  return int(k), bool(norm)


def route(logits_NE: np.ndarray, top_k: int, renormalise: bool):
  """``(experts [N, K], gates [N, K])``: softmax then top-K (ties by lower index), as the HF routers."""
  z = logits_NE.astype(np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  experts = np.argsort(-z, axis=-1, kind="stable")[:, :top_k]
  gates = np.take_along_axis(p, experts, -1)
  if renormalise:
    gates = gates / gates.sum(-1, keepdims=True)
  return experts.astype(np.int32), gates.astype(np.float32)


def router_logits(model, input_ids_BT) -> list[np.ndarray]:
  """The per-MoE-layer router logits [B·T, E] of the model's own forward on ``input_ids_BT`` (int array)."""
  import torch

  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(np.asarray(input_ids_BT), dtype=torch.long), output_router_logits=True)
  logits = getattr(out, "router_logits", None)
  if not logits:
    raise ValueError(f"{type(model).__name__} returned no router_logits: not a Hugging Face MoE model")
  b, t = np.asarray(input_ids_BT).shape
  out = []
  for x in logits:
    if isinstance(x, (tuple, list)):  # some versions return (logits, ...) per layer
      x = x[0]
    out.append(x.detach().float().cpu().numpy().reshape(b * t, -1))
  return out


def export(model, batches_BWT: np.ndarray, out_dir: str, step: int) -> list[str]:
  """Writes ``out_dir/step_<step>/layer_<l>.npz`` for every MoE layer of ``model`` over the batches [NB, W, T];
  returns the paths."""
  top_k, renorm = routing_rule(model.config)
  nb, w, t = batches_BWT.shape
  per_layer: dict[int, list[np.ndarray]] = {}
  for bi in range(nb):
    for layer, z in enumerate(router_logits(model, batches_BWT[bi])):
      per_layer.setdefault(layer, []).append(z)
  tok = batches_BWT.reshape(-1).astype(np.int32)
  pos = np.broadcast_to(np.arange(t, dtype=np.int32), (nb, w, t)).reshape(-1)
  batch = np.repeat(np.arange(nb, dtype=np.int32), w * t)
  paths = []
  for layer, zs in sorted(per_layer.items()):
    z = np.concatenate(zs).astype(np.float32)
    experts, gates = route(z, top_k, renorm)
    rec = records.RoutingRecord(router_logits=z, experts=experts, gates=gates, kept=np.ones(experts.shape, bool),
                                token_ids=tok, positions=pos, batch=batch, step=int(step), layer=layer)
    paths.append(records.write_record(records.record_path(out_dir, step, layer), rec))
  meta = {"model_type": getattr(model.config, "model_type", None), "top_k": top_k, "norm_topk_prob": renorm,
          "n_moe_layers": len(per_layer), "batches": [int(nb), int(w), int(t)]}
  with open(os.path.join(out_dir, f"step_{int(step)}", "export.json"), "w") as f:
    json.dump(meta, f, indent=1)
  return paths


def text_batches(tokenizer, text: str, n_batches: int, batch_size: int, seq_len: int) -> np.ndarray:
  """The first n_batches·batch_size non-overlapping windows of ``seq_len`` tokens of ``text`` [NB, W, T]."""
  ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int64)
  need = n_batches * batch_size * seq_len
  if len(ids) < need:
    raise ValueError(f"the text has {len(ids)} tokens; {n_batches} x {batch_size} x {seq_len} = {need} needed")
  return ids[:need].reshape(n_batches, batch_size, seq_len)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True, help="HF hub id or local directory of a MoE checkpoint")
  p.add_argument("--revision", default=None, help="hub revision (a training checkpoint's branch)")
  p.add_argument("--step", type=int, required=True, help="the checkpoint's training step (names step_<S>)")
  p.add_argument("--out", required=True, help="the run's routing folder (files go to <out>/step_<S>/)")
  p.add_argument("--text_file", default="", help="UTF-8 text (default: lmx's embedded held-out documents)")
  p.add_argument("--n_batches", type=int, default=50)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--random_tokens", action="store_true", help="uniform random token ids (no tokenizer)")
  p.add_argument("--dtype", default="float32", help="torch dtype to load the weights in")
  a = p.parse_args(argv)
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  model = AutoModelForCausalLM.from_pretrained(a.model, revision=a.revision, torch_dtype=getattr(torch, a.dtype))
  model.eval()
  if a.random_tokens:
    rng = np.random.default_rng(0)
    batches = rng.integers(0, model.config.vocab_size, (a.n_batches, a.batch_size, a.seq_len))
  else:
    tok = AutoTokenizer.from_pretrained(a.model, revision=a.revision)
    if a.text_file:
      text = open(a.text_file, encoding="utf-8").read()
    else:
      from lmx.datasets import text as text_lib

      _, held = text_lib.split_documents(text_lib.DOCUMENTS["python_docs"](), 0.1, 0)
      text = text_lib.DOC_SEP.join(t for _, t in held)
    batches = text_batches(tok, text, a.n_batches, a.batch_size, a.seq_len)
  paths = export(model, batches, a.out, a.step)
  print(f"export_hf_routing: {len(paths)} layer files in {os.path.join(a.out, f'step_{a.step}')}")
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except ValueError as e:  # not a routed MoE, or too little text: one line, nothing written
    print(f"export_hf_routing: {e}", file=sys.stderr)
    sys.exit(2)
