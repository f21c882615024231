"""`quantize()`: a dense Hugging Face model -> a TwinQuant checkpoint, one decoder block at a time.

    from offline_quantizer import quantize
    result = quantize("models/smollm2-135m-instruct", "twinquant-w4a16", "models/data/calib.jsonl", "runs/tq")

The recipe (`recipe.py`) says what happens; this module walks the model:

1. The source (`source.py`) is opened lazily; its family (`families.py`) says where norms and
   linears are and which transforms fold exactly. A stage the family cannot fold exactly (a
   rotation across Gemma 2/3's post-norms) is dropped with a logged reason, recorded in the
   checkpoint.
2. Calibration windows and held-out windows (from documents calibration never sees) are cut
   as the model's tokenizer frames a text (`calibration.py`, BOS included where it adds one).
3. With a rotation, Q is learned first from the weights, read lazily (norms folded).
4. Block by block: the dense block i is read; it carries the dense held-out stream. A copy is
   transformed (norm folding, rotation, online Hadamard, smoothing); after each transform the
   copy must still compute the dense block on the held-out stream (relative error of the block's
   update below `transform_tolerance`), otherwise the run stops naming the transform and block.
   Each linear gets its Hessian from the quantized calibration stream, is decomposed (low-rank
   + 4-bit residual), optionally tuned with the block, and is replaced by the layer as served
   (`decompose.ServedLinear`); the calibration and held-out streams move on through it. The
   block's tensors and the streams are saved in a work folder beside the output, so an
   interrupted run resumes at the next block.
5. The end-to-end check: the dense and the quantized held-out streams go through their final
   norm and lm_head; the mean next-token KL and the perplexity ratio are measured. A checkpoint
   with non-finite logits or a KL above `max_kl` is refused: nothing is written to the output,
   and the error names the block with the largest error and the transforms applied to it.
6. The checkpoint is written all at once (`checkpoint.py`), with a model card.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from offline_quantizer import recipe as rcp
from offline_quantizer import transforms as tf
from offline_quantizer.calibration import Windows, make_windows
from offline_quantizer.checkpoint import write_checkpoint
from offline_quantizer.decompose import Decomposed, ServedLinear, attention_mixed_gram, decompose, decompose_refined
from offline_quantizer.families import Family
from offline_quantizer.source import EMBED, FINAL_NORM, HEAD, LAYERS, Source, source_config_dict
from vllm_twinquant import format as fmt

log = logging.getLogger("twinquant.quantize")

ONLINE_HADAMARD_MODULES = ("o_proj", "down_proj")  # W4A4: inputs no residual-stream rotation reaches
SUBSPACE_MODULES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # W4A4: readers of the residual stream
CACHE_ROTATION_TARGETS_BYTES = 4 << 30


class CheckpointRefused(RuntimeError):
    """The finished checkpoint failed the end-to-end check; nothing was written to the output."""

    def __init__(self, message: str, result: QuantizeResult):
        super().__init__(message)
        self.result = result


class TransformNotExact(RuntimeError):
    """A transform changed what a block computes; the message names the transform and block."""


@dataclass
class Bounds:
    """When a run stops or a checkpoint is refused (docs/method.md, "Checks")."""

    max_kl: float | None = 1.0  # mean next-token KL (nats) on held-out windows; None: never refuse on it
    transform_tolerance: float = 0.05  # relative error of a transformed, unquantized block's update


@dataclass
class BlockReport:
    block: int
    transforms: list[str]  # applied to this block, in order
    transform_error: float  # relative error of the transformed block's update (held-out, before quantization)
    local_error: float  # relative output error of the quantized block on the dense held-out input
    stream_error: float  # relative error of the quantized model's residual stream after this block
    seconds: float


@dataclass
class EndToEndCheck:
    windows: int
    tokens: int
    mean_kl: float  # mean over tokens of KL(dense || quantized) of the next-token distributions, nats
    max_token_kl: float
    ppl_dense: float
    ppl_quantized: float
    finite: bool

    @property
    def ppl_ratio(self) -> float:
        return self.ppl_quantized / self.ppl_dense


@dataclass
class QuantizeResult:
    output: str
    recipe: str
    family: str
    quantized_layers: int = 0
    effective_bits: float = 0.0
    mean_relative_output_error: float = 0.0
    check: EndToEndCheck | None = None
    blocks: list[BlockReport] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # stages dropped for this family, with the reason
    resumed_at_block: int = 0
    seconds: float = 0.0
    peak_rss_gib: float = 0.0
    peak_gpu_gib: float | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.check is not None:
            d["check"]["ppl_ratio"] = round(self.check.ppl_ratio, 6)
        return d


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


def work_dir_for(output: str) -> str:
    """The folder beside `output` that holds a run's finished blocks until the checkpoint is written."""
    out = os.path.abspath(output)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.twinquant-work")


