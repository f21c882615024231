"""W16A4 with ResQ's 8-bit subspace (session 13's diagnostic, docs/method.md "W4A4"): as
a4_sensitivity.py, but the residual-stream rotation is U blockdiag(R_l, R_h) (U: eigenvectors of
the q_proj/gate_proj input covariance on 32 x 256 tokens of the calibration file's first 300
articles, top R last) and q/k/v and gate/up quantize their last R input channels per token at
8 bits apart from the rest (4 bits, clip c); o_proj/down_proj: block Hadamard + 4 bits.
    python benchmarks/accuracy/a4_subspace_sensitivity.py [R=64]
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

torch.set_num_threads(2)
M = "models/smollm2-135m-instruct"
tok = AutoTokenizer.from_pretrained(M)
texts = [json.loads(line)["text"] for line in open("models/data/calib.jsonl")]
ids = tok("\n\n".join(texts[-400:]), return_tensors="pt").input_ids[0]
W = 16
L = 512
wins = ids[: W * L].reshape(W, L)
cids = tok("\n\n".join(texts[:300]), return_tensors="pt").input_ids[0][: 32 * 256].reshape(32, 256)
model = AutoModelForCausalLM.from_pretrained(M, dtype=torch.float32).eval()
tf.fold_norms(model, include_head=True)
C = torch.zeros(576, 576, dtype=torch.float64)
hs = []
for b in model.model.layers:
    for m in (b.self_attn.q_proj, b.mlp.gate_proj):

        def h(mod, args):
            x = args[0].reshape(-1, 576).double()
            C.add_(x.t() @ x)

        hs.append(m.register_forward_pre_hook(h))
with torch.no_grad():
    for i in range(0, 32, 8):
        model(cids[i : i + 8])
for h in hs:
    h.remove()
ev, U = torch.linalg.eigh(C)  # ascending: top directions last
print("energy share of top 32/64/96/128:", [round((ev[-r:].sum() / ev.sum()).item(), 3) for r in (32, 64, 96, 128)])
R = int(sys.argv[1]) if len(sys.argv) > 1 else 64


def ro(n, s):
    return tf.random_orthogonal(n, s) if n else torch.zeros(0, 0, dtype=torch.float64)


Qm = torch.zeros(576, 576, dtype=torch.float64)
Qm[: 576 - R, : 576 - R] = ro(576 - R, 1)
Qm[576 - R :, 576 - R :] = ro(R, 2) if R else Qm[576:, 576:]
q = U @ Qm
tf.rotate_residual_stream(model, q)
CFG = {}


def qa(x, r, clip):
    if r == 0:
        return fmt.quantize_activations(x, 4, clip)
    lo = fmt.quantize_activations(x[..., :-r], 4, clip)
    hi = fmt.quantize_activations(x[..., -r:], 8, 1.0)
    return torch.cat([lo, hi], -1)


for n, m in model.named_modules():
    if isinstance(m, torch.nn.Linear) and "layers" in n:
        kind = n.split(".")[-1]

        def fwd(x, m=m, kind=kind):
            c = CFG
            w = m.weight
            if kind in c["a4"]:
                if kind in ("o_proj", "down_proj"):
                    x = fmt.apply_online_hadamard(x)
                    w = fmt.apply_online_hadamard(w)
                    x = fmt.quantize_activations(x, 4, c["clip"])
                else:
                    x = qa(x, c["r"], c["clip"])
            return x @ w.t()

        m.forward = fwd
ALL = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
for name, a4, r, clip in [
    ("qkv pca r0 c.8", {"q_proj", "k_proj", "v_proj"}, 0, 0.8),
    (f"qkv r{R} c.8", {"q_proj", "k_proj", "v_proj"}, R, 0.8),
    (f"gateup r{R} c.8", {"gate_proj", "up_proj"}, R, 0.8),
    (f"all r{R} c.8", ALL, R, 0.8),
    (f"all r{R} c.9", ALL, R, 0.9),
]:
    CFG.update(a4=a4, r=r, clip=clip)
    print(f"{name:20s} {perplexity(model, wins):.3f}", flush=True)
