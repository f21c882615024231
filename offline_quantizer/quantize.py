"""`twinquant-quantize`: Hugging Face checkpoint -> TwinQuant checkpoint.

Walks the decoder blocks one at a time: the calibration activations entering a block are
kept, every linear layer of the block gets its input Hessian from them, each layer is
decomposed (low-rank + 4-bit residual, `decompose.py`), and the block's outputs under the
quantized weights become the next block's inputs. Only one block is ever in float32. With
--tune-epochs the dense model's activations are carried alongside, and each block's scales,
factors and norms are then tuned to reproduce the dense block's output (`tune.py`).

The result is written to a temporary folder beside --output and renamed at the end, so an
interrupted run never leaves a loadable half checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import tempfile
import time

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from offline_quantizer import transforms as tf
from offline_quantizer.decompose import attention_mixed_gram, decompose, decompose_refined
from offline_quantizer.tune import TUNE_LOSSES, tune_block
from vllm_twinquant import format as fmt

WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".gguf")
ONLINE_HADAMARD_MODULES = ("o_proj", "down_proj")  # W4A4: inputs no residual-stream rotation reaches
SUBSPACE_MODULES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # W4A4: readers of the residual stream
SHARD_BYTES = 4 << 30


class _Caught(Exception):
    pass


def load_calibration(path: str, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens from a JSON-lines file ({"text": ...} per line)
    or a plain text file, drawn with `seed` from the concatenated token stream."""
    if not os.path.exists(path):
        raise SystemExit(f"--calib {path}: no such file")
    texts = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            texts.append(json.loads(line)["text"] if path.endswith(".jsonl") else line)
    rng = random.Random(seed)
    rng.shuffle(texts)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids: list[int] = []
    need = nsamples * seqlen * 2
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"] + [eos])
        if len(ids) >= need:
            break
    if len(ids) < seqlen + 1:
        raise SystemExit(f"--calib {path}: only {len(ids)} tokens, need at least {seqlen + 1}")
    stream = torch.tensor(ids)
    starts = [rng.randrange(0, len(ids) - seqlen) for _ in range(nsamples)]
    return torch.stack([stream[s : s + seqlen] for s in starts])


def _decoder_layers(model):
    for path in ("model.layers", "model.decoder.layers", "transformer.h"):
        obj = model
        try:
            for p in path.split("."):
                obj = getattr(obj, p)
            return path, obj
        except AttributeError:
            continue
    raise SystemExit(f"{type(model).__name__}: no decoder layers found (supported: model.layers, ...)")


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


