"""twinquant-finetune: end-to-end tuning of a finished checkpoint against the dense model."""

import json
import math
import os

import pytest
import torch
from conftest import checkpoint_layer

TEXT = " ".join(
    f"Paragraph {i}: the river town of {name} kept its {thing} in the old {place}, and every {season} "
    f"the council counted {i * 7 % 31} boats, {i * 13 % 17} bridges and one stubborn mill."
    for i, (name, thing, place, season) in enumerate(
        [("Arden", "records", "granary", "spring"), ("Bexley", "bells", "chapel", "summer"),
         ("Corfe", "maps", "tower", "autumn"), ("Dunmore", "ledgers", "mill", "winter")] * 6))


def test_finetune_tunes_scales_factors_norms_only_and_never_worsens_heldout(tiny_dense, tiny_tq_int8, tmp_path):
    from safetensors.torch import load_file

    from offline_quantizer.finetune import finetune
    from vllm_twinquant import format as fmt

    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    out = str(tmp_path / "ft")
    summary = finetune(tiny_tq_int8, tiny_dense, out, str(calib), nsamples=8, seqlen=32, batch_size=2, epochs=2,
                       lr=2e-3, eval_every=1)
    spec = fmt.validate_checkpoint(out)
    assert spec.lowrank_dtype == "int8"
    assert summary["heldout_kl_end"] <= summary["heldout_kl_start"] and summary["steps"] == 6
    assert summary["kept_step"] > 0, summary  # a rate this large moves the loss on 3 training batches
    a = load_file(os.path.join(tiny_tq_int8, "model.safetensors"))
    b = load_file(os.path.join(out, "model.safetensors"))
    assert a.keys() == b.keys()
    changed = set()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if not torch.equal(a[k], b[k]):
            changed.add(k.rsplit(".", 1)[-1])
    # codes, embeddings and lm_head as stored; scales, factors (int8 codes + row scales), norms tuned
    assert changed <= {fmt.WEIGHT_SCALE, fmt.LOWRANK_UP, fmt.LOWRANK_DOWN, fmt.LOWRANK_UP_SCALE,
                       fmt.LOWRANK_DOWN_SCALE, "weight"}, changed
    assert fmt.WEIGHT_SCALE in changed and "weight" in changed
    for k in a:
        if k.endswith(".weight") and not k.endswith("norm.weight"):
            assert torch.equal(a[k], b[k]), k
    with open(os.path.join(out, "config.json")) as f:
        q = json.load(f)["quantization_config"]
    assert q["recipe"].endswith("-e2e") and q["metadata"]["e2e_tuning"][-1]["kept_step"] == summary["kept_step"]
    with pytest.raises(FileExistsError, match="already exists"):
        finetune(tiny_tq_int8, tiny_dense, out, str(calib), nsamples=8, seqlen=32, batch_size=2)
    with pytest.raises(ValueError, match="at least 2 calibration batches"):
        finetune(tiny_tq_int8, tiny_dense, str(tmp_path / "ft1"), str(calib), nsamples=2, seqlen=32, batch_size=2)
    assert not os.path.exists(tmp_path / "ft1")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".twinquant-")]  # no half-written folder


def test_finetune_max_minutes_stops_on_time_and_writes_the_best_point(tiny_dense, tiny_tq_int8, tmp_path):
    """--max-minutes: past the deadline no more steps are taken; the checkpoint is still written
    (the best held-out point so far: here the start) and records the planned schedule."""
    from offline_quantizer.finetune import finetune
    from vllm_twinquant import format as fmt

    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    out = str(tmp_path / "ft")
    summary = finetune(tiny_tq_int8, tiny_dense, out, str(calib), nsamples=8, seqlen=32, batch_size=2, epochs=2,
                       lr=2e-3, eval_every=1, max_minutes=1e-9)  # the deadline passes while the models load
    fmt.validate_checkpoint(out)
    assert summary["steps"] == 0 and summary["kept_step"] == 0
    assert summary["heldout_kl_end"] == summary["heldout_kl_start"]
    with open(os.path.join(out, "config.json")) as f:
        e2e = json.load(f)["quantization_config"]["metadata"]["e2e_tuning"][-1]
    assert e2e["planned_steps"] == 6 and e2e["steps"] == 0 and e2e["max_minutes"] == 1e-9