# -- helpers ------------------------------------------------------------------------------
def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _run(block, xs: list[torch.Tensor], kws: list[dict]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [_first(block(x, **kw)) for x, kw in zip(xs, kws)]


def _cat(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all tokens (inf when a is not finite)."""
    a, b = _cat(a), _cat(b)
    if not bool(torch.isfinite(a).all()):
        return math.inf
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _rel_update(out: list, inp: list, ref_out: list, ref_inp: list) -> float:
    """Relative error of a block's update (output - input) against a reference block's update."""
    da = [o - i for o, i in zip(out, inp)]
    db = [o - i for o, i in zip(ref_out, ref_inp)]
    return _rel(da, db)


def _rotate(xs: list[torch.Tensor], q: torch.Tensor | None) -> list[torch.Tensor]:
    return xs if q is None else [x @ q.to(x.device, x.dtype) for x in xs]


class _Stop(Exception):
    pass


class _Catcher(torch.nn.Module):
    """Stands in for decoder layer i during one forward of the skeleton: records what enters
    the first layer and every layer's keyword arguments (position embeddings and masks differ
    between sliding-window and global layers), passes the hidden states on unchanged."""

    def __init__(self, layer, record: list):
        super().__init__()
        self.layer = layer
        self.record = record

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, hidden_states, *args, **kwargs):
        self.record.append((hidden_states, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        return hidden_states


def _capture(skeleton, ids_batches: list[torch.Tensor], device) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """(input of block 0 per batch, [batch][layer] keyword arguments)."""
    layers = skeleton.model.layers
    originals = list(layers)
    inputs, kwargs = [], []
    stop = skeleton.model.norm.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(_Stop()))
    try:
        for ids in ids_batches:
            record: list = []
            for i, layer in enumerate(originals):
                layers[i] = _Catcher(layer, record)
            try:
                skeleton(input_ids=ids.to(device), use_cache=False)
            except _Stop:
                pass
            inputs.append(record[0][0].float())
            kwargs.append([_float_kwargs(kw, device) for _, kw in record])
    finally:
        stop.remove()
        for i, layer in enumerate(originals):
            layers[i] = layer
    return inputs, kwargs


def _float_kwargs(kw: dict, device) -> dict:
    out = {}
    for k, v in kw.items():
        if k in ("past_key_values", "past_key_value", "use_cache", "output_attentions"):
            continue
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device=device, dtype=torch.float32 if v.is_floating_point() else v.dtype)
        elif isinstance(v, tuple) and all(isinstance(t, torch.Tensor) for t in v):
            out[k] = tuple(t.to(device=device, dtype=torch.float32 if t.is_floating_point() else t.dtype) for t in v)
        else:
            out[k] = v
    return out


def _layer_kwargs(kwargs: list[list[dict]], i: int) -> list[dict]:
    return [per_batch[i] for per_batch in kwargs]


# -- the run ------------------------------------------------------------------------------
@dataclass
class _Plan:
    recipe: rcp.Recipe
    spec: fmt.TwinQuantSpec
    rotation: rcp.Rotation | None
    smoothing: rcp.Smoothing | None
    split: rcp.Split
    residual: rcp.Residual
    activations: rcp.Activations
    tuning: rcp.BlockTuning | None
    fold: bool
    skipped: list[dict]


def _plan(recipe: rcp.Recipe, family: Family) -> _Plan:
    skipped = []
    rotation, residual = recipe.get(rcp.Rotation), recipe.get(rcp.Residual)
    if rotation is not None and family.rotation_refusal():
        why = family.rotation_refusal()
        skipped.append({"stage": "rotation", "reason": why})
        log.warning("twinquant: rotation dropped for this model: %s", why)
        rotation = None
    act = recipe.get(rcp.Activations) or rcp.Activations(bits=16)
    if act.subspace and rotation is None:
        raise rcp.RecipeError(f"recipe {recipe.name!r}: the activation subspace needs the residual-stream rotation, "
                              f"which {family.name} cannot fold ({skipped[0]['reason'] if skipped else 'no rotation'})")
    if residual.attention_aware and family.attention_aware_refusal():
        why = family.attention_aware_refusal()
        skipped.append({"stage": "residual.attention_aware", "reason": why})
        log.warning("twinquant: attention-aware statistic dropped: %s", why)
        residual = dataclasses.replace(residual, attention_aware=False)
    if fmt.LM_HEAD not in residual.modules_to_not_convert and not family.vllm_unties_head:
        raise rcp.RecipeError(f"recipe {recipe.name!r}: residual.modules_to_not_convert leaves {fmt.LM_HEAD} out, "
                              f"but a quantized {fmt.LM_HEAD} is stored untied from the embeddings and vLLM's "
                              f"{family.name} always ties them; keep {fmt.LM_HEAD} in modules_to_not_convert")
    split = recipe.get(rcp.Split) or rcp.Split(rank=0)
    smoothing = recipe.get(rcp.Smoothing)
    spec = fmt.TwinQuantSpec(
        group_size=residual.group_size, rank=split.rank, rank_overrides=dict(split.rank_overrides),
        lowrank_dtype=split.lowrank_dtype, modules_to_not_convert=list(residual.modules_to_not_convert),
        recipe=recipe.name, activation_bits=act.bits, activation_type=act.type, activation_clip_ratio=act.clip,
        online_hadamard=list(ONLINE_HADAMARD_MODULES) if act.bits == 4 else [],
        activation_subspace_channels=act.subspace,
        activation_subspace_modules=list(SUBSPACE_MODULES) if act.subspace else [],
    )
    return _Plan(recipe, spec, rotation, smoothing, split, residual, act, recipe.get(rcp.BlockTuning),
                 fold=rotation is not None or smoothing is not None, skipped=skipped)


class _Run:
    """State of one quantization run (what a resume restores lives in `work`)."""

    def __init__(self, src: Source, plan: _Plan, windows: Windows, output: str, device, seed: int, bounds: Bounds):
        self.src, self.plan, self.windows, self.output, self.device = src, plan, windows, output, device
        self.seed, self.bounds = seed, bounds
        self.fam = src.family
        self.spec = plan.spec
        self.work = work_dir_for(output)
        self.q: torch.Tensor | None = None

    # -- the work folder -------------------------------------------------------------------
    def fingerprint(self) -> str:
        w = self.windows
        digest = hashlib.sha256(w.calib.numpy().tobytes() + w.heldout.numpy().tobytes()).hexdigest()[:16]
        blob = json.dumps({"source": self.src.fingerprint(), "recipe": self.plan.recipe.to_dict(), "seed": self.seed,
                           "windows": digest, "tolerance": self.bounds.transform_tolerance}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def open_work(self, resume: bool) -> dict:
        fp = self.fingerprint()
        run_file = os.path.join(self.work, "run.json")
        if os.path.isdir(self.work):
            try:
                with open(run_file) as f:
                    same = json.load(f).get("fingerprint") == fp
            except (OSError, ValueError):
                same = False
            if not (resume and same):
                why = "resume=False" if not resume else "it was made by another model, recipe, seed or calibration"
                raise FileExistsError(f"{self.work}: an earlier run's work folder is there and cannot be resumed "
                                      f"({why}); remove it to start over")
            with open(os.path.join(self.work, "progress.json")) as f:
                return json.load(f)
        os.makedirs(os.path.join(self.work, "blocks"))
        with open(run_file, "w") as f:
            json.dump({"fingerprint": fp, "output": os.path.abspath(self.output)}, f)
        progress = {"next_block": 0, "blocks": [], "errors": [], "layers": 0, "weights": 0, "stored_bits": 0.0}
        self.save_progress(progress)
        return progress

    def save_progress(self, progress: dict) -> None:
        _atomic_json(os.path.join(self.work, "progress.json"), progress)

    def save_streams(self, streams: dict) -> None:
        path = os.path.join(self.work, "streams.pt")
        torch.save({k: [x.cpu() for x in v] if v is not None else None for k, v in streams.items()}, path + ".tmp")
        os.replace(path + ".tmp", path)

    def load_streams(self) -> dict:
        data = torch.load(os.path.join(self.work, "streams.pt"), map_location=self.device)
        return {k: v for k, v in data.items()}

    # -- rotation --------------------------------------------------------------------------
    def _folded_reader(self, i: int, name: str, norm: str):
        off = self.fam.norm_offset

        def load():
            w = self.src.tensor(f"{LAYERS}.{i}.{name}.weight").float()
            if not self.plan.fold:
                return w
            g = self.src.tensor(f"{LAYERS}.{i}.{norm}.weight").float() + off
            return w * g[None, :]
        return load

    def _writer(self, i: int, name: str):
        return lambda: self.src.tensor(f"{LAYERS}.{i}.{name}.weight").float()

    def rotation(self, skeleton, kwargs_calib) -> torch.Tensor:
        path = os.path.join(self.work, "rotation.safetensors")
        if os.path.exists(path):
            return load_file(path)["rotation"].double()
        rot, act = self.plan.rotation, self.plan.activations
        t0 = time.time()
        readers, writers = [], []
        for i in range(self.src.num_layers):
            for g in self.fam.pre_norms:
                readers += [self._folded_reader(i, r, g.norm) for r in g.readers]
            writers += [self._writer(i, w) for w in self.fam.writers]
        hidden = self.src.config.hidden_size
        total = (
            sum(self.src.tensor(f"{LAYERS}.0.{n}.weight").numel() for n in self.fam.linears) * 4 * self.src.num_layers
        )
        if total <= CACHE_ROTATION_TARGETS_BYTES:  # small enough to keep: read each weight once
            readers, writers = [r() for r in readers], [w() for w in writers]
        init, blocks = "random", None
        if act.subspace:  # ResQ: the principal directions of the normalised stream, in the last columns
            cov = self._stream_covariance(skeleton, kwargs_calib)
            init, share = tf.subspace_rotation_init(cov, act.subspace, self.seed)
            blocks = (hidden - act.subspace, act.subspace)
            self.subspace_info = {"channels": act.subspace, "bits": self.spec.activation_subspace_bits,
                                  "modules": self.spec.activation_subspace_modules, "energy_share": round(share, 4)}
            log.info("activation subspace: top %d principal directions hold %.1f%% of the stream's energy",
                     act.subspace, 100 * share)
        steps = rot.steps if rot.kind == "learned" else 0
        q, hist = tf.learn_rotation(readers, writers, self.spec.group_size, init, steps, lr=rot.lr, seed=self.seed,
                                    device=self.device, blocks=blocks)
        self.rotation_info = {"kind": rot.kind, "steps": steps, "rtn_error_start": round(hist[0], 6),
                              "rtn_error_end": round(min(hist), 6), "seconds": round(time.time() - t0, 1)}
        save_file({"rotation": q.float().contiguous()}, path + ".tmp.safetensors",
                  metadata={"info": json.dumps(self.rotation_info),
                            "subspace": json.dumps(getattr(self, "subspace_info", None))})
        os.replace(path + ".tmp.safetensors", path)
        log.info("rotation (%s): weight RTN error %.5f -> %.5f", rot.kind, hist[0], min(hist))
        return q.double()

    def _stream_covariance(self, skeleton, kwargs_calib) -> torch.Tensor:
        """sum of x^T x over the calibration tokens at every reader group's input, norms folded."""
        d = self.src.config.hidden_size
        cov = torch.zeros(d, d, dtype=torch.float64, device=self.device)
        xs = [x.clone() for x in self.x0_dense]
        for i in tqdm(range(self.src.num_layers), desc="residual-stream covariance", unit="block", leave=False):
            block = self.src.load_block(skeleton, i, self.device)
            tf.fold_block_norms(block, self.fam)

            def hook(_m, args):
                x = args[0].reshape(-1, d).double()
                cov.addmm_(x.t(), x)
            hooks = [block.get_submodule(g.readers[0]).register_forward_pre_hook(hook) for g in self.fam.pre_norms]
            xs = _run(block, xs, _layer_kwargs(kwargs_calib, i))
            for h in hooks:
                h.remove()
            del block
        return cov.cpu()


def _check_shapes(src: Source, spec: fmt.TwinQuantSpec) -> None:
    """Every layer to quantize fits the group size, checked on the config's shapes before any
    weight is read."""
    skeleton = src.skeleton()
    widths: dict[str, int] = {}
    for i, block in enumerate(skeleton.model.layers):
        for name, m in block.named_modules():
            full = f"{LAYERS}.{i}.{name}"
            if isinstance(m, torch.nn.Linear) and not spec.is_skipped(full):
                widths[full] = m.in_features
    for full, k in widths.items():
        if k % spec.group_size or k % fmt.PACK_FACTOR:
            fits = [g for g in fmt.SUPPORTED_GROUP_SIZES if all(w % g == 0 for w in widths.values())]
            hint = (
                f"group size {max(fits)} divides every layer" if fits else "no supported group size divides every layer"
            )
            raise fmt.TwinQuantFormatError(
                f"{full}: group_size {spec.group_size} does not divide its in_features {k} ({hint}; set it with "
                f"--group-size or residual.group_size)")


def _release_memory() -> None:
    """Hand the finished block's memory back to the system (glibc keeps freed arenas otherwise,
    and the process would grow with the number of blocks)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _atomic_json(path: str, data) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


def quantize(model, recipe="twinquant-w4a16", calibration=None, output: str | None = None, *, tokenizer=None,
             device: str | None = None, seed: int = 0, max_kl: float | None = 1.0, resume: bool = True,
             transform_tolerance: float = 0.05) -> QuantizeResult:
    """Quantize `model` (a checkpoint folder or a loaded PreTrainedModel) with `recipe` (a
    Recipe, a preset name or a YAML path) on `calibration` (a .jsonl/.txt path, a list of
    strings, token ids [n, seqlen], or "random") into the folder `output`.

    Raises CheckpointRefused when the finished checkpoint fails the end-to-end check (non-finite
    logits, or mean next-token KL above `max_kl`; None disables the KL bound), TransformNotExact
    when a transform changes what a block computes, UnsupportedModelError for a model the
    quantizer cannot handle, RecipeError / CalibrationError / SourceError for bad input, and
    FileExistsError when `output` exists. An interrupted run resumes from its last finished
    block when called again with the same arguments (resume=False refuses to)."""
    t0 = time.time()
    recipe = rcp.load_recipe(recipe)
    if output is None:
        raise ValueError("output: the folder to create for the checkpoint is required")
    if os.path.exists(output):
        raise FileExistsError(f"{output} already exists; remove it or choose another folder")
    if calibration is None:
        raise ValueError("calibration: a .jsonl/.txt path, a list of strings, token ids [n, seqlen] or 'random'")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    src = Source(model, tokenizer)
    plan = _plan(recipe, src.family)
    _check_shapes(src, plan.spec)
    cal = recipe.calibration
    tok = None if (isinstance(calibration, str) and calibration == "random") or isinstance(calibration, torch.Tensor) \
        else src.tokenizer_or_load()
    windows = make_windows(calibration, tok, cal.nsamples, cal.seqlen, cal.heldout, seed, src.config.vocab_size)
    if recipe.get(rcp.EndToEnd) is not None and not os.path.isdir(src.path):
        raise rcp.RecipeError(f"recipe {recipe.name!r}: the end_to_end stage needs the dense model as a checkpoint "
                              "folder (its teacher is loaded from there)")
    run = _Run(src, plan, windows, output, device, seed, Bounds(max_kl, transform_tolerance))
    run.calibration = calibration
    result = QuantizeResult(output=output, recipe=recipe.name, family=src.family.name, skipped=plan.skipped)
    run.t0 = t0
    progress = run.open_work(resume)
    result.resumed_at_block = progress["next_block"]
    torch.manual_seed(seed)
    try:
        return _quantize(run, progress, result, t0)
    except (TransformNotExact, CheckpointRefused) as e:
        if isinstance(e, TransformNotExact) or e.result.check is None:  # a resume would stop at the same place
            shutil.rmtree(run.work, ignore_errors=True)
        raise
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted: nothing was written to {output}; the finished blocks are in "
                                f"{run.work}, and the same call resumes from there") from None


def _quantize(run: _Run, progress: dict, result: QuantizeResult, t0: float) -> QuantizeResult:
    src, plan, fam, spec, dev = run.src, run.plan, run.fam, run.spec, run.device
    skeleton = src.skeleton()
    inner = skeleton.model
    # the modules that run outside the blocks: dense values first
    src.load_module(inner.embed_tokens, "model.embed_tokens", dev)
    for _, mod in skeleton.named_modules():  # rotary frequencies and other buffers
        for attr, b in list(mod._buffers.items()):
            if b is not None and not b.is_meta:
                mod._buffers[attr] = b.to(dev)
    cal = plan.recipe.calibration
    calib_batches = list(run.windows.calib.split(cal.batch_size))
    held = run.windows.heldout
    held_batches = list(held.split(cal.batch_size)) if held.shape[0] else []
    x0_dense, kw_calib = _capture(skeleton, calib_batches, dev)
    h0_dense, kw_held = _capture(skeleton, held_batches, dev) if held_batches else ([], [])
    run.x0_dense = x0_dense

    q = run.rotation(skeleton, kw_calib) if plan.rotation is not None else None
    run.q = q
    # the stored embeddings (rotated, rounded to their dtype) start the quantized streams
    emb = src.tensor(EMBED)
    emb_stored = (emb.double() @ q).to(emb.dtype) if q is not None else emb
    if q is not None:
        inner.embed_tokens.weight.data = emb_stored.to(dev, torch.float32)
        x0_q, _ = _capture(skeleton, calib_batches, dev)
        h0_q, _ = _capture(skeleton, held_batches, dev) if held_batches else ([], [])
    else:
        x0_q, h0_q = x0_dense, h0_dense

    if progress["next_block"] == 0:
        streams = {"x_q": x0_q, "x_d": [run_x.clone() for run_x in _rotate(x0_dense, q)] if plan.tuning else None,
                   "h_q": h0_q, "h_d": h0_dense}
    else:
        streams = run.load_streams()
    n = src.num_layers
    bar = tqdm(range(progress["next_block"], n), desc="quantizing blocks", unit="block", initial=progress["next_block"],
               total=n)
    for i in bar:
        torch.manual_seed(run.seed * 1_000_003 + i)  # a resumed run draws what an uninterrupted one does
        rep, tensors, layer_stats = _quantize_block(run, skeleton, i, streams, _layer_kwargs(kw_calib, i),
                                                    _layer_kwargs(kw_held, i) if held_batches else [])
        save_file(tensors, os.path.join(run.work, "blocks", f"block-{i:05d}.safetensors"))
        run.save_streams(streams)
        progress["blocks"].append(dataclasses.asdict(rep))
        progress["errors"] += layer_stats["errors"]
        for k in ("layers", "weights", "stored_bits"):
            progress[k] += layer_stats[k]
        progress["next_block"] = i + 1
        run.save_progress(progress)
        _release_memory()
        bar.set_postfix(stream_err=f"{rep.stream_error:.3g}")
    bar.close()

    # outside the blocks, as stored
    outer: dict[str, torch.Tensor] = {EMBED: emb_stored.contiguous()}
    norm_w = src.tensor(FINAL_NORM)
    head_w = src.tensor(HEAD)
    untie = q is not None
    if q is not None:
        norm_s, head_s = tf.fold_head_norm(norm_w, head_w, fam)
        head_s = (head_s.double() @ q).to(head_w.dtype)
    else:
        norm_s, head_s = norm_w, head_w
    outer[FINAL_NORM] = norm_s.contiguous()
    head_q = head_s
    if not spec.is_skipped(fmt.LM_HEAD):  # a quantized lm_head is stored untied
        untie = True
        head_q = _quantize_head(run, skeleton, streams["x_q"], norm_s, head_s, outer, progress)
    elif untie or not src.tied:
        outer[HEAD] = head_s.contiguous()

    result.blocks = [BlockReport(**b) for b in progress["blocks"]]
    result.quantized_layers = progress["layers"]
    result.effective_bits = progress["stored_bits"] / max(progress["weights"], 1)
    result.mean_relative_output_error = sum(progress["errors"]) / max(len(progress["errors"]), 1)
    if held_batches:
        result.check = _end_to_end(skeleton, src, streams["h_d"], streams["h_q"], held_batches, run.windows.prefix,
                                   norm_w, head_w, norm_s, head_q, dev)
    result.seconds = round(time.time() - t0, 1)
    result.peak_rss_gib = round(peak_rss_gib(), 2)
    if str(dev).startswith("cuda"):
        result.peak_gpu_gib = round(torch.cuda.max_memory_allocated() / (1 << 30), 2)
    _gate(run, result)

    spec.metadata = _metadata(run, result, plan)
    cfg = source_config_dict(src)
    cfg["tie_word_embeddings"] = bool(src.tied and not untie)
    cfg["quantization_config"] = spec.to_dict()
    from offline_quantizer.card import model_card

    files_from = src.path if os.path.isdir(src.path) else None
    blocks = [os.path.join(run.work, "blocks", f"block-{i:05d}.safetensors") for i in range(n)]
    e2e = plan.recipe.get(rcp.EndToEnd)
    target = os.path.join(run.work, "blocks-checkpoint") if e2e else run.output
    if not (e2e and os.path.isdir(target)):
        write_checkpoint(target, [outer, *blocks], cfg, files_from,
                         model_card(os.path.basename(os.path.normpath(run.output)), cfg, result, plan.recipe))
    if e2e:
        _end_to_end_stage(run, result, e2e, target)
    shutil.rmtree(run.work, ignore_errors=True)
    return result


def _end_to_end_stage(run: _Run, result: QuantizeResult, e2e: rcp.EndToEnd, start: str) -> None:
    """Rounds of end-to-end KL tuning (finetune.py); of a round's rates the one with the lowest
    held-out KL is kept. The final checkpoint is checked again and renamed into place."""
    from offline_quantizer.card import model_card
    from offline_quantizer.finetune import finetune

    cal = run.plan.recipe.calibration
    cur, kept_lr = start, None
    for k, rnd in enumerate(e2e.rounds):
        best = None
        for lr in ([kept_lr] if rnd.lr_from_previous else rnd.lrs):
            out = os.path.join(run.work, f"round{k}-lr{lr:g}")
            if not os.path.isdir(out):  # a finished round of an interrupted run is kept
                finetune(cur, run.src.path, out, run.calibration, nsamples=rnd.nsamples, seqlen=cal.seqlen,
                         batch_size=rnd.batch_size, epochs=rnd.epochs, lr=lr, eval_every=rnd.eval_every,
                         seed=rnd.seed, code_lr=rnd.code_lr, device=run.device)
            with open(os.path.join(out, "config.json")) as f:
                kl = json.load(f)["quantization_config"]["metadata"]["e2e_tuning"][-1]["kept_kl"]
            log.info("end-to-end round %d, lr %g: held-out KL %.5f", k, lr, kl)
            if best is None or kl < best[0]:
                best = (kl, lr, out)
        _, kept_lr, cur = best
    result.check = check_checkpoint(cur, run.src.path, run.windows, run.device)
    result.seconds = round(time.time() - run.t0, 1)
    _gate(run, result)
    with open(os.path.join(cur, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"]["recipe"] = run.plan.recipe.name  # its rounds are the recipe's own, not added after
    meta = cfg["quantization_config"]["metadata"]
    meta["end_to_end_check"].update(_check_record(result.check, run.bounds))
    meta["quantize_seconds"] = result.seconds
    with open(os.path.join(cur, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(cur, "README.md"), "w") as f:
        f.write(model_card(os.path.basename(os.path.normpath(run.output)), cfg, result, run.plan.recipe))
    os.replace(cur, run.output)


@torch.no_grad()
def check_checkpoint(ckpt: str, dense_dir: str, windows: Windows, device) -> EndToEndCheck:
    """The end-to-end check of a finished checkpoint folder: the served model (reference.py)
    against the dense model on the held-out windows (whole models in memory)."""
    from transformers import AutoModelForCausalLM

    from offline_quantizer.reference import served_model

    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval().to(device)
    quant = served_model(ckpt).to(device)
    first = max(windows.prefix, 1) - 1
    kl_sum = kl_max = nll_d = nll_q = 0.0
    count, finite = 0, True
    for ids in windows.heldout.split(1):
        ids = ids.to(device)
        ld = torch.log_softmax(dense(input_ids=ids).logits[0].double(), -1)[first:-1]
        zq = quant(input_ids=ids).logits[0].double()
        finite = finite and bool(torch.isfinite(zq).all())
        lq = torch.log_softmax(zq, -1)[first:-1]
        kl = (ld.exp() * (ld - lq)).sum(-1)
        tgt = ids[0, first + 1 :]
        kl_sum, kl_max = kl_sum + float(kl.sum()), max(kl_max, float(kl.max()))
        nll_d -= float(ld.gather(1, tgt[:, None]).sum())
        nll_q -= float(lq.gather(1, tgt[:, None]).sum())
        count += kl.shape[0]
    mean = kl_sum / max(count, 1)
    return EndToEndCheck(windows=int(windows.heldout.shape[0]), tokens=count, mean_kl=mean if finite else math.inf,
                         max_token_kl=kl_max if finite else math.inf, ppl_dense=math.exp(nll_d / max(count, 1)),
                         ppl_quantized=math.exp(min(nll_q / max(count, 1), 700.0)) if finite else math.inf,
                         finite=finite and math.isfinite(mean))


def _quantize_block(run: _Run, skeleton, i: int, streams: dict, kw: list[dict], kw_held: list[dict]):
    t0 = time.time()
    src, plan, fam, spec, dev, q = run.src, run.plan, run.fam, run.spec, run.device, run.q
    prefix = f"{LAYERS}.{i}"
    tol = run.bounds.transform_tolerance
    dense = src.load_block(skeleton, i, dev)
    h_d = streams["h_d"]
    h_d_next = _run(dense, h_d, kw_held)
    h_in, h_ref = _rotate(h_d, q), _rotate(h_d_next, q)
    block = copy.deepcopy(dense)
    applied: list[str] = []
    worst = 0.0

    def check(name: str, inputs: list, reference: list) -> None:
        """The transformed block must still compute the dense block on the held-out windows."""
        nonlocal worst
        applied.append(name)
        if not kw_held:
            return
        err = _rel_update(_run(block, inputs, kw_held), inputs, reference, inputs)
        worst = max(worst, err)
        if not err <= tol:
            raise TransformNotExact(
                f"{prefix}: {name} changed what the block computes (relative error of its update {err:.3g} on the "
                f"held-out windows, tolerance {tol}; family {fam.name}). This is a bug in how the transform folds "
                f"into this family; nothing was written to {run.output}")

    if plan.fold:
        tf.fold_block_norms(block, fam)
        check("norm folding", h_d, h_d_next)
    if q is not None:
        tf.rotate_block(block, fam, q)
        check("rotation", h_in, h_ref)
    names = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    hadamard = {n for n in names if spec.has_online_hadamard(f"{prefix}.{n}") and not spec.is_skipped(f"{prefix}.{n}")}
    for n in hadamard:  # W4A4: the input is rotated online by a block Hadamard H; W -> W H (exact)
        lin = names[n]
        lin.weight.data = fmt.apply_online_hadamard(lin.weight.data.float())
        lin.register_forward_pre_hook(lambda _m, args: (fmt.apply_online_hadamard(args[0]), *args[1:]))
    if hadamard:
        check("online Hadamard", h_in, h_ref)
    x_d_next = _run(block, streams["x_d"], kw) if plan.tuning else None

    # calibration statistics from the quantized stream
    hess = {n: torch.zeros(m.in_features, m.in_features, device=dev) for n, m in names.items()}
    counts = dict.fromkeys(names, 0)

    def make_hook(name):
        def h(_m, inp, _out):
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()
            hess[name].addmm_(x.t(), x)
            counts[name] += x.shape[0]
        return h

    aware = plan.residual.attention_aware
    hooks = [m.register_forward_hook(make_hook(n)) for n, m in names.items()
             if not (aware and n == "self_attn.v_proj")]
    if aware:
        hooks += _attention_aware_hooks(block, hess, counts, fam)
    _run(block, streams["x_q"], kw)
    for h in hooks:
        h.remove()
    hess = {n: hess[n] * (2.0 / max(counts[n], 1)) for n in names}

    dtypes = src.block_dtypes(i)
    if plan.smoothing is not None:
        norm_dtype = dtypes.get(f"{fam.pre_norms[0].norm}.weight", torch.bfloat16)
        smoothed = tf.smooth_block(block, fam, hess, spec.group_size, norm_dtype, skip=frozenset(hadamard),
                                   steps=plan.smoothing.steps, lr=plan.smoothing.lr)
        if smoothed:
            check("smoothing", h_in, h_ref)

    decomposed: dict[str, Decomposed] = {}
    dense_w: dict[str, torch.Tensor] = {}
    for name, lin in names.items():
        full = f"{prefix}.{name}"
        if spec.is_skipped(full):
            continue
        w = lin.weight.data
        d = _decompose(plan, full, w, hess[name])
        decomposed[name], dense_w[name] = d, w.float().clone()
        lin.weight.data = d.dequantized(torch.float32)
    if plan.tuning is not None:
        from offline_quantizer.tune import tune_block

        act = plan.activations
        res = tune_block(block, decomposed, streams["x_q"], x_d_next, kw, plan.tuning.epochs, lr=plan.tuning.lr,
                         norms={g: fam.norm_offset for g in fam.norms},
                         norm_dtype=dtypes.get(f"{fam.pre_norms[0].norm}.weight", torch.bfloat16),
                         activation_bits=dict.fromkeys(decomposed, act.bits), activation_clip=act.clip,
                         loss=plan.tuning.loss,
                         activation_subspace={n: spec.subspace_channels_for(f"{prefix}.{n}") for n in decomposed},
                         activation_subspace_bits=spec.activation_subspace_bits, activation_type=act.type)
        applied.append("block tuning")
        tqdm.write(
            f"block {i}: held-out relative MSE {res.heldout_start:.5f} -> {res.heldout_end:.5f} ({res.steps} steps)"
        )

    tensors: dict[str, torch.Tensor] = {}
    stats = {"layers": 0, "weights": 0, "stored_bits": 0.0, "errors": []}
    for name, d in decomposed.items():
        full = f"{prefix}.{name}"
        lin = names[name]
        stats["errors"].append(_output_error(d, dense_w[name], hess[name]))
        bias = lin.bias.data if lin.bias is not None else None
        for part, (codes, scales, up, down, b) in _stored_parts(fam, src.config, name, d, bias).items():
            pfull = f"{prefix}.{part}"
            _store_layer(tensors, stats, spec, pfull, codes, scales, up, down)
            if b is not None:
                tensors[f"{pfull}.bias"] = b.to(dtypes.get(f"{name}.bias", torch.float32)).cpu().contiguous()
        served = ServedLinear(d, bias, name in hadamard, spec.activation_bits, spec.activation_clip_ratio,
                              spec.subspace_channels_for(full), spec.activation_subspace_bits,
                              spec.activation_type).to(dev)
        parent, _, attr = name.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, attr, served)
    for name, p in block.named_parameters():  # norms (folded, smoothed, tuned) and linears kept dense
        tensors[f"{prefix}.{name}"] = p.data.to(dtypes.get(name, torch.float32)).cpu().contiguous()
        p.data = tensors[f"{prefix}.{name}"].to(dev, torch.float32)  # the streams see what is stored

    local = _rel(_run(block, h_in, kw_held), h_ref) if kw_held else 0.0
    streams["x_q"] = _run(block, streams["x_q"], kw)
    if not all(bool(torch.isfinite(x).all()) for x in streams["x_q"]):
        raise CheckpointRefused(
            f"checkpoint refused: non-finite logits ahead: the output of {prefix} as quantized is not finite on the "
            f"calibration windows (after {', '.join(applied + ['quantization'])}). Nothing was written to "
            f"{run.output}", QuantizeResult(output=run.output, recipe=plan.recipe.name, family=fam.name))
    if plan.tuning:
        streams["x_d"] = x_d_next
    if kw_held:
        streams["h_q"] = _run(block, streams["h_q"], kw_held)
        streams["h_d"] = h_d_next
    stream = _rel(streams["h_q"], h_ref) if kw_held else 0.0
    rep = BlockReport(block=i, transforms=applied, transform_error=round(worst, 8), local_error=round(local, 8),
                      stream_error=round(stream, 8) if math.isfinite(stream) else stream,
                      seconds=round(time.time() - t0, 2))
    return rep, tensors, stats


@torch.no_grad()
def _quantize_head(run: _Run, skeleton, x_q: list[torch.Tensor], norm_s: torch.Tensor, head_s: torch.Tensor,
                   tensors: dict, stats: dict) -> ServedLinear:
    """lm_head as a quantized linear, decomposed as the blocks' linears are, its statistic the final norm (as
    stored) of the quantized calibration stream; its tensors go into `tensors`, its error, count and bits into
    `stats`. Returns the head as served."""
    spec, dev = run.spec, run.device
    norm = skeleton.model.norm
    norm._parameters["weight"] = torch.nn.Parameter(norm_s.to(dev, torch.float32), requires_grad=False)
    k = head_s.shape[1]
    hess, count = torch.zeros(k, k, device=dev), 0
    for x in x_q:
        y = norm(x.to(dev)).reshape(-1, k).float()
        hess.addmm_(y.t(), y)
        count += y.shape[0]
    hess *= 2.0 / max(count, 1)
    w = head_s.to(dev, torch.float32)
    d = _decompose(run.plan, fmt.LM_HEAD, w, hess)
    err = _output_error(d, w, hess)
    stats["errors"].append(err)
    _store_layer(tensors, stats, spec, fmt.LM_HEAD, d.codes, d.scales, d.up, d.down)
    tqdm.write(f"{fmt.LM_HEAD}: relative output error {err:.4g} (rank {spec.rank_for(fmt.LM_HEAD)})")
    return ServedLinear(d, None, False, spec.activation_bits, spec.activation_clip_ratio, 0,
                        spec.activation_subspace_bits, spec.activation_type).to(dev)


def _decompose(plan: _Plan, name: str, w: torch.Tensor, hess: torch.Tensor) -> Decomposed:
    """One linear (`name` its full module name) split and quantized as the plan says."""
    spec = plan.spec
    r = spec.rank_for(name)
    fmt.check_layer_shape(name, w.shape[0], w.shape[1], spec.group_size)
    if plan.split.method == "refined" and r:
        d, _ = decompose_refined(w, r, spec.group_size, spec.scale_torch_dtype, spec.lowrank_torch_dtype, hess,
                                 plan.split.refine_iters)
        return d
    return decompose(w, r, spec.group_size, spec.scale_torch_dtype, spec.lowrank_torch_dtype, hess,
                     plan.residual.method, plan.split.weighting)


def _output_error(d: Decomposed, w: torch.Tensor, hess: torch.Tensor) -> float:
    """Relative output error of the decomposed layer against its dense weight, under the input statistic."""
    diff = d.dequantized(torch.float32) - w
    return float(torch.sum((diff @ hess) * diff) / torch.sum((w @ hess) * w).clamp_min(1e-30))


def _store_layer(tensors: dict, stats: dict, spec: fmt.TwinQuantSpec, name: str, codes, scales, up, down) -> None:
    """A quantized layer's stored tensors into `tensors`, its count and stored bits into `stats`."""
    r = 0 if down is None else down.shape[0]
    tensors[f"{name}.{fmt.WEIGHT_PACKED}"] = fmt.pack_codes(codes.cpu())
    tensors[f"{name}.{fmt.WEIGHT_SCALE}"] = scales.cpu().contiguous()
    if r:
        tensors.update(fmt.lowrank_tensors(name, up.cpu(), down.cpu(), spec))
    stats["layers"] += 1
    stats["weights"] += codes.numel()
    stats["stored_bits"] += spec.effective_bits(codes.shape[0], codes.shape[1], r) * codes.numel()