@torch.no_grad()
def quantize_model(
    model_dir: str,
    output_dir: str,
    calib_path: str | None,
    group_size: int = 128,
    rank: int = 32,
    residual: str = "gptq",
    weighting: str = "diag",
    nsamples: int = 64,
    seqlen: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    device: str = "cpu",
    lowrank_dtype: str = "bfloat16",
    rank_overrides: dict[str, int] | None = None,
    modules_to_not_convert: list[str] | None = None,
    random_calibration: bool = False,
    refine_iters: int = 0,
    rotation: str = "none",
    rotation_steps: int = 50,
    smoothing: str = "none",
    activation_bits: int = 16,
    activation_clip: float = 1.0,
    tune_epochs: int = 0,
    tune_lr: float = 1e-3,
    attention_aware: bool = False,
    tune_loss: str = "tensor",
    save_rotation: str | None = None,
    activation_subspace: int = 0,
) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    torch.manual_seed(seed)
    if os.path.exists(output_dir):
        raise SystemExit(f"--output {output_dir} already exists; remove it or choose another folder")
    spec = fmt.TwinQuantSpec(
        group_size=group_size,
        rank=rank,
        rank_overrides=dict(rank_overrides or {}),
        lowrank_dtype=lowrank_dtype,
        modules_to_not_convert=list(modules_to_not_convert or ["lm_head"]),
        recipe=_recipe_name(rank, residual, refine_iters, rotation, smoothing, activation_bits, tune_epochs,
                            attention_aware, activation_clip, lowrank_dtype, tune_loss, activation_subspace),
        activation_bits=activation_bits,
        activation_clip_ratio=activation_clip,
        online_hadamard=list(ONLINE_HADAMARD_MODULES) if activation_bits < 16 else [],
        activation_subspace_channels=activation_subspace,
        activation_subspace_modules=list(SUBSPACE_MODULES) if activation_subspace else [],
    )
    if activation_subspace and rotation == "none":
        raise SystemExit("--activation-subspace needs --rotation random|learned (the subspace is made by the "
                         "residual-stream rotation)")
    if refine_iters and residual != "gptq":
        raise SystemExit("--refine-iters needs --residual gptq (the R-step is GPTQ)")
    cfg = AutoConfig.from_pretrained(model_dir)
    if getattr(cfg, "quantization_config", None):
        raise SystemExit(f"{model_dir}: already quantized ({cfg.quantization_config}); start from a dense checkpoint")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    model.eval()
    src_dtype = next(model.parameters()).dtype
    layers_path, layers = _decoder_layers(model)
    transform_info: dict = {}
    if random_calibration:
        calib = torch.randint(0, cfg.vocab_size, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))
    else:
        if calib_path is None:
            raise SystemExit("--calib is required (a .jsonl with a 'text' field per line, or a .txt file)")
        tok = AutoTokenizer.from_pretrained(model_dir)
        calib = load_calibration(calib_path, tok, nsamples, seqlen, seed)
    if rotation != "none" or smoothing != "none":
        tf.check_llama_like(model)
        tf.fold_norms(model, include_head=rotation != "none")
    if rotation != "none":
        t_rot = time.time()
        steps = rotation_steps if rotation == "learned" else 0  # "random": the initial point only
        init, blocks = "random", None
        if activation_subspace:  # ResQ: principal directions of the normalised stream, in the last columns
            cov = tf.residual_stream_covariance(model, calib.split(batch_size), device)
            init, share = tf.subspace_rotation_init(cov, activation_subspace, seed)
            blocks = (cov.shape[0] - activation_subspace, activation_subspace)
            transform_info["activation_subspace"] = {
                "channels": activation_subspace, "bits": spec.activation_subspace_bits,
                "modules": spec.activation_subspace_modules, "energy_share": round(share, 4)}
            print(f"activation subspace: top {activation_subspace} principal directions hold "
                  f"{share:.1%} of the residual stream's energy", flush=True)
        readers, writers = tf.rotation_targets(model)
        q, hist = tf.learn_rotation(readers, writers, group_size, init, steps, seed=seed, device=device, blocks=blocks)
        del readers, writers
        tf.rotate_residual_stream(model, q)
        if save_rotation:  # the learned Q itself, outside the checkpoint (which holds it folded)
            from safetensors.torch import save_file

            save_file({"rotation": q.float().contiguous()}, save_rotation,
                      metadata={"source": os.path.basename(os.path.normpath(model_dir)), "kind": rotation})
        transform_info["rotation"] = {"kind": rotation, "steps": steps,
                                      "rtn_error_start": round(hist[0], 6), "rtn_error_end": round(min(hist), 6),
                                      "seconds": round(time.time() - t_rot, 1)}
        print(f"rotation ({rotation}): weight RTN error {hist[0]:.5f} -> {min(hist):.5f}", flush=True)

    if spec.online_hadamard:
        # W4A4: the inputs of o_proj / down_proj are rotated online by a block Hadamard H at
        # inference; here W -> W H (exact: H is symmetric and orthogonal) and a pre-hook rotates
        # the calibration inputs, so Hessians, GPTQ and the low-rank split all see H x.
        for i, blk in enumerate(layers):
            for name, m in blk.named_modules():
                full = f"{layers_path}.{i}.{name}"
                if isinstance(m, torch.nn.Linear) and spec.has_online_hadamard(full) and not spec.is_skipped(full):
                    m.weight.data = fmt.apply_online_hadamard(m.weight.data.float())
                    m.register_forward_pre_hook(lambda _m, args: (fmt.apply_online_hadamard(args[0]), *args[1:]))
        transform_info["online_hadamard"] = {"modules": spec.online_hadamard, "block": "largest power of 2 dividing in_features"}

    # 1. catch what enters the first block, for every calibration batch
    batches = calib.split(batch_size)
    inps, kwargs_list = [], []

    def catch(_mod, args, kwargs):
        inps.append(args[0] if args else kwargs.pop("hidden_states"))
        kwargs_list.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Caught

    hook = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    embed_mods = [m for n, m in model.named_modules() if not n.startswith(layers_path) and not n.startswith("lm_head")]
    for m in embed_mods:
        if not list(m.children()):
            m.to(device)
    for b in batches:
        try:
            model(input_ids=b.to(device), use_cache=False)
        except _Caught:
            pass
    hook.remove()
    model.to("cpu")

    # 2. block by block
    tensors: dict[str, torch.Tensor] = {}
    quantized_names: set[str] = set()
    stats = {"layers": 0, "stored_bits": 0.0, "weights": 0}
    errors, tune_log = [], []
    # the dense model's stream (tuning targets); never modified in place, so sharing the start is safe
    fp_inps = [x.to(device=device, dtype=torch.float32) for x in inps] if tune_epochs else None
    for i in tqdm(range(len(layers)), desc="quantizing blocks", unit="block"):
        block = layers[i].to(device=device, dtype=torch.float32)
        inps = [x.to(device=device, dtype=torch.float32) for x in inps]
        if tune_epochs:  # what the dense block makes of the dense stream, before anything changes
            fp_inps = [_first(block(x, **_to(kw, device))) for x, kw in zip(fp_inps, kwargs_list)]
        linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        hess = {n: torch.zeros(m.in_features, m.in_features, device=device) for n, m in linears.items()}
        counts = dict.fromkeys(linears, 0)

        def make_hook(name):
            def h(_m, inp, _out):
                x = inp[0].reshape(-1, inp[0].shape[-1]).float()
                hess[name].addmm_(x.t(), x)
                counts[name] += x.shape[0]
            return h

        hooks = [m.register_forward_hook(make_hook(n)) for n, m in linears.items()
                 if not (attention_aware and n == "self_attn.v_proj")]
        if attention_aware:
            hooks += _attention_aware_hooks(block, hess, counts)
        for x, kw in zip(inps, kwargs_list):
            block(x, **_to(kw, device))
        for h in hooks:
            h.remove()

        if smoothing == "learned":
            rotated = {n for n in linears if spec.has_online_hadamard(f"{layers_path}.{i}.{n}")}
            _smooth_block(block, linears, hess, counts, group_size, src_dtype, skip=rotated)
        decomposed, dense, hessians = {}, {}, {}
        for name, lin in linears.items():
            full = f"{layers_path}.{i}.{name}"
            if spec.is_skipped(full):
                continue
            r = spec.rank_for(full)
            h = hess[name] * (2.0 / max(counts[name], 1))
            w = lin.weight.data
            fmt.check_layer_shape(full, w.shape[0], w.shape[1], group_size)
            if refine_iters:
                d, _ = decompose_refined(w, r, group_size, spec.scale_torch_dtype, spec.lowrank_torch_dtype, h, refine_iters)
            else:
                d = decompose(w, r, group_size, spec.scale_torch_dtype, spec.lowrank_torch_dtype, h, residual, weighting)
            decomposed[name], dense[name], hessians[name] = d, w.float().clone(), h
            lin.weight.data = d.dequantized(torch.float32).to(w.dtype)
        del hess
        if tune_epochs:
            res = tune_block(block, decomposed, inps, fp_inps, [_to(kw, device) for kw in kwargs_list],
                             tune_epochs, lr=tune_lr, norm_dtype=src_dtype,
                             activation_bits=dict.fromkeys(decomposed, spec.activation_bits),
                             activation_clip=activation_clip, loss=tune_loss,
                             activation_subspace={n: spec.subspace_channels_for(f"{layers_path}.{i}.{n}") for n in decomposed},
                             activation_subspace_bits=spec.activation_subspace_bits)
            tune_log.append([round(res.heldout_start, 6), round(res.heldout_end, 6)])
            tqdm.write(f"block {i}: held-out relative MSE {res.heldout_start:.5f} -> {res.heldout_end:.5f} "
                       f"({res.steps} steps)")
        for name, d in decomposed.items():
            full = f"{layers_path}.{i}.{name}"
            lin, w, h, r = linears[name], dense[name], hessians[name], spec.rank_for(full)
            diff = lin.weight.data.float() - w  # the served weight (tune_block keeps it current)
            errors.append(float(torch.sum((diff @ h) * diff) / torch.sum((w @ h) * w).clamp_min(1e-30)))
            tensors[f"{full}.{fmt.WEIGHT_PACKED}"] = fmt.pack_codes(d.codes.cpu())
            tensors[f"{full}.{fmt.WEIGHT_SCALE}"] = d.scales.cpu().contiguous()
            if r:
                tensors.update(fmt.lowrank_tensors(full, d.up.cpu(), d.down.cpu(), spec))
            if lin.bias is not None:
                tensors[f"{full}.bias"] = lin.bias.data.to(src_dtype).cpu()
            quantized_names.add(f"{full}.weight")
            quantized_names.add(f"{full}.bias")
            stats["layers"] += 1
            stats["weights"] += w.numel()
            stats["stored_bits"] += spec.effective_bits(w.shape[0], w.shape[1], r) * w.numel()
        del dense, hessians

        with torch.no_grad():
            inps = [_first(block(x, **_to(kw, device))) for x, kw in zip(inps, kwargs_list)]
        layers[i] = block.to(device="cpu", dtype=src_dtype)

    # 3. everything else as it was
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, t in model.state_dict().items():
        if name in quantized_names or (tied and name == "lm_head.weight"):
            continue
        tensors[name] = t.detach().to("cpu").contiguous()

    eff_bits = stats["stored_bits"] / max(stats["weights"], 1)
    elapsed = time.time() - t0
    spec.metadata = {
        "source": os.path.basename(os.path.normpath(model_dir)),
        "residual": residual,
        "lowrank_weighting": "hessian" if refine_iters else weighting,
        "refine_iters": refine_iters,
        "transforms": transform_info or None,
        "smoothing": smoothing,
        "attention_aware": attention_aware,
        "block_tuning": {"epochs": tune_epochs, "lr": tune_lr, "loss": tune_loss,
                         "heldout_relative_mse": tune_log} if tune_epochs else None,
        "calibration": {"file": os.path.basename(calib_path) if calib_path else "random-tokens",
                        "nsamples": nsamples, "seqlen": seqlen, "seed": seed},
        "effective_bits_per_weight": round(eff_bits, 4),
        "mean_relative_output_error": round(sum(errors) / max(len(errors), 1), 6),
        "quantize_seconds": round(elapsed, 1),
        "created_by": "vllm-twinquant 0.1.0",
    }
    _write_checkpoint(model_dir, output_dir, tensors, spec, {"tie_word_embeddings": tied})
    summary = {
        "output": output_dir,
        "quantized_layers": stats["layers"],
        "effective_bits_per_weight": eff_bits,
        "mean_relative_output_error": spec.metadata["mean_relative_output_error"],
        "seconds": round(time.time() - t0, 1),
        "peak_rss_gib": round(_peak_rss_gib(), 2),
    }
    if device.startswith("cuda"):
        summary["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / (1 << 30), 2)
    return summary


def _recipe_name(rank, residual, refine_iters, rotation, smoothing, activation_bits=16, tune_epochs=0,
                 attention_aware=False, activation_clip=1.0, lowrank_dtype="bfloat16",
                 tune_loss="tensor", activation_subspace=0) -> str:
    parts = [] if activation_bits == 16 else [f"a{activation_bits}-hadamard"]
    if activation_subspace:
        parts.append(f"sub{activation_subspace}")
    if activation_clip != 1:
        parts.append(f"clip{activation_clip:g}")
    if rotation != "none":
        parts.append(f"rot-{rotation}")
    if smoothing != "none":
        parts.append("smooth")
    if rank:
        parts.append("learned-split" if refine_iters else "svd")
    parts.append(residual)
    if attention_aware:
        parts.append("attn")
    if tune_epochs:
        parts.append("tuned" if tune_loss == "tensor" else "tuned-token")
    if rank and lowrank_dtype == "int8":
        parts.append("lrint8")
    return "-".join(parts)


@torch.no_grad()
def _smooth_block(block, linears, hess, counts, group_size, src_dtype, skip=frozenset()) -> None:
    """Learned diagonal GL transforms (transforms.learn_smoothing) folded exactly: into the
    norm weights for q/k/v and gate/up, into up_proj's rows for down_proj. The calibration
    Hessians are transformed with them (X -> X diag(s)^-1). Layers in `skip` (inputs rotated
    online: a diagonal fold into up_proj would act in the unrotated basis) are left alone."""
    groups = [("mlp.up_proj:rows", ["mlp.down_proj"]),
              ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
              ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])]
    for owner, names in groups:
        if not all(n in linears for n in names) or any(n in skip for n in names):
            continue
        h = hess[names[0]] * (2.0 / max(counts[names[0]], 1))
        s = tf.learn_smoothing([linears[n].weight.data for n in names], h, group_size)
        if owner.endswith(":rows"):
            up = linears[owner.split(":")[0]]
            up.weight.data = up.weight.data / s[:, None].to(up.weight.dtype)
        else:
            norm = block.get_submodule(owner)
            inv = (norm.weight.data.float() / s).to(src_dtype).float()  # what will be stored
            s = norm.weight.data.float() / inv  # the exact factor the stored norm applies
            norm.weight.data = inv.to(norm.weight.dtype)
        for n in names:
            lin = linears[n]
            lin.weight.data = lin.weight.data * s[None, :].to(lin.weight.dtype)
            hess[n] = hess[n] / s[:, None] / s[None, :]


