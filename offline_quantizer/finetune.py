"""End-to-end tuning of a TwinQuant checkpoint against the dense model (`twinquant-finetune`).

Block tuning (`tune.py`) matches each block's output in isolation; what is served is judged on
the model's next-token distribution. This stage starts from a finished checkpoint (W4A16, or W4A4 with
the served online Hadamard and per-token activation quantizer in the loop) and tunes the same continuous
parameters for the whole model at once,

    min  E_tokens KL( p_dense(. | context) || p_quantized(. | context) )

on calibration text: every quantized layer's group scales (scale = scale0 * exp(a)), both
low-rank factors, and every RMSNorm weight (gamma = gamma0 * exp(b)). The embeddings and a dense
lm_head stay as stored (a quantized lm_head is one of the quantized layers), and so do the 4-bit
codes unless `--code-lr` is given: then each code also has a latent real value z (starting at
the stored code), the forward pass uses
round(clamp(z, -8, 7)) with a straight-through gradient, and the rounded codes are written.
Either way the result is the same format at the same bits.
Adam with a cosine-decayed rate (factors' rates scaled to their RMS, as in tune.py); the last
calibration batch is held out, its KL is measured with everything rounded to the stored dtypes
before tuning and after every `--eval-every` steps, and the best point (the start included) is
written, so the stage never makes that loss worse. docs/method.md section 6 has the numbers.

Output: a new checkpoint folder (written to a temporary folder beside it, renamed at the end);
the recipe gains "-e2e" ("-e2e-codes" with `--code-lr`) and the metadata's "e2e_tuning" list a record of the round.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from offline_quantizer.calibration import make_windows
from offline_quantizer.checkpoint import read_tensors, write_checkpoint
from offline_quantizer.decompose import group_dequantize
from offline_quantizer.families import family_for
from offline_quantizer.pipeline import peak_rss_gib
from offline_quantizer.reference import StoredLayer, checkpoint_config, load_checkpoint_model
from vllm_twinquant import format as fmt


class _TunedLinear(torch.nn.Module):
    """A TwinQuant layer whose scales and factors are trainable: y = x deq(R)^T + (x D^T) U^T + b."""

    def __init__(self, codes, scales, up, down, bias, lowrank_dtype, hadamard=False, act_bits=16, act_clip=1.0,
                 train_codes=False, act_subspace=0, act_subspace_bits=8, act_type="int"):
        super().__init__()
        self.hadamard, self.act_bits, self.act_clip, self.act_type = hadamard, act_bits, act_clip, act_type
        self.act_subspace, self.act_subspace_bits = act_subspace, act_subspace_bits
        if train_codes:  # latent codes z; the forward pass rounds them (straight-through)
            self.codes = torch.nn.Parameter(codes.float())
        else:
            self.register_buffer("codes", codes.float(), persistent=False)  # [N, K] in [-8, 7]
        self.register_buffer("s0", scales.float(), persistent=False)
        self.scale_dtype = scales.dtype
        self.lowrank_dtype = lowrank_dtype
        self.a = torch.nn.Parameter(torch.zeros_like(self.s0))
        self.up = torch.nn.Parameter(up.float()) if up is not None else None
        self.down = torch.nn.Parameter(down.float()) if down is not None else None
        self.register_buffer("bias", bias.float() if bias is not None else None, persistent=False)

    def rounded_codes(self):
        """The codes the forward pass uses: the stored ones, or round(clamp(z)) with a
        straight-through gradient to z when they are trained."""
        if not isinstance(self.codes, torch.nn.Parameter):
            return self.codes
        z = self.codes.clamp(-8, 7)
        return z + (torch.round(z) - z).detach()

    def stored(self):
        """(scales, up, down) rounded to the dtypes the checkpoint stores."""
        s = (self.s0 * torch.exp(self.a)).to(self.scale_dtype)
        if self.up is None:
            return s, None, None
        up, down = fmt.round_lowrank(self.up.detach(), self.down.detach(), self.lowrank_dtype)
        return s, up, down

    def forward(self, x):
        if getattr(self, "use_stored", False):
            s, up, down = (t.float() if t is not None else None for t in self.stored())
        else:
            s, up, down = self.s0 * torch.exp(self.a), self.up, self.down
        if self.hadamard:  # as served: the stored weights act on H x
            x = fmt.apply_online_hadamard(x)
        xr = x
        if self.act_bits < 16:  # W4A8/W4A4: per-token codes of the residual's input (straight-through rounding)
            xq = fmt.quantize_activations(x, self.act_bits, self.act_clip, self.act_subspace, self.act_subspace_bits,
                                          self.act_type)
            xr = x + (xq - x).detach()
        y = xr @ group_dequantize(self.rounded_codes(), s).t()
        if up is not None:
            y = y + (x @ down.t()) @ up.t()
        return y if self.bias is None else y + self.bias


def _load_student(ckpt: str, tensors: dict, spec: fmt.TwinQuantSpec, train_codes: bool = False):
    """transformers' model of the checkpoint's architecture holding the TwinQuant checkpoint: its
    unquantized tensors as they are, each quantized layer as a _TunedLinear. Returns the model and
    {stored layer name: its _TunedLinear}."""
    layers: dict[str, _TunedLinear] = {}

    def make(name: str, s: StoredLayer) -> torch.nn.Module:
        layers[name] = _TunedLinear(s.codes, tensors[f"{name}.{fmt.WEIGHT_SCALE}"], s.up, s.down, s.bias,
                                    spec.lowrank_torch_dtype, s.hadamard, spec.activation_bits,
                                    spec.activation_clip_ratio, train_codes, s.subspace, spec.activation_subspace_bits,
                                    spec.activation_type)
        return layers[name]

    model, _ = load_checkpoint_model(ckpt, make, tensors)
    return model, layers


def _kl(student_logits, teacher_logp):
    logq = torch.log_softmax(student_logits.float(), dim=-1)
    return torch.sum(teacher_logp.exp() * (teacher_logp - logq), dim=-1).mean()


def finetune(ckpt: str, dense_dir: str, output_dir: str, calibration, nsamples: int = 128, seqlen: int = 256,
             batch_size: int = 4, epochs: int = 1, lr: float = 1e-4, eval_every: int = 8, seed: int = 0,
             code_lr: float = 0.0, device: str = "cpu", max_minutes: float = 0.0) -> dict:
    """Tune the checkpoint `ckpt` against the dense model `dense_dir` on `calibration` (a text
    path or a list of strings, as `quantize()` takes) and write the result to `output_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    torch.manual_seed(seed)
    if os.path.exists(output_dir):
        raise FileExistsError(f"{output_dir} already exists; remove it or choose another folder")
    if code_lr < 0:
        raise ValueError(f"code_lr must be >= 0 (0 keeps the stored codes); got {code_lr}")
    if max_minutes < 0:
        raise ValueError(f"max_minutes must be >= 0 (0: no limit); got {max_minutes}")
    spec = fmt.validate_checkpoint(ckpt)
    tensors = read_tensors(ckpt)
    offset = family_for(checkpoint_config(ckpt)).norm_offset
    student, layers = _load_student(ckpt, tensors, spec, train_codes=code_lr > 0)
    student.to(device)
    teacher = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval().to(device)
    text = not (isinstance(calibration, torch.Tensor) or calibration == "random")
    windows = make_windows(calibration, AutoTokenizer.from_pretrained(dense_dir) if text else None, nsamples, seqlen, 0,
                           seed, teacher.config.vocab_size)
    batches = list(windows.calib.to(device).split(batch_size))
    if len(batches) < 2:
        raise ValueError("end-to-end tuning needs at least 2 calibration batches (one is held out); raise nsamples")
    train, held = batches[:-1], batches[-1]
    with torch.no_grad():
        held_logp = torch.log_softmax(teacher(input_ids=held).logits.float(), dim=-1)

    tuned = [m for m in student.modules() if isinstance(m, _TunedLinear)]
    norms = [m for n, m in student.named_modules() if type(m).__name__.endswith("RMSNorm")]
    g0 = [m.weight.detach().clone() + offset for m in norms]  # the scale each norm applies
    norm_logs = [torch.nn.Parameter(torch.zeros_like(g)) for g in g0]
    groups = [{"params": [m.a for m in tuned] + norm_logs, "lr": lr}]
    for m in tuned:
        for p in (m.up, m.down):
            if p is not None:
                groups.append({"params": [p], "lr": lr * float(p.detach().pow(2).mean().sqrt())})
    if code_lr > 0:  # latent codes, in code units (a step of code_lr moves z by about that much)
        groups.append({"params": [m.codes for m in tuned], "lr": code_lr})
    for p in student.parameters():
        p.requires_grad_(False)
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    opt = torch.optim.Adam(groups)
    base_lr = [g["lr"] for g in opt.param_groups]

    def set_norms():  # each norm weight as a tensor differentiable in its log-multiplier
        for m, g, b in zip(norms, g0, norm_logs):
            m.weight = g * torch.exp(b) - offset

    for m in norms:  # the norm weights become functions of their log-multipliers
        del m.weight

    def heldout() -> float:
        for m in tuned:
            m.use_stored = True
        try:
            with torch.no_grad():
                for m, g, b in zip(norms, g0, norm_logs):
                    m.weight = (g * torch.exp(b) - offset).to(tensors_dtype(m)).float()
                return float(_kl(student(input_ids=held).logits, held_logp))
        finally:
            for m in tuned:
                m.use_stored = False

    norm_names = {id(m): n for n, m in student.named_modules()}

    def tensors_dtype(m):
        return tensors[f"{norm_names[id(m)]}.weight"].dtype

    start = heldout()
    best = (start, 0, [p.detach().clone() for g in groups for p in g["params"]])
    total, step, log = max(epochs * len(train), 1), 0, [[0, round(start, 6)]]
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=total, desc="end-to-end tuning", unit="step")
    deadline = t0 + 60 * max_minutes if max_minutes > 0 else math.inf

    def evaluate() -> None:  # held-out KL at this step; the best point so far is kept
        nonlocal best
        val = heldout()
        log.append([step, round(val, 6)])
        tqdm.write(f"step {step}: held-out KL {val:.5f} (start {start:.5f})")
        if val < best[0]:
            best = (val, step, [p.detach().clone() for g in groups for p in g["params"]])

    stopped = False
    try:
        for _ in range(epochs):
            for j in torch.randperm(len(train), generator=gen).tolist():
                if time.time() > deadline:
                    stopped = True
                    break
                for g, b in zip(opt.param_groups, base_lr):
                    g["lr"] = b * 0.5 * (1 + math.cos(math.pi * step / total))
                with torch.no_grad():
                    tlogp = torch.log_softmax(teacher(input_ids=train[j]).logits.float(), dim=-1)
                set_norms()
                loss = _kl(student(input_ids=train[j]).logits, tlogp)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                bar.update(1)
                bar.set_postfix(kl=f"{loss.item():.4f}")
                if step % eval_every == 0 or step == total:
                    evaluate()
            if stopped:  # on time: the steps since the last evaluation are evaluated too
                tqdm.write(f"--max-minutes {max_minutes}: stopped at step {step} of {total}")
                if step % eval_every:
                    evaluate()
                break
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted: nothing was written to {output_dir}") from None
    finally:
        bar.close()

    with torch.no_grad():
        for p, v in zip([p for g in groups for p in g["params"]], best[2]):
            p.copy_(v)
    out = dict(tensors)
    flipped = total_codes = 0
    for name, m in layers.items():
        s, up, down = (t.cpu() if t is not None else None for t in m.stored())
        out[f"{name}.{fmt.WEIGHT_SCALE}"] = s.contiguous()
        if code_lr > 0:
            key = f"{name}.{fmt.WEIGHT_PACKED}"
            codes = m.rounded_codes().detach().to("cpu", torch.int8)
            flipped += int((codes != fmt.unpack_codes(tensors[key], codes.shape[1])).sum())
            total_codes += codes.numel()
            out[key] = fmt.pack_codes(codes).contiguous()
        if up is not None:
            out.update(fmt.lowrank_tensors(name, up, down, spec))
    codes_changed = round(flipped / max(total_codes, 1), 6)
    for m, g, b in zip(norms, g0, norm_logs):
        key = f"{norm_names[id(m)]}.weight"
        out[key] = (g * torch.exp(b) - offset).detach().to("cpu", tensors[key].dtype).contiguous()

    with open(os.path.join(ckpt, "config.json")) as f:
        cfg = json.load(f)
    q = cfg["quantization_config"]
    q["recipe"] = q.get("recipe", "") + ("-e2e-codes" if code_lr > 0 else "-e2e")
    q.setdefault("metadata", {}).setdefault("e2e_tuning", []).append({
        "objective": "KL(dense || quantized) per token", "epochs": epochs, "lr": lr, "steps": step,
        "calibration": {"data": windows.source, "nsamples": nsamples, "seqlen": seqlen, "seed": seed},
        "heldout_kl": log, "kept_step": best[1], "code_lr": code_lr,
        "codes_changed": codes_changed, "source_checkpoint": os.path.basename(os.path.normpath(ckpt)),
        "seconds": round(time.time() - t0, 1), "device": torch.device(device).type,
        "planned_steps": total, "max_minutes": max_minutes or None, "kept_kl": round(best[0], 6),
    })
    readme = None
    if os.path.exists(os.path.join(ckpt, "README.md")):
        with open(os.path.join(ckpt, "README.md")) as f:
            readme = f.read()
    write_checkpoint(output_dir, [out], cfg, ckpt, readme)
    summary = {"output": output_dir, "heldout_kl_start": start, "heldout_kl_end": best[0], "kept_step": best[1],
               "codes_changed": codes_changed,
               "steps": step, "seconds": round(time.time() - t0, 1), "peak_rss_gib": round(peak_rss_gib(), 2)}
    if torch.device(device).type == "cuda":
        summary["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / (1 << 30), 2)
    return summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("checkpoint", help="a TwinQuant checkpoint (twinquant-quantize's output)")
    ap.add_argument("--dense", required=True, help="the dense checkpoint it was quantized from (the teacher)")
    ap.add_argument("--output", required=True)
    ap.add_argument("--calib", required=True, help=".jsonl with a 'text' field per line, or a .txt file")
    ap.add_argument("--nsamples", type=int, default=128, help="calibration windows (default: %(default)s)")
    ap.add_argument("--seqlen", type=int, default=256, help="tokens per window (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=4, help="windows per step (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=1, help="passes over the windows (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=1e-4, help="Adam rate of scales and norms (default: %(default)s)")
    ap.add_argument(
        "--eval-every", type=int, default=8, help="steps between held-out evaluations (default: %(default)s)"
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the windows and their order (default: %(default)s)")
    ap.add_argument("--code-lr", type=float, default=0.0,
                    help="also learn the 4-bit codes (latent values, straight-through rounding) at this Adam rate, "
                         "in code units; 0 (default) keeps the stored codes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the student and the teacher run (default: cuda when available)")
    ap.add_argument("--max-minutes", type=float, default=0.0,
                    help="stop after this much wall time (the schedule stays the planned one; the best held-out "
                         "point so far is written); 0 (default): no limit")
    args = ap.parse_args(argv)
    try:
        summary = finetune(args.checkpoint, args.dense, args.output, args.calib, args.nsamples, args.seqlen,
                           args.batch_size, args.epochs, args.lr, args.eval_every, args.seed, args.code_lr,
                           args.device, args.max_minutes)
    except KeyboardInterrupt as e:
        print(f"{e or 'interrupted'}", file=sys.stderr)
        sys.exit(130)
    except (ValueError, FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
