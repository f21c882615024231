"""W16A4 sensitivity of SmolLM2-135M-Instruct (session 13's diagnostic, docs/method.md "W4A4"):
dense weights, norms folded, a random residual-stream rotation; per-token 4-bit inputs
(clip c) on the chosen layer types only, o_proj/down_proj inputs rotated by the block Hadamard
(or a full random orthogonal matrix, or nothing). Perplexity in plain transformers (fp32) on
16 x 512 tokens of the *calibration* file's last 400 articles (never the evaluation text).
    python benchmarks/accuracy/a4_sensitivity.py        (needs models/ from twinquant-prepare; ~10 min on 2 cores)
"""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from a4_common import perplexity  # noqa: E402

from offline_quantizer import transforms as tf
from vllm_twinquant import format as fmt

torch.manual_seed(0)
M = "models/smollm2-135m-instruct"
tok = AutoTokenizer.from_pretrained(M)
texts = [json.loads(line)["text"] for line in open("models/data/calib.jsonl")][-400:]
ids = tok("\n\n".join(texts), return_tensors="pt").input_ids[0]
W = 16
L = 512
wins = ids[: W * L].reshape(W, L)
model = AutoModelForCausalLM.from_pretrained(M, torch_dtype=torch.float32).eval()
tf.fold_norms(model, include_head=True)
q = tf.random_orthogonal(576, 0)
tf.rotate_residual_stream(model, q)
CFG = {}


def rot_full(n, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    qq, r = torch.linalg.qr(a)
    return (qq * torch.sign(torch.diag(r))).float()


FULL = {576: rot_full(576, 1), 1536: rot_full(1536, 2)}
for n, m in model.named_modules():
    if isinstance(m, torch.nn.Linear) and "layers" in n:
        kind = n.split(".")[-1]

        def fwd(x, m=m, kind=kind):
            c = CFG
            w = m.weight
            if kind in c["a4"]:
                if kind in ("o_proj", "down_proj"):
                    mode = c["rot"].get(kind, "block")
                    if mode == "block":
                        x = fmt.apply_online_hadamard(x)
                        w = fmt.apply_online_hadamard(w)
                    elif mode == "full":
                        R = FULL[x.shape[-1]]
                        x = x @ R
                        w = w @ R
                x = fmt.quantize_activations(x, 4, c["clip"])
            return x @ w.t()

        m.forward = fwd
ALL = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
runs = [
    ("dense", set(), {}, 1.0),
    ("all block c1", ALL, {}, 1.0),
    ("all block c.8", ALL, {}, 0.8),
    ("all full c.8", ALL, {"o_proj": "full", "down_proj": "full"}, 0.8),
    ("qkv c.8", {"q_proj", "k_proj", "v_proj"}, {}, 0.8),
    ("o block c.8", {"o_proj"}, {}, 0.8),
    ("o full c.8", {"o_proj"}, {"o_proj": "full"}, 0.8),
    ("o none c.8", {"o_proj"}, {"o_proj": "none"}, 0.8),
    ("gateup c.8", {"gate_proj", "up_proj"}, {}, 0.8),
    ("down block c.8", {"down_proj"}, {}, 0.8),
    ("down full c.8", {"down_proj"}, {"down_proj": "full"}, 0.8),
]
for name, a4, rot, clip in runs:
    CFG.update(a4=a4, rot=rot, clip=clip)
    print(f"{name:20s} {perplexity(model, wins):.3f}", flush=True)