def _attention_aware_hooks(block, hess, counts) -> list:
    """Replace v_proj's input Gram matrix by the attention-mixed one (decompose.attention_mixed_gram):
    q and k are caught from q_proj / k_proj, the rotary embedding from the attention's kwargs."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = block.self_attn
    name = "self_attn.v_proj"
    cap = {}

    def pre(_m, _args, kwargs):  # calibration windows: causal, no padding
        cap["pos"] = kwargs.get("position_embeddings")

    def catch(key):
        def h(_m, _inp, out):
            cap[key] = out
        return h

    def v_hook(_m, inp, _out):
        x = inp[0]
        b, t, _ = x.shape
        d = attn.head_dim
        q = cap["q"].view(b, t, -1, d).transpose(1, 2)
        k = cap["k"].view(b, t, -1, d).transpose(1, 2)
        cos, sin = cap["pos"]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        g, n = attention_mixed_gram(x, q, k)
        hess[name].add_(g)
        counts[name] += n

    hooks = [attn.register_forward_pre_hook(pre, with_kwargs=True),
             attn.q_proj.register_forward_hook(catch("q")), attn.k_proj.register_forward_hook(catch("k")),
             attn.v_proj.register_forward_hook(v_hook)]
    return hooks


def _to(kw, device):
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device=device, dtype=torch.float32 if v.is_floating_point() else v.dtype)
        elif isinstance(v, tuple) and all(isinstance(t, torch.Tensor) for t in v):
            out[k] = tuple(t.to(device=device, dtype=torch.float32 if t.is_floating_point() else t.dtype) for t in v)
        else:
            out[k] = v
    return out


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _write_checkpoint(model_dir: str, output_dir: str, tensors: dict[str, torch.Tensor], spec: fmt.TwinQuantSpec,
                      config_updates: dict | None = None) -> None:
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".twinquant-partial-", dir=parent)
    os.chmod(tmp, 0o755)
    try:
        shards, cur, size = [], {}, 0
        for name in sorted(tensors):
            t = tensors[name]
            nbytes = t.numel() * t.element_size()
            if cur and size + nbytes > SHARD_BYTES:
                shards.append(cur)
                cur, size = {}, 0
            cur[name] = t
            size += nbytes
        shards.append(cur)
        meta = {"format": "pt", "quant_method": fmt.QUANT_METHOD, "format_version": str(fmt.FORMAT_VERSION)}
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata=meta)
        else:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": {}}
            for j, shard in enumerate(shards):
                fn = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, fn), metadata=meta)
                index["weight_map"].update(dict.fromkeys(shard, fn))
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        for fn in os.listdir(model_dir):  # tokenizer, generation config, chat template, ...
            src = os.path.join(model_dir, fn)
            if os.path.isfile(src) and not fn.endswith(WEIGHT_FILES) and fn not in ("config.json", "model.safetensors.index.json"):
                shutil.copy2(src, os.path.join(tmp, fn))
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
        cfg.update(config_updates or {})
        cfg["quantization_config"] = spec.to_dict()
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        fmt.validate_checkpoint(tmp)
        os.replace(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _parse_overrides(items: list[str]) -> dict[str, int]:
    out = {}
    for it in items or []:
        name, _, r = it.rpartition("=")
        if not name or not r.isdigit():
            raise SystemExit(f"--rank-override {it!r}: expected MODULE=RANK, e.g. model.layers.0.mlp.down_proj=64")
        out[name] = int(r)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="dense Hugging Face checkpoint folder (safetensors)")
    ap.add_argument("--output", required=True, help="folder to create for the TwinQuant checkpoint")
    ap.add_argument("--calib", help="calibration text: .jsonl with a 'text' field, or .txt (one document a line)")
    ap.add_argument("--random-calibration", action="store_true", help="random token ids instead of text (speed tests)")
    ap.add_argument("--group-size", type=int, default=128, choices=fmt.SUPPORTED_GROUP_SIZES)
    ap.add_argument("--rank", type=int, default=32, help="low-rank width (0: plain GPTQ/RTN)")
    ap.add_argument("--rank-override", action="append", metavar="MODULE=RANK", help="per-module rank")
    ap.add_argument("--residual", choices=("gptq", "rtn"), default="gptq")
    ap.add_argument("--lowrank-weighting", choices=("none", "diag", "hessian"), default="diag")
    ap.add_argument("--lowrank-dtype", choices=fmt.LOWRANK_DTYPES, default="bfloat16",
                    help="storage of both low-rank factors (int8: symmetric, one fp32 scale per row)")
    ap.add_argument("--refine-iters", type=int, default=0,
                    help="TwinQuant split: alternate GPTQ residual / optimal low-rank refit this many times (0: SVD split)")
    ap.add_argument("--rotation", choices=("none", "random", "learned"), default="none",
                    help="orthogonal residual-stream transform folded into the weights (Llama family)")
    ap.add_argument("--rotation-steps", type=int, default=50, help="Cayley steps on the Stiefel manifold")
    ap.add_argument("--smoothing", choices=("none", "learned"), default="none",
                    help="learned positive diagonal per shared input, folded into norms / up_proj (Llama family)")
    ap.add_argument("--twinquant", action="store_true",
                    help="the full TwinQuant recipe: --rotation learned --smoothing learned --refine-iters 4")
    ap.add_argument("--activation-bits", type=int, choices=(16, 4), default=16,
                    help="4: W4A4 checkpoint (per-token 4-bit inputs of the residual product, online Hadamard "
                         "before o_proj/down_proj; served by the torch path, no fast kernel yet)")
    ap.add_argument("--activation-clip", type=float, default=1.0, metavar="RATIO",
                    help="with --activation-bits 4: per-token scale = RATIO * max|x| / 7 (larger entries saturate; "
                         "stored as activation_clip_ratio, used by the tuning loop and the reader)")
    ap.add_argument("--activation-subspace", type=int, default=0, metavar="C",
                    help="with --activation-bits 4 and --rotation: ResQ's mixed-precision subspace. The rotation starts "
                         "from the principal directions of the calibration residual stream, the top C last, and keeps "
                         "them there; q/k/v and gate/up quantize those C input channels per token at 8 bits apart from "
                         "the rest (4 bits). 0: off")
    ap.add_argument("--attention-aware", action="store_true",
                    help="v_proj's GPTQ / split statistic from the inputs mixed by the attention probabilities "
                         "(its error as the attention output sees it) instead of the raw inputs (Llama family)")
    ap.add_argument("--tune-epochs", type=int, default=0,
                    help="block reconstruction after the split: tune group scales, low-rank factors and norm weights "
                         "so each quantized block reproduces the dense block's output (codes fixed; 0: off)")
    ap.add_argument("--tune-lr", type=float, default=1e-3, help="Adam learning rate of --tune-epochs")
    ap.add_argument("--tune-loss", choices=TUNE_LOSSES, default="tensor",
                    help="--tune-epochs objective: relative error over the whole block output (tensor; the first "
                         "token's massive activation dominates it) or per token, averaged (token; measured slightly "
                         "worse on SmolLM2, docs/method.md)")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--save-rotation", metavar="FILE",
                    help="also write the residual-stream rotation Q (float32 [d, d], safetensors key 'rotation') to "
                         "FILE, outside the checkpoint: the stored embeddings and lm_head are exactly the dense ones (lm_head "
                         "with the final norm folded) times Q, rounded to their dtype")
    args = ap.parse_args(argv)
    if args.save_rotation and args.rotation == "none" and not args.twinquant:
        raise SystemExit("--save-rotation needs --rotation random|learned (or --twinquant)")
    if args.rank < 0:
        raise SystemExit("--rank must be >= 0")
    if args.twinquant:
        args.rotation, args.smoothing = "learned", "learned"
        args.refine_iters = args.refine_iters or 4
    try:
        summary = quantize_model(
            args.model, args.output, args.calib, args.group_size, args.rank, args.residual,
            args.lowrank_weighting, args.nsamples, args.seqlen, args.batch_size, args.seed, args.device,
            args.lowrank_dtype, _parse_overrides(args.rank_override), random_calibration=args.random_calibration,
            refine_iters=args.refine_iters, rotation=args.rotation, rotation_steps=args.rotation_steps,
            smoothing=args.smoothing, activation_bits=args.activation_bits, activation_clip=args.activation_clip,
            tune_epochs=args.tune_epochs, tune_lr=args.tune_lr, attention_aware=args.attention_aware,
            tune_loss=args.tune_loss, save_rotation=args.save_rotation,
            activation_subspace=args.activation_subspace,
        )
    except KeyboardInterrupt:
        raise SystemExit("interrupted: nothing was written to --output") from None
    except fmt.TwinQuantFormatError as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