def _stored_parts(fam: Family, config, name: str, d: Decomposed, bias):
    """{stored name: (codes, scales, up, down, bias)} of one decomposed linear: itself, or, for a
    linear fused on disk (Phi-3), its parts by output rows, each with a copy of the shared D."""
    parts = fam.stored_split.get(name)
    if not parts:
        return {name: (d.codes, d.scales, d.up, d.down, bias)}
    sizes = fam.stored_part_sizes(name, config)
    if sum(sizes) != d.codes.shape[0]:
        raise ValueError(f"{name}: {d.codes.shape[0]} output rows, but its parts {parts} add up to {sum(sizes)}")
    out, row = {}, 0
    for part, size in zip(parts, sizes):
        rows = slice(row, row + size)
        out[part] = tuple(t.clone() if t is not None else None for t in
                          (d.codes[rows], d.scales[rows], d.up[rows] if d.up is not None else None, d.down,
                           bias[rows] if bias is not None else None))
        row += size
    return out


def _attention_aware_hooks(block, hess, counts, fam: Family) -> list:
    """Replace v_proj's input Gram matrix by the attention-mixed one (decompose.attention_mixed_gram):
    q and k caught from q_proj / k_proj (through the per-head norms where the family has them), the
    rotary embedding from the attention's kwargs; the attention's own scale, window and soft cap."""
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
        qh = cap["q"].view(b, t, -1, d)
        kh = cap["k"].view(b, t, -1, d)
        if "self_attn.q_norm" in fam.head_norms:
            qh, kh = attn.q_norm(qh), attn.k_norm(kh)
        qh, kh = qh.transpose(1, 2), kh.transpose(1, 2)
        cos, sin = cap["pos"]
        qh, kh = apply_rotary_pos_emb(qh, kh, cos, sin)
        g, n = attention_mixed_gram(x, qh, kh, scaling=getattr(attn, "scaling", d**-0.5),
                                    window=getattr(attn, "sliding_window", None),
                                    softcap=getattr(attn, "attn_logit_softcapping", None))
        hess[name].add_(g)
        counts[name] += n

    return [attn.register_forward_pre_hook(pre, with_kwargs=True),
            attn.q_proj.register_forward_hook(catch("q")), attn.k_proj.register_forward_hook(catch("k")),
            attn.v_proj.register_forward_hook(v_hook)]