def test_finetune_w4a4_student_computes_what_the_torch_kernel_serves(tiny_dense, tmp_path):
    """A W4A4 checkpoint: each tuned layer applies the online Hadamard and the per-token 4-bit
    quantizer exactly as vLLM's torch path does, and the tuned checkpoint keeps its W4A4 config."""
    from conftest import small_recipe
    from safetensors.torch import load_file

    from offline_quantizer import quantize
    from offline_quantizer.finetune import _load_student, finetune
    from vllm_twinquant import format as fmt
    from vllm_twinquant.kernels import TorchTwinQuantKernel, TwinQuantLayerConfig

    ckpt = str(tmp_path / "a4")
    quantize(tiny_dense, small_recipe({"rotation": {"kind": "random"}}, {"activations": {"bits": 4, "clip": 0.9}}),
             "random", ckpt, device="cpu")
    spec = fmt.load_spec(ckpt)
    q = load_file(os.path.join(ckpt, "model.safetensors"))
    student, _ = _load_student(ckpt, q, spec)
    pre = "model.layers.1.mlp.down_proj"
    tuned = student.get_submodule(pre)
    tuned.use_stored = True
    layer = checkpoint_layer(q, pre)
    c = TwinQuantLayerConfig(in_features=1536, slot_sizes=(576,), rank=8, group_size=64, act_dtype=torch.float32,
                             activation_bits=4, activation_clip=0.9, online_hadamard=fmt.hadamard_block_size(1536))
    x = torch.randn(5, 1536)
    with torch.no_grad():
        want = TorchTwinQuantKernel(c).apply(layer, x, None)
        got = tuned(x)
    assert ((got - want).norm() / want.norm()).item() < 1e-5

    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    out = str(tmp_path / "a4-ft")
    summary = finetune(ckpt, tiny_dense, out, str(calib), nsamples=6, seqlen=32, batch_size=2, lr=2e-3, eval_every=1)
    assert summary["heldout_kl_end"] <= summary["heldout_kl_start"]
    tuned_spec = fmt.validate_checkpoint(out)
    assert tuned_spec.activation_bits == 4 and tuned_spec.activation_clip_ratio == 0.9
    assert tuned_spec.online_hadamard == spec.online_hadamard


def test_finetune_code_lr_learns_codes_straight_through(tiny_dense, tiny_tq_int8, tmp_path):
    """--code-lr: the codes become latent values rounded in the forward pass; the rounded ones
    are written (same format, same bits), and the held-out loss still never gets worse."""
    from safetensors.torch import load_file

    from offline_quantizer.finetune import finetune
    from vllm_twinquant import format as fmt

    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    out = str(tmp_path / "ftc")
    summary = finetune(tiny_tq_int8, tiny_dense, out, str(calib), nsamples=8, seqlen=32, batch_size=2, epochs=2,
                       lr=2e-3, eval_every=1, code_lr=0.6)
    fmt.validate_checkpoint(out)
    assert summary["heldout_kl_end"] <= summary["heldout_kl_start"]
    a = load_file(os.path.join(tiny_tq_int8, "model.safetensors"))
    b = load_file(os.path.join(out, "model.safetensors"))
    packed = [k for k in a if k.endswith("." + fmt.WEIGHT_PACKED)]
    changed = sum(int((fmt.unpack_codes(a[k], a[k].shape[1] * 8) != fmt.unpack_codes(b[k], b[k].shape[1] * 8)).sum())
                  for k in packed)
    total = sum(a[k].numel() * 8 for k in packed)
    # Adam's first step moves each latent code by about 0.6, so it rounds elsewhere: codes differ
    # exactly when a tuned point was kept (here the start usually wins, and then the stored codes
    # must come back unchanged)
    assert (changed > 0) == (summary["kept_step"] > 0), (changed, summary)
    assert summary["codes_changed"] == round(changed / total, 6)
    with open(os.path.join(out, "config.json")) as f:
        meta = json.load(f)["quantization_config"]["metadata"]["e2e_tuning"][-1]
    assert meta["code_lr"] == 0.6
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["quantization_config"]["recipe"].endswith("-e2e-codes")
    with pytest.raises(ValueError, match="code_lr must be >= 0"):
        finetune(tiny_tq_int8, tiny_dense, str(tmp_path / "ftn"), str(calib), nsamples=8, seqlen=32, code_lr=-1)


def test_tuned_linear_straight_through_codes_reach_a_shifted_grid():
    """The latent codes of _TunedLinear move under the straight-through gradient until they round
    to the codes that reproduce a target layer (here: every code shifted by +1 or -1)."""
    from offline_quantizer.finetune import _TunedLinear

    torch.manual_seed(0)
    codes = torch.randint(-7, 7, (32, 128)).float()
    target = (codes + torch.randint(0, 2, codes.shape) * 2 - 1).clamp(-8, 7)
    s = torch.rand(32, 2) + 0.5
    m = _TunedLinear(codes, s, None, None, None, torch.bfloat16, train_codes=True)
    m.a.requires_grad_(False)
    opt = torch.optim.Adam([m.codes], lr=0.05)
    x = torch.randn(512, 128)
    w_t = (target.view(32, 2, 64) * s[:, :, None]).view(32, 128)
    for i in range(150):  # cosine-decayed rate, as finetune() uses
        opt.param_groups[0]["lr"] = 0.05 * 0.5 * (1 + math.cos(math.pi * i / 150))
        loss = (m(x) - x @ w_t.t()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(m.rounded_codes().detach(), target)
    assert not torch.equal(target, codes)
