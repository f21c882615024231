"""The checkpoint's own README.md (its model card): what was quantized, how, what it measured,
and how to serve it. Written by the quantizer; `twinquant-eval --card` adds the perplexity."""

from __future__ import annotations

import json

import yaml

EVAL_MARK = "<!-- twinquant-eval -->"


def model_card(name: str, config: dict, result, recipe) -> str:
    q = config["quantization_config"]
    meta = q.get("metadata") or {}
    c = result.check
    lines = [
        "---",
        "library_name: vllm",
        "tags: [twinquant, quantized, 4-bit]",
        f"base_model: {meta.get('source', '')}",
        "---",
        f"# {name}",
        "",
        f"A TwinQuant checkpoint of **{meta.get('source', '')}** ({result.family} family): every linear layer of the "
        f"decoder as a 4-bit residual (group {q['group_size']}) plus a rank-{q['rank']} "
        f"{q['lowrank_dtype']} low-rank component, activations {_activations(q)}; "
        f"{result.effective_bits:.2f} bits per quantized weight. {_kept(q['modules_to_not_convert'])}",
        "",
        "## Serve it",
        "",
        "    pip install vllm-twinquant          # next to vLLM; the plugin registers itself",
        f"    vllm serve {name} --quantization twinquant",
        "",
        "On a CPU build of vLLM add `--dtype float16 --gpu-memory-utilization 0.3` (see vllm-twinquant's README).",
        "",
        "## How it was made",
        "",
        f"Recipe `{recipe.name}`{': ' + recipe.description if recipe.description else ''}",
        "",
        "```yaml",
        yaml.safe_dump(recipe.to_dict(), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    cal = meta.get("calibration") or {}
    lines.append(f"Calibration: {cal.get('nsamples')} windows of {cal.get('seqlen')} tokens from {cal.get('data')} "
                 f"(seed {cal.get('seed')}); {result.seconds:.0f} s, peak memory {result.peak_rss_gib:.1f} GiB.")
    for s in result.skipped:
        lines.append(f"Stage `{s['stage']}` was dropped for this model: {s['reason']}.")
    lines += ["", "## Measured", ""]
    if c is not None:
        lines += [
            f"End-to-end check against the dense model on {c.windows} held-out windows ({c.tokens} tokens the "
            "calibration never saw), float32:",
            "",
            "| mean next-token KL (nats) | perplexity dense | perplexity quantized | ratio |",
            "|---|---|---|---|",
            f"| {c.mean_kl:.4f} | {c.ppl_dense:.3f} | {c.ppl_quantized:.3f} | {c.ppl_ratio:.4f} |",
        ]
    else:
        lines.append("No end-to-end check was run (calibration.heldout = 0).")
    lines += ["", EVAL_MARK, ""]
    return "\n".join(lines)


def _activations(q: dict) -> str:
    if q.get("activation_bits", 16) == 16:
        return "16-bit"
    if q["activation_bits"] == 8:
        return "FP8 e4m3 per token" if q.get("activation_type") == "float" else "INT8 per token"
    sub = q.get("activation_subspace_channels") or 0
    extra = f", {sub} channels at {q.get('activation_subspace_bits')} bits" if sub else ""
    return f"{q['activation_bits']}-bit per token (clip {q.get('activation_clip_ratio', 1.0)}{extra})"


def add_evaluation(card: str, result: dict) -> str:
    """The card with a perplexity row from twinquant-eval appended after EVAL_MARK."""
    row = (f"- Perplexity through vLLM + the plugin: **{result['ppl']:.4f}** on {result['tokens']} tokens of "
           f"`{result['eval_file']}` (windows of {result['seqlen']}, {result['dtype']}). Command: "
           f"`{result['command']}`")
    if EVAL_MARK not in card:
        card += "\n" + EVAL_MARK + "\n"
    return card.replace(EVAL_MARK, EVAL_MARK + "\n" + row, 1)


def dumps(obj) -> str:
    return json.dumps(obj, indent=2)


def _kept(skipped: list[str]) -> str:
    if "lm_head" in skipped:
        return f"Embeddings, norms and {', '.join(skipped)} stay in the source precision."
    rest = f" and {', '.join(skipped)}" if skipped else ""
    return (f"lm_head is quantized as the linear layers are (stored untied); embeddings, norms{rest} stay in the "
            "source precision.")