@torch.no_grad()
def _end_to_end(skeleton, src: Source, h_d, h_q, held_batches, prefix: int, norm_w, head_w, norm_s, head_s,
                dev) -> EndToEndCheck:
    """KL and perplexities of the dense and quantized models on the held-out windows, from the
    final residual streams through each model's final norm and lm_head (as stored; `head_s` may be the quantized
    lm_head as served)."""
    norm = skeleton.model.norm
    softcap = getattr(src.config, "final_logit_softcapping", None)

    def logits(h, nw, hw):  # hw: lm_head's weight, or the quantized lm_head as served
        norm._parameters["weight"] = torch.nn.Parameter(nw.to(dev, torch.float32), requires_grad=False)
        z = hw(norm(h)) if isinstance(hw, torch.nn.Module) else norm(h) @ hw.to(dev, torch.float32).t()
        return torch.tanh(z / softcap) * softcap if softcap else z

    kl_sum = kl_max = nll_d = nll_q = 0.0
    count, windows = 0, 0
    finite = True
    first = max(prefix, 1) - 1  # positions whose prediction is scored
    for hd, hq, ids in zip(h_d, h_q, held_batches):
        for j in range(hd.shape[0]):
            ld = torch.log_softmax(logits(hd[j : j + 1], norm_w, head_w)[0].double(), -1)[first:-1]
            zq = logits(hq[j : j + 1], norm_s, head_s)[0].double()
            finite = finite and bool(torch.isfinite(zq).all())
            lq = torch.log_softmax(zq, -1)[first:-1]
            kl = (ld.exp() * (ld - lq)).sum(-1)
            tgt = ids[j, first + 1 :].to(dev)
            kl_sum += float(kl.sum())
            kl_max = max(kl_max, float(kl.max()))
            nll_d -= float(ld.gather(1, tgt[:, None]).sum())
            nll_q -= float(lq.gather(1, tgt[:, None]).sum())
            count += kl.shape[0]
            windows += 1
    mean = kl_sum / max(count, 1)
    return EndToEndCheck(windows=windows, tokens=count, mean_kl=mean if finite else math.inf,
                         max_token_kl=kl_max if finite else math.inf, ppl_dense=math.exp(nll_d / max(count, 1)),
                         ppl_quantized=math.exp(min(nll_q / max(count, 1), 700.0)) if finite else math.inf,
                         finite=finite and math.isfinite(mean))


