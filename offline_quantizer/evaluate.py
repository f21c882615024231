"""`twinquant-eval CKPT`: perplexity of a checkpoint as vLLM serves it.

The held-out articles are tokenized, joined with EOS and cut into windows of --seqlen
tokens, each starting with the tokens the model's tokenizer puts before a text (BOS for
Llama-3, Gemma, ...; `calibration.special_prefix`); vLLM scores every window with prompt
logprobs, so a TwinQuant checkpoint is measured through the plugin and the same kernels that
serve it. Every token of the text is scored once, the window's first token only when a prefix
gives it a context.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time

from offline_quantizer.calibration import eval_windows


def perplexity(llm, windows: list[list[int]], prefix: int = 0) -> tuple[float, int]:
    """exp(mean NLL) of every window position from max(prefix, 1) on, scored by vLLM."""
    from vllm import SamplingParams

    try:
        from vllm.inputs import TokensPrompt
    except ImportError:  # pragma: no cover - older layouts
        from vllm.inputs.data import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params, use_tqdm=True)
    nll, count = 0.0, 0
    for w, out in zip(windows, outs):
        for pos, lp in enumerate(out.prompt_logprobs):
            if pos < max(prefix, 1) or lp is None:
                continue
            v = lp[w[pos]].logprob
            if not math.isfinite(v):
                raise RuntimeError(f"non-finite logprob at window position {pos}")
            nll -= v
            count += 1
    return math.exp(nll / count), count


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--eval", default=os.path.join("models", "data", "eval.jsonl"), help="held-out .jsonl text")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--dtype", default=None, help="activation dtype (default: float32 on CPU, bfloat16 on GPU)")
    ap.add_argument("--quantization", default=None, help="passed to vLLM (default: from the checkpoint)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--json", help="append the result as one JSON line to this file")
    ap.add_argument("--label", default=None, help="name of this row in --json")
    ap.add_argument("--card", action="store_true", help="add the result to the checkpoint's README.md (model card)")
    args = ap.parse_args(argv)

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch
    from transformers import AutoTokenizer
    from vllm import LLM

    on_gpu = torch.cuda.is_available()
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    windows, prefix = eval_windows(tok, args.eval, args.seqlen, args.max_windows)
    t0 = time.time()
    llm = LLM(
        model=args.checkpoint,
        quantization=args.quantization,
        dtype=dtype,
        max_model_len=args.seqlen + 8,
        gpu_memory_utilization=args.gpu_memory_utilization or (0.5 if on_gpu else 0.3),
        enforce_eager=not on_gpu,
        seed=0,
    )
    ppl, n = perplexity(llm, windows, prefix)
    with open(os.path.join(args.checkpoint, "config.json")) as f:
        cfg = json.load(f)
    qc = cfg.get("quantization_config") or {}
    result = {
        "label": args.label or os.path.basename(os.path.normpath(args.checkpoint)),
        "checkpoint": args.checkpoint,
        "ppl": round(ppl, 4),
        "tokens": n,
        "dtype": dtype,
        "effective_bits": (qc.get("metadata") or {}).get("effective_bits_per_weight", 16.0),
        "rank": qc.get("rank", None),
        "group_size": qc.get("group_size", None),
        "recipe": qc.get("recipe", "dense"),
        "seconds": round(time.time() - t0, 1),
        "seqlen": args.seqlen,
        "special_prefix_tokens": prefix,
        "eval_file": os.path.basename(args.eval),
        "command": "twinquant-eval " + shlex.join(argv if argv is not None else sys.argv[1:]),
    }
    print(json.dumps(result))
    if args.card and qc:
        from offline_quantizer.card import add_evaluation

        path = os.path.join(args.checkpoint, "README.md")
        card = open(path).read() if os.path.exists(path) else ""
        with open(path, "w") as f:
            f.write(add_evaluation(card, result))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