def _gate(run: _Run, result: QuantizeResult) -> None:
    c = result.check
    if c is None:
        log.warning("twinquant: no held-out windows (calibration.heldout = 0): the end-to-end check was skipped")
        return
    bound = run.bounds.max_kl
    if c.finite and (bound is None or c.mean_kl <= bound):
        log.info("end-to-end check: mean KL %.4g nats, perplexity %.4g -> %.4g on %d held-out windows",
                 c.mean_kl, c.ppl_dense, c.ppl_quantized, c.windows)
        return
    worst = max(result.blocks, key=lambda b: (b.local_error if math.isfinite(b.local_error) else math.inf))
    why = "non-finite logits" if not c.finite else f"mean next-token KL {c.mean_kl:.4g} nats (bound {bound})"
    raise CheckpointRefused(
        f"checkpoint refused: {why} against the dense model on {c.windows} held-out windows ({c.tokens} tokens; "
        f"perplexity {c.ppl_dense:.4g} dense, {c.ppl_quantized:.4g} quantized). Largest block error: "
        f"{LAYERS}.{worst.block}, relative output error {worst.local_error:.3g} on the dense input, after "
        f"{', '.join(worst.transforms + ['quantization'])}. Nothing was written to {run.output}; the finished blocks "
        f"stay in {run.work}, and the same call with max_kl=None (--max-kl inf) writes them anyway.", result)


def _check_record(c: EndToEndCheck, bounds: Bounds) -> dict:
    return {"windows": c.windows, "tokens": c.tokens, "mean_kl": _round(c.mean_kl, 6),
            "max_token_kl": _round(c.max_token_kl, 6), "ppl_dense": _round(c.ppl_dense, 4),
            "ppl_quantized": _round(c.ppl_quantized, 4), "ppl_ratio": _round(c.ppl_ratio, 5),
            "max_kl_bound": bounds.max_kl}


def _round(x: float, n: int):
    return round(x, n) if math.isfinite(x) else str(x)


def _metadata(run: _Run, result: QuantizeResult, plan: _Plan) -> dict:
    transforms = {}
    if run.q is not None:
        path = os.path.join(run.work, "rotation.safetensors")
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        transforms["rotation"] = json.loads(meta.get("info", "null"))
        sub = json.loads(meta.get("subspace", "null"))
        if sub:
            transforms["activation_subspace"] = sub
    if plan.spec.online_hadamard:
        transforms["online_hadamard"] = {"modules": plan.spec.online_hadamard,
                                         "block": "largest power of 2 dividing in_features"}
    c = result.check
    w = run.windows
    return {
        "source": os.path.basename(os.path.normpath(run.src.path)),
        "family": run.fam.name,
        "recipe": plan.recipe.to_dict(),
        "skipped_stages": plan.skipped or None,
        "transforms": transforms or None,
        "calibration": {
            "data": w.source,
            "nsamples": int(w.calib.shape[0]),
            "seqlen": int(w.calib.shape[1]),
            "heldout": int(w.heldout.shape[0]),
            "special_prefix_tokens": w.prefix,
            "seed": run.seed,
        },
        "effective_bits_per_weight": round(result.effective_bits, 4),
        "mean_relative_output_error": round(result.mean_relative_output_error, 6),
        "end_to_end_check": None if c is None else _check_record(c, run.bounds),
        "blocks": [
            {"block": b.block, "local_error": b.local_error, "stream_error": b.stream_error} for b in result.blocks
        ],
        "quantize_seconds": result.seconds,
        "created_by": "vllm-twinquant",
    }
