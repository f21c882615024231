"""The W4A8 kernel (csrc_triton/kernels/w4a8.py) in Triton's CPU interpreter, against a float64
reference of the same numerics: the format's per-token codes (format.per_token_codes), the 4-bit
residual and the low-rank term read the unquantized x. Every case draws fresh random data and
poisons the output first. Full size on the GPU: benchmarks/kernels/bench_w4a8.py."""

import dataclasses
import os
import re
import sys

import pytest
import torch
from conftest import kernel_layer, kernel_reference

import csrc_triton as ct
from csrc_triton.kernels.w4a8 import W4a8Config, quantize_rows
from vllm_twinquant.format import per_token_codes

CASES = [  # M, N, K, group, rank, slot bounds, dtype, bias, W4a8Config
    (1, 64, 128, 32, 0, (), torch.bfloat16, False, (16, 32, 4, 2, 1)),  # M = 1, group 32
    (17, 576, 576, 64, 16, (), torch.bfloat16, True, (16, 64, 4, 2, 1)),  # 576-wide layer, odd M, bias
    (5, 960, 576, 64, 8, (576, 768), torch.float16, False, (16, 64, 4, 2, 1)),  # merged q/k/v, fp16
    (9, 96, 640, 128, 24, (), torch.bfloat16, False, (16, 32, 4, 2, 2, 64)),  # split-K, short last split, group in 2
    (33, 64, 384, 128, 0, (32,), torch.float16, True, (32, 32, 4, 2, 3)),  # two slots, split 3, M > block_m
    (33, 64, 384, 128, 16, (32,), torch.float16, True, (32, 32, 4, 2, 1, 128, True)),  # the 8-bit copy of the codes
    (19, 576, 576, 64, 16, (), torch.bfloat16, False, (16, 64, 4, 2, 2, 64, True)),  # ... group 64, split 2
]


@pytest.mark.parametrize("act_quant", ["fp8", "int8", "int4"])
@pytest.mark.parametrize("m,n,k,g,r,bounds,dtype,bias,cfg", CASES)
def test_w4a8_kernel_matches_float64_of_the_format_numerics(m, n, k, g, r, bounds, dtype, bias, cfg, act_quant):
    """int4: a W4A4 layer's 4-bit codes (clipped, as the W4A4 recipes make them) on the same kernel."""
    clip = 0.8 if act_quant == "int4" else 1.0
    torch.manual_seed(m + n + k)
    qw, sc, down, up = kernel_layer(n, k, g, r, len(bounds) + 1, dtype, seed=n + k + r)
    x = (torch.randn(m, k) * torch.rand(m, 1) * 4).to(dtype)
    x[0, : k // 3] = 0  # a token with a zero stretch and (M > 1) tokens of different ranges
    b = torch.randn(n).to(dtype) if bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype)
    ct.gemm(x, ct.repack(qw, g), sc, g, down, up, b, slot_bounds=bounds, out=out, config=W4a8Config(*cfg),
            act_quant=act_quant, act_clip=clip)
    assert not torch.isnan(out).any(), "some outputs were never written"
    ref = kernel_reference(x, qw, sc, g, down, up, b, bounds, act_quant, clip)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err <= 1e-2, err
    # and it is the 8-bit product: closer to its own reference than to the W4A16 product's
    w16 = kernel_reference(x, qw, sc, g, down, up, b, bounds, None)
    assert (out.double() - ref).norm() < (out.double() - w16).norm()
    if act_quant != "fp8":  # the bias conversion of the group sums is exact: the same output, bit for bit
        bias_cvt = torch.full((m, n), float("nan"), dtype=dtype)
        ct.gemm(x, ct.repack(qw, g), sc, g, down, up, b, slot_bounds=bounds, out=bias_cvt, act_quant=act_quant,
                config=dataclasses.replace(W4a8Config(*cfg), convert="bias"), act_clip=clip)
        assert torch.equal(bias_cvt, out)


@pytest.mark.parametrize("act_quant,clip", [("fp8", 1.0), ("int8", 1.0), ("int4", 1.0), ("int4", 0.8)])
def test_quantize_rows_gives_the_format_codes_bit_for_bit(act_quant, clip):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4160, generator=gen) * torch.tensor([1e-3, 1, 30, 1e4, 1, 0])[:, None]
    x[4, 7] = 200.0  # an outlier: every other entry of that token gets a coarse step
    bits, kind = {"fp8": (8, "float"), "int8": (8, "int"), "int4": (4, "int")}[act_quant]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        xd = x.to(dtype)
        q, s, sums = quantize_rows(xd, act_quant, 64, clip_ratio=clip)
        q_ref, s_ref = per_token_codes(xd, bits, kind, clip)
        assert torch.equal(s, s_ref[:, 0])
        assert torch.equal(q.float(), q_ref)
        assert not q.float()[5].any() and s[5] == 1e-12  # an all-zero token
        if kind == "int":  # the codes' sum of every 64 columns, for the kernel's -8 term
            assert torch.equal(sums, q_ref.reshape(6, 65, 64).sum(-1).int())
        else:
            assert sums is None


def test_w4a8_layers_decode_on_the_w4a16_kernels_and_batch_on_the_w4a8_kernel():
    h100 = ct.Device.named("NVIDIA H100 80GB HBM3")
    for slots in ((), (4096, 5120)):
        shape = ct.LayerShape(6144, 4096, 128, 64, slots, torch.bfloat16, act_quant="fp8")
        w16 = ct.LayerShape(6144, 4096, 128, 64, slots, torch.bfloat16)
        ms = (1, 2, 8, 16, 17, 32, 64, 128, 129, 256, 1024, 8192)
        kernels = {m: ct.plan(shape, m, h100).kernel for m in ms}
        assert kernels[1] == ct.plan(w16, 1, h100).kernel and kernels[16] == ct.plan(w16, 16, h100).kernel
        w8 = [kernels[m] in ct.dispatch.W4A8_PRIORITY for m in ms]
        # W4A16's kernels (the same plan as the W4A16 layer's) for the first token counts only, W4A8 from 129 on
        assert w8 == sorted(w8) and all(w8[ms.index(129):]), kernels
        assert all(kernels[m] == ct.plan(w16, m, h100).kernel for m, on in zip(ms, w8) if not on)
        # the W4A16 layer itself never reaches a W4A8 kernel
        assert all(ct.plan(w16, m, h100).kernel not in ct.dispatch.W4A8_PRIORITY for m in kernels)


def test_w4a8_is_refused_with_the_reason_where_the_tensor_cores_are_missing():
    a100 = ct.Device.named("NVIDIA A100-SXM4-80GB", (8, 0))
    tables = ct.tables_for("NVIDIA H100 80GB HBM3", (9, 0))  # (the A100 has none; asking would log that)
    shape = ct.LayerShape(4096, 4096, 128, 0, (), torch.bfloat16, act_quant="fp8")
    with pytest.raises(ct.NoKernel, match=r"FP8 tensor cores \(sm_89\+\); this device is sm_80"):
        ct.plan(shape, 256, a100, tables)
    int8 = ct.LayerShape(4096, 4096, 128, 0, (), torch.bfloat16, act_quant="int8")
    assert ct.plan(int8, 256, a100, tables).kernel == "w4a8"  # INT8 tensor cores from sm_80


def test_a_precision_not_yet_checked_on_a_gpu_is_not_planned_there(monkeypatch):
    from csrc_triton.kernels import w4a8

    monkeypatch.setattr(w4a8, "CHECKED_ON_GPU", ("fp8",))
    int8 = ct.LayerShape(4096, 4096, 128, 0, (), torch.bfloat16, act_quant="int8")
    with pytest.raises(ct.NoKernel, match="int8 activation codes on the W4A8 kernels have not been checked on a GPU"):
        ct.plan(int8, 256, ct.Device.named("NVIDIA H100 80GB HBM3"))


@pytest.mark.parametrize("act_quant,dtype", [("fp8", "bf16"), ("int8", "fp16")])
def test_w4a8_kernel_compiles_for_sm90_to_8_bit_wgmma(act_quant, dtype):
    """The interpreter checks the arithmetic; only a compile shows the product runs on Hopper's 8-bit
    tensor cores (an asynchronous wgmma of e4m3 or s8 operands, fp32 or s32 results)."""
    from csrc_triton.compile import compile_sm90

    ptrs = {"x_ptr": f"*{dtype}", "xq_ptr": "*fp8e4nv" if act_quant == "fp8" else "*i8", "xs_ptr": "*fp32",
            "xsum_ptr": "*i32", "qw_ptr": "*i32", "sc_ptr": "*fp16", "up_ptr": f"*{dtype}", "us_ptr": "*fp32",
            "ws_ptr": "*fp32", "bias_ptr": f"*{dtype}", "y_ptr": f"*{dtype}"}
    consts = dict(GROUP=128, CHUNK_W=8, FP8=act_quant == "fp8", DENSE=False, HAS_LOWRANK=True, HAS_US=False,
                  HAS_BIAS=True,
                  BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, BLOCK_R=64, GROUP_M=8, SPLIT_K=1, UPCAST=False, PDL=False)
    ptx = compile_sm90("csrc_triton.kernels.w4a8", "_w4a8_kernel", ptrs, consts, 8, aligned_extra=("N", "K"))
    kind = r"f32\.e4m3\.e4m3" if act_quant == "fp8" else r"s32\.s8\.s8"
    assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\." + kind, ptx), "no 8-bit wgmma"
    assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\." + dtype.replace("fp", "f"), ptx)  # U term


def test_w4a8_fp8_layers_take_cublas_block_scaled_gemm_where_the_table_says_and_it_can_run(tmp_path):
    """The `w4a8_fp8_cublas` rows route FP8 layers of 128-wide groups on sm_90 to cuBLAS's 1x128 block-scaled
    GEMM; other group sizes and GPUs other than sm_90 keep the Triton W4A8 kernel, with the reason."""
    import json

    from csrc_triton.dispatch import load_tables, table_file

    h100 = ct.Device.named("NVIDIA H100 80GB HBM3")
    with open(table_file(h100.name)) as f:
        table = json.load(f)
    table["w4a8_fp8_cublas"] = [{"max_m": 256, "max_n": None, "min_k": 0, "config": None},
                                {"max_m": None, "max_n": None, "min_k": 0, "config": {}}]
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    tables = load_tables(str(path))
    fp8 = ct.LayerShape(4096, 4096, 128, 64, (), torch.bfloat16, act_quant="fp8")
    assert [ct.plan(fp8, m, h100, tables).kernel for m in (256, 257, 8192)] == ["w4a8", "fp8_cublas", "fp8_cublas"]
    for shape, device, why in [
        (ct.LayerShape(4096, 4096, 64, 64, (), torch.bfloat16, act_quant="fp8"), h100, "group size 64"),
        (fp8, ct.Device.named("NVIDIA L40S", (8, 9)), "sm_90 only"),
        (fp8, ct.Device.named(h100.name, torch_version="2.8.0", cuda_runtime="12.8"), "measured with torch 2.11+"),
    ]:
        assert ct.plan(shape, 8192, device, tables).kernel == "w4a8"
        assert why in ct.dispatch.kernels()["fp8_cublas"].can_implement(shape, device)[1]
    int8 = ct.LayerShape(4096, 4096, 128, 64, (), torch.bfloat16, act_quant="int8")
    assert "not FP8" in ct.dispatch.kernels()["fp8_cublas"].can_implement(int8, h100)[1]


@pytest.mark.parametrize("cap", [1, 256 << 20])
def test_fp8_cublas_makes_its_codes_in_row_ranges_and_matches_float64_of_the_format_numerics(monkeypatch, cap):
    """fp8_cublas's bookkeeping on the CPU: cuBLAS's 1x128 x 1x128 block-scaled GEMM stood in for by its
    definition, the layer made whole or (cap 1) in 128-row ranges inside the slots of a merged layer; the
    output is poisoned first, and the low-rank term and bias are added over every slot; 5 tokens reach cuBLAS
    padded to its alignment."""
    from csrc_triton.kernels import base, fp8_cublas

    def block_scaled_mm(a, b, scale_a, scale_b, out_dtype, out=None):
        assert a.dtype == b.dtype == torch.float8_e4m3fn and a.shape[1] == b.shape[0]
        assert a.shape[0] % fp8_cublas.M_ALIGN == 0  # cuBLAS refuses other token counts (5 here, padded)
        assert scale_a.shape == (a.shape[0], a.shape[1] // 128) and scale_b.shape == (b.shape[0] // 128, b.shape[1])
        y = (a.double() * scale_a.double().repeat_interleave(128, 1)) @ (
            b.double() * scale_b.double().repeat_interleave(128, 0))
        return y.to(out_dtype) if out is None else out.copy_(y)

    monkeypatch.setattr(base, "TRANSIENT_BYTES", cap)
    monkeypatch.setattr(torch, "_scaled_mm", block_scaled_mm)
    m, n, k, r, bounds = 5, 320, 256, 8, (64, 288)
    qw, sc, down, up = kernel_layer(n, k, 128, r, 3, torch.bfloat16, seed=5)
    x = (torch.randn(m, k) * torch.rand(m, 1) * 4).to(torch.bfloat16)
    b = torch.randn(n).to(torch.bfloat16)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
    a = base.Launch(x, ct.repack(qw, 128), sc, down, up, None, None, b, out, 128, *bounds, 64, False,
                    lambda: (None, 0), act_quant="fp8")
    assert len(a.row_ranges(1)) == (4 if cap == 1 else 1)
    fp8_cublas.KERNEL.launch(a, fp8_cublas.Fp8CublasConfig())
    assert not torch.isnan(out).any(), "some outputs were never written"
    ref = kernel_reference(x, qw, sc, 128, down, up, b, bounds, "fp8", 1.0)
    assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-2
    w16 = kernel_reference(x, qw, sc, 128, down, up, b, bounds, None)
    assert (out.double() - ref).norm() < (out.double() - w16).norm()


def test_a_dense_w4a8_config_reads_the_codes_as_they_are_where_the_8_bit_copy_would_exceed_the_transient_cap(
        monkeypatch):
    """A table's `dense` config on a layer wider than base.TRANSIENT_BYTES (a 128k-vocabulary head, say) makes no
    8-bit copy of the codes and gives the same output, bit for bit, as the copy does under the cap."""
    from csrc_triton.kernels import base, w4a8

    m, n, k, g, r = 9, 64, 256, 128, 8
    qw, sc, down, up = kernel_layer(n, k, g, r, 1, torch.bfloat16, seed=9)
    x = (torch.randn(m, k) * 3).to(torch.bfloat16)
    cfg = W4a8Config(16, 32, 4, 2, 1, 128, True)
    outs, made, copy = [], [], w4a8.codes_to_8bit
    monkeypatch.setattr(w4a8, "codes_to_8bit", lambda *a: made.append(a[0].shape) or copy(*a))
    for cap, copies in [(n * k, 1), (n * k - 1, 0)]:
        made.clear()
        monkeypatch.setattr(base, "TRANSIENT_BYTES", cap)
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
        ct.gemm(x, ct.repack(qw, g), sc, g, down, up, None, out=out, config=cfg, act_quant="fp8")
        assert len(made) == copies and not torch.isnan(out).any()
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


def test_the_plan_names_no_8_bit_copy_for_a_layer_over_the_transient_cap(monkeypatch):
    """What the plan (and `explain`) says runs is what launches: a table's `dense` row becomes dense=False on a
    layer whose 8-bit copy would exceed base.TRANSIENT_BYTES, and stays as it is under the cap (the shipped
    table's dense rows are for layers far under it, so the cap is lowered here)."""
    from csrc_triton import tables_for
    from csrc_triton.kernels import base, w4a8
    from csrc_triton.kernels.base import Device

    device = Device.named("NVIDIA H100 80GB HBM3", (9, 0))
    tables = tables_for(device.name, device.capability)
    for act in ("fp8", "int8"):
        shape = ct.LayerShape(4096, 4096, 128, 64, (), torch.bfloat16, act_quant=act)
        rows = {m: tables.w4a8[act].lookup(m, shape.n, shape.k) for m in (64, 128, 256, 1024)}
        assert any(r is not None and r.dense for r in rows.values())
        for cap, over in [(shape.n * shape.k, False), (shape.n * shape.k - 1, True)]:
            monkeypatch.setattr(base, "TRANSIENT_BYTES", cap)
            for m, row in rows.items():
                want = dataclasses.replace(row, dense=False) if over and row is not None and row.dense else row
                assert w4a8.KERNEL.choose(m, shape, tables) == want, (act, m, cap)


def test_the_plugin_takes_a_w4a8_layer_to_the_gpu_only_where_the_plans_kernel_can_run_it(monkeypatch):
    """The plugin asks the plan's W4A8 kernel itself, so a GPU without the tensor cores and the switch
    TWINQUANT_DISABLED_KERNELS=w4a8 both send the layer to the next plugin kernel at load, with the reason,
    rather than to a plan that has no kernel at the first forward."""
    from csrc_triton.kernels.base import Device
    from vllm_twinquant.kernels import TritonTwinQuantKernel, TwinQuantLayerConfig

    c = TwinQuantLayerConfig(in_features=4096, slot_sizes=(4096,), rank=64, group_size=128, act_dtype=torch.bfloat16,
                             activation_bits=8, activation_type="float")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for name, cap, disabled, want in [("NVIDIA H100 80GB HBM3", (9, 0), "", (True, None)),
                                      ("NVIDIA A100-SXM4-80GB", (8, 0), "", "FP8 tensor cores"),
                                      ("NVIDIA H100 80GB HBM3", (9, 0), "w4a8", "TWINQUANT_DISABLED_KERNELS")]:
        monkeypatch.setattr(Device, "of", staticmethod(lambda d, n=name, c=cap: Device.named(n, c)))
        monkeypatch.setenv("TWINQUANT_DISABLED_KERNELS", disabled)
        got = TritonTwinQuantKernel.can_implement(c)
        assert got == want if isinstance(want, tuple) else (not got[0] and want in got[1]), (name, disabled, got)


def test_the_plugin_takes_w4a4_to_the_int8_kernels_where_its_codes_were_checked_on_a_gpu(monkeypatch):
    """W4A4 (4-bit codes, online Hadamard) goes to the INT8 kernels as "int4" codes; until a GPU check lists
    int4 in CHECKED_ON_GPU the Triton kernel refuses it with that reason, and after it, takes it (as now: tune.py
    sweep-w4a8 --act-quant int4 passed on an H100); a ResQ subspace layer is asked for as its first K - S columns."""
    from csrc_triton.kernels import w4a8
    from csrc_triton.kernels.base import Device
    from vllm_twinquant.kernels import TritonTwinQuantKernel, TwinQuantLayerConfig

    c = TwinQuantLayerConfig(in_features=14336, slot_sizes=(4096,), rank=64, group_size=128,
                             act_dtype=torch.bfloat16, activation_bits=4, activation_clip=0.9, online_hadamard=2048)
    assert c.act_quant == "int4"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TWINQUANT_DISABLED_KERNELS", "")
    monkeypatch.setattr(Device, "of", staticmethod(lambda d: Device.named("NVIDIA H100 80GB HBM3", (9, 0))))
    shipped = w4a8.CHECKED_ON_GPU
    monkeypatch.setattr(w4a8, "CHECKED_ON_GPU", ("fp8", "int8"))
    ok, why = TritonTwinQuantKernel.can_implement(c)
    assert not ok and "int4" in why and "not been checked on a GPU" in why
    monkeypatch.setattr(w4a8, "CHECKED_ON_GPU", shipped)
    assert "int4" in shipped and TritonTwinQuantKernel.can_implement(c) == (True, None)
    sub = TwinQuantLayerConfig(in_features=4096, slot_sizes=(4096,), rank=64, group_size=128,
                               act_dtype=torch.bfloat16, activation_bits=4, activation_subspace=128)
    assert TritonTwinQuantKernel.can_implement(sub) == (True, None)
    monkeypatch.setattr(w4a8, "CHECKED_ON_GPU", ("fp8", "int8"))
    ok, why = TritonTwinQuantKernel.can_implement(sub)
    assert not ok and "int4" in why


# -- w4a8_rs: W4A8-INT8 on Hopper (Gluon; no interpreter: its arithmetic is emulated here, its layout
# claims and instructions are checked by compiling for sm_90)
def test_w4a8_rs_fragment_bytes_are_16q_of_the_columns_perm_columns_names():
    """The kernel's two-instruction unpacking (shift by 4 or 0, then (w & 0xF0F0F0F0) ^ 0x80808080), applied
    to the word and byte a fragment position reads, gives 16 (c - 8) of the column `perm_columns` puts there;
    and that order is a permutation of every 64-column chunk."""
    from csrc_triton.kernels.w4a8_rs import perm_columns

    n, k, g = 8, 384, 128
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (n, k), generator=gen)
    from vllm_twinquant.format import pack_codes

    words = ct.repack(pack_codes((codes - 8).to(torch.int8)), g).to(torch.int64) & 0xFFFFFFFF
    perm = perm_columns(k)
    assert torch.equal(perm.sort().values, torch.arange(k))
    assert torch.equal(perm.reshape(-1, 64) // 64, torch.arange(k // 64)[:, None].expand(-1, 64))  # within chunks
    f = torch.arange(k)
    c, b, h, t, i = f // 64, (f // 32) % 2, (f // 16) % 2, (f // 4) % 4, f % 4
    w = words[:, 8 * c + 2 * t + h]
    byte = ((((w << (4 - 4 * b)) & 0xF0F0F0F0) ^ 0x80808080) >> (8 * i)) & 0xFF
    got = torch.where(byte >= 128, byte - 256, byte)
    assert torch.equal(got, 16 * (codes[:, perm] - 8))


def test_quantize_rows_in_mma_order_gives_the_format_codes_permuted():
    from csrc_triton.kernels.w4a8_rs import perm_columns

    x = (torch.randn(5, 576) * torch.tensor([1e-3, 1, 30, 1e4, 0])[:, None]).to(torch.bfloat16)
    q, s, sums = quantize_rows(x, "int8", 64, mma_order=True)
    q_ref, s_ref = per_token_codes(x, 8, "int")
    assert sums is None and torch.equal(s, s_ref[:, 0])
    assert torch.equal(q.float(), q_ref[:, perm_columns(576)])
    with pytest.raises(ValueError, match="mma_order takes integer codes"):
        quantize_rows(x, "fp8", 64, mma_order=True)


def test_w4a8_rs_bias_conversion_is_exact_for_every_sum_a_group_can_make():
    """convert="bias": int32 v read as the float whose bits are BIAS_BITS + v, minus BIAS_VALUE, is v exactly
    below BIAS_EXACT_BELOW, which bounds every group's sum (|16 q| <= 128, |xq| <= 127, 128 columns); past
    it the bits leave the binade and the reading is wrong. (The Triton kernel's form is checked bit for bit
    against its cvt form in the interpreter, above.)"""
    from csrc_triton.kernels.w4a8 import ROUND_MAGIC, ROUND_MAGIC_BITS
    from csrc_triton.kernels.w4a8_rs import BIAS_BITS, BIAS_EXACT_BELOW, BIAS_VALUE

    assert ROUND_MAGIC_BITS == torch.tensor(ROUND_MAGIC).view(torch.int32).item()  # the float's own bits

    def read(v):
        return (v + BIAS_BITS.value).view(torch.float32) - BIAS_VALUE.value

    assert 128 * 127 * 128 < BIAS_EXACT_BELOW
    edge = BIAS_EXACT_BELOW - 1
    gen = torch.Generator().manual_seed(0)
    v = torch.cat([torch.randint(-edge, edge + 1, (1 << 16,), dtype=torch.int32, generator=gen),
                   torch.tensor([-edge, -1, 0, 1, edge], dtype=torch.int32)])
    assert torch.equal(read(v).double(), v.double())
    assert read(torch.tensor([BIAS_EXACT_BELOW + 1], dtype=torch.int32)).item() != BIAS_EXACT_BELOW + 1


RS_PTRS = {"x_ptr": "*bf16", "xq_ptr": "*i8", "xs_ptr": "*fp32", "qw_ptr": "*i32", "sc_ptr": "*fp16",
           "up_ptr": "*bf16", "us_ptr": "*fp32", "ws_ptr": "*fp32", "bias_ptr": "*bf16", "y_ptr": "*bf16"}


@pytest.mark.parametrize("cfg,rank,group,dtype", [((64, 4, 4), 64, 128, "bf16"), ((64, 8, 3), 0, 64, "fp16"),
                                                   ((64, 4, 4, True, "bias"), 64, 128, "bf16")])
def test_w4a8_rs_compiles_to_int8_wgmma_on_register_fragments_without_spills(cfg, rank, group, dtype):
    """The fragment is wgmma's register operand (no descriptor for A), every 8-bit MMA is s8 x s8 -> s32,
    the low-rank term runs on 16-bit wgmma, the layout claims hold (a moving conversion fails to compile),
    the 64-token configs keep everything in registers, and the "bias" form converts the group sums without
    the int-to-float conversion instruction."""
    from csrc_triton.compile import compile_sm90
    from csrc_triton.kernels import w4a8_rs
    from csrc_triton.kernels.w4a8_rs import W4a8RsConfig

    c = W4a8RsConfig(*cfg)
    ptrs = {**RS_PTRS, "x_ptr": f"*{dtype}", "up_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", "y_ptr": f"*{dtype}"}
    ptx, res = compile_sm90("csrc_triton.kernels.w4a8_rs", "_tq_w4a8_rs_kernel", ptrs,
                            w4a8_rs.constexprs(c, group, rank, False, True, False), c.warps, gluon=True,
                            aligned_extra=("N", "K"), want_resources=True)
    mma8 = re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k32\.(\S+)\s+\{[^}]*\},\s*\{", ptx)
    assert mma8 and {m[1] for m in mma8} == {"s32.s8.s8"} and {m[0] for m in mma8} == {str(c.tokens)}
    low = re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\." + dtype.replace("fp", "f"), ptx)
    assert bool(low) == bool(rank)
    assert res["STACK"] == 0 and res["LOCAL"] == 0, res
    assert ("cvt.rn.f32.s32" in ptx) == (c.convert == "cvt")


@pytest.mark.parametrize("tokens,stages,wgs,rank,group,dtype,bias,convert,overlap", [
    (128, 4, 2, 64, 128, "bf16", False, "cvt", False), (64, 6, 2, 0, 64, "fp16", True, "cvt", False),
    (64, 6, 1, 64, 128, "bf16", False, "cvt", False), (128, 6, 2, 64, 128, "bf16", False, "bias", False),
    (64, 6, 2, 64, 128, "bf16", False, "cvt", True), (64, 6, 1, 64, 64, "fp16", True, "bias", True)])
def test_w4a8_ws_compiles_to_a_tma_producer_warp_and_int8_wgmma_warpgroups_that_never_spill_in_their_loops(
        tokens, stages, wgs, rank, group, dtype, bias, convert, overlap):
    """One producer warp issues the TMA copies of a scale group (x's codes, each warpgroup's words) against one
    barrier expecting exactly their bytes; the consumers' MMAs are s8 x s8 -> s32 wgmma on register fragments (no
    descriptor for A) of 64 rows each; a slot is released by one arrival per warpgroup (its barrier counts them);
    registers move from the producer to the consumers; no group loop touches local memory, ptxas keeps the
    wgmmas asynchronous (one wait per group, not one per wgmma; with `overlap` one of them leaves the next
    group's wgmma in flight), and the ring fits in shared memory (with one warpgroup, twice: two CTAs per SM)."""
    from csrc_triton.compile import compile_sm90, descriptor_type
    from csrc_triton.kernels import w4a8_ws

    cfg = w4a8_ws.W4a8WsConfig(tokens, stages, warpgroups=wgs, convert=convert, overlap=overlap)
    x_l, q_l = w4a8_ws.smem_layouts(tokens, group)
    ptrs = {"x_ptr": f"*{dtype}", "xs_ptr": "*fp32", "sc_ptr": "*fp16", "up_ptr": f"*{dtype}", "us_ptr": "*fp32",
            "ws_ptr": "*fp32", "bias_ptr": f"*{dtype}", "y_ptr": f"*{dtype}",
            "x_desc": descriptor_type(torch.int8, [tokens, group], x_l),
            "q_desc": descriptor_type(torch.int32, [w4a8_ws.WG_ROWS, group // 8], q_l)}
    ptx, res = compile_sm90("csrc_triton.kernels.w4a8_ws", "_tq_w4a8_ws_kernel", ptrs,
                            w4a8_ws.constexprs(cfg, group, rank, False, bias, False), 4, gluon=True,
                            want_resources=True, want_sass=True, maxnreg=w4a8_ws.MAXNREG[wgs])
    assert len(re.findall(r"cp\.async\.bulk\.tensor\.2d\.shared::\w+\.global", ptx)) == 1 + wgs
    expect = {int(b) for b in re.findall(r"mbarrier\.arrive\.expect_tx\.shared(?:::cta)?\.b64 _, \[%r\d+\], (\d+);",
                                         ptx)}
    assert expect == {tokens * group + wgs * w4a8_ws.WG_ROWS * group // 2}
    mma8 = re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k32\.(\S+)\s+\{[^}]*\},\s*\{", ptx)
    assert mma8 and {m[1] for m in mma8} == {"s32.s8.s8"} and {m[0] for m in mma8} == {str(tokens)}
    assert bool(re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32", ptx)) == bool(rank)
    assert sorted(int(c) for c in re.findall(r"mbarrier\.init\.shared::cta\.b64 \[%r\d+\], (\d+);", ptx)) == (
        sorted([1] * stages + [wgs] * stages))
    assert f"setmaxnreg.inc.sync.aligned.u32 \t{int(w4a8_ws.CONSUMER_REGS)};" in ptx
    assert re.search(rf"setmaxnreg\.(dec|inc)\.sync\.aligned\.u32 \t{int(w4a8_ws.PRODUCER_REGS)};", ptx)
    # a few per-tile values may go to the stack between tiles, never inside a scale-group loop
    loops = _sass_loops(res["SASS"])
    mma_loops = [body for body in loops if any("IGMMA" in ins for ins in body)]
    assert len(mma_loops) == wgs and not any(("STL" in ins or "LDL" in ins) for b in mma_loops for ins in b)
    # convert="bias": the group sums become fp32 without the conversion pipe (no I2F in the group loops)
    assert any("I2F" in ins for b in mma_loops for ins in b) == (convert == "cvt")
    # each loop runs two groups of group / 32 wgmmas (k32) and waits twice: serialised, ptxas would wait after each
    for body in mma_loops:
        assert sum("IGMMA" in ins for ins in body) == 2 * group // 32
        assert sum("WARPGROUP.DEPBAR" in ins for ins in body) == 2
    assert bool(re.search(r"wgmma\.wait_group\.sync\.aligned\s+1;", ptx)) == overlap
    assert res["STACK"] <= 128 and res["LOCAL"] == 0, res
    ctas = w4a8_ws.CTAS_PER_SM[wgs]
    assert ctas * 64 * 1024 >= ctas * 32 * (4 * wgs + 4) * w4a8_ws.MAXNREG[wgs]  # the registers let them share
    assert res["SMEM"] * ctas <= 228 * 1024 - ctas * 1024, res


def _sass_loops(sass: str) -> list[list[str]]:
    """The innermost loops of a cuobjdump disassembly: the instructions from a backward branch's target
    to the branch, for branches whose range holds no other backward branch."""
    ins = [(int(a, 16), text.strip()) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    back = [(int(t, 16), a) for a, text in ins for t in re.findall(r"BRA\s+(?:`\()?0x([0-9a-f]+)", text)
            if int(t, 16) < a]
    inner = [(lo, hi) for lo, hi in back if not any(lo <= lo2 and hi2 <= hi and (lo2, hi2) != (lo, hi)
                                                      for lo2, hi2 in back)]
    return [[text for a, text in ins if lo <= a <= hi] for lo, hi in inner]


def test_w4a8_ws_launch_check_and_descriptors_name_what_a_config_needs():
    from csrc_triton.kernels import w4a8_ws

    cfg = w4a8_ws.W4a8WsConfig(128, 6)
    x_desc, q_desc = w4a8_ws.descriptors(torch.zeros(300, 4096, dtype=torch.int8),
                                         torch.zeros(6144, 512, dtype=torch.int32), cfg, 128)
    assert list(x_desc.block_shape) == [128, 128] and list(q_desc.block_shape) == [64, 16]
    assert w4a8_ws.grid(300, 6144, cfg, 132) == (3 * 48,)
    assert w4a8_ws.grid(300, 6144, w4a8_ws.W4a8WsConfig(128, 6, persistent=True), 132) == (132,)
    assert w4a8_ws.grid(16, 4096, w4a8_ws.W4a8WsConfig(128, 6, persistent=True), 132) == (32,)
    assert w4a8_ws.grid(4096, 4096, w4a8_ws.W4a8WsConfig(64, 6, persistent=True, warpgroups=1), 132) == (264,)
    assert w4a8_ws.grid(300, 6144, w4a8_ws.W4a8WsConfig(64, 6, warpgroups=1), 132) == (5 * 96,)
    with pytest.raises(ValueError, match="group size 32"):
        w4a8_ws.launch_check(16, 6144, 4096, 32, cfg)
    with pytest.raises(ValueError, match="tokens 64 or 128"):
        w4a8_ws.launch_check(16, 6144, 4096, 128, w4a8_ws.W4a8WsConfig(256, 6))
    with pytest.raises(ValueError, match="warpgroups one of"):
        w4a8_ws.launch_check(16, 6144, 4096, 128, w4a8_ws.W4a8WsConfig(64, 6, warpgroups=3))
    with pytest.raises(ValueError, match="overlap .* at 64 tokens only"):
        w4a8_ws.launch_check(16, 6144, 4096, 128, w4a8_ws.W4a8WsConfig(128, 6, overlap=True))
    w4a8_ws.launch_check(16, 6144, 4096, 128, w4a8_ws.W4a8WsConfig(64, 6, overlap=True))


# W4A8-INT8 rows that run the Triton kernel at every token count (where no kernel before it is named)
TRITON_EVERYWHERE = [{"max_m": None, "max_n": None, "min_k": 0, "config": {
    "block_m": 64, "block_n": 128, "warps": 4, "stages": 4, "split_k": 1, "block_k": 128, "dense": False,
    "convert": "cvt"}}]


def test_w4a8_int8_layers_take_the_gluon_kernel_where_the_table_says_and_it_can_run(tmp_path, monkeypatch):
    import json

    from csrc_triton.dispatch import load_tables, table_file
    from csrc_triton.kernels import w4a8
    from csrc_triton.kernels.w4a8_rs import W4a8RsConfig

    h100 = ct.Device.named("NVIDIA H100 80GB HBM3")
    with open(table_file(h100.name)) as f:
        table = json.load(f)
    table["w4a8_rs_int8"] = [{"max_m": 64, "max_n": None, "min_k": 0, "config": None},
                             {"max_m": None, "max_n": None, "min_k": 0, "config": {"tokens": 64, "warps": 8,
                                                                                   "stages": 4}}]
    table["w4a8_int8"] = TRITON_EVERYWHERE
    table["w4a8_ws_int8"] = []
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    tables = load_tables(str(path))
    int8 = ct.LayerShape(6144, 4096, 128, 64, (4096, 5120), torch.bfloat16, act_quant="int8")
    assert [ct.plan(int8, m, h100, tables).kernel for m in (64, 65, 8192)] == ["w4a8", "w4a8_rs", "w4a8_rs"]
    assert ct.plan(int8, 2**31 // 4096, h100, tables).kernel == "w4a8"  # past its int32 offsets
    assert ct.plan(int8, 8192, h100, tables).config == W4a8RsConfig(64, 8, 4)
    int4 = dataclasses.replace(int8, act_quant="int4")  # W4A4's codes: the INT8 rows and kernels, once checked
    monkeypatch.setattr(w4a8, "CHECKED_ON_GPU", ("fp8", "int8"))
    with pytest.raises(ct.NoKernel, match="int4 activation codes on the W4A8 kernels have not been checked"):
        ct.plan(int4, 65, h100, tables)
    monkeypatch.setattr(w4a8, "CHECKED_ON_GPU", (*w4a8.CHECKED_ON_GPU, "int4"))
    assert [ct.plan(int4, m, h100, tables).kernel for m in (64, 65, 8192)] == ["w4a8", "w4a8_rs", "w4a8_rs"]
    narrow = ct.LayerShape(960, 576, 64, 16, (576, 768), torch.bfloat16, act_quant="int8")  # 64-row slots
    assert ct.plan(narrow, 8192, h100, tables).config == W4a8RsConfig(64, 4, 4)
    fp8 = ct.LayerShape(6144, 4096, 128, 64, (), torch.bfloat16, act_quant="fp8")
    assert ct.plan(fp8, 8192, h100, tables).kernel != "w4a8_rs"
    for device, why in [(ct.Device.named("NVIDIA H100 80GB HBM3", (9, 0), "3.9.0"), "Triton 3.9.0: measured with"),
                        (ct.Device.named("NVIDIA L40S", (8, 9)), "needs sm_90")]:
        assert ct.plan(int8, 8192, device, tables).kernel == "w4a8"
        assert why in ct.dispatch.kernels()["w4a8_rs"].can_implement(int8, device)[1]
    monkeypatch.setenv("TWINQUANT_DISABLED_KERNELS", "w4a8_rs")
    assert ct.plan(int8, 8192, h100, tables).kernel == "w4a8"


def test_w4a8_int8_layers_take_the_warp_specialized_kernel_first_where_the_table_names_it(tmp_path, monkeypatch):
    import json

    from csrc_triton.dispatch import load_tables, table_file
    from csrc_triton.kernels.w4a8_ws import W4a8WsConfig

    h100 = ct.Device.named("NVIDIA H100 80GB HBM3")
    with open(table_file(h100.name)) as f:
        table = json.load(f)
    rs = {"tokens": 64, "warps": 8, "stages": 4}
    table["w4a8_rs_int8"] = [{"max_m": 64, "max_n": None, "min_k": 0, "config": None},
                             {"max_m": None, "max_n": None, "min_k": 0, "config": rs}]
    table["w4a8_ws_int8"] = [{"max_m": 256, "max_n": None, "min_k": 0, "config": None},
                             {"max_m": None, "max_n": None, "min_k": 0, "config": {"tokens": 128, "stages": 6}}]
    table["w4a8_int8"] = TRITON_EVERYWHERE
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    tables = load_tables(str(path))
    int8 = ct.LayerShape(6144, 4096, 128, 64, (4096, 5120), torch.bfloat16, act_quant="int8")
    assert [ct.plan(int8, m, h100, tables).kernel for m in (64, 256, 257, 8192)] == [
        "w4a8", "w4a8_rs", "w4a8_ws", "w4a8_ws"]
    p = ct.plan(int8, 8192, h100, tables)
    assert p.config == W4a8WsConfig(128, 6) and p.pdl_trigger == 0 and p.lowrank is not None
    narrow = ct.LayerShape(960, 576, 64, 16, (576, 768), torch.bfloat16, act_quant="int8")  # 64-row slots
    assert ct.plan(narrow, 8192, h100, tables).kernel == "w4a8_ws"
    newer = ct.Device.named("NVIDIA H100 80GB HBM3", (9, 0), "3.9.0")
    assert "Triton 3.9.0: measured with" in ct.dispatch.kernels()["w4a8_ws"].can_implement(int8, newer)[1]
    monkeypatch.setenv("TWINQUANT_DISABLED_KERNELS", "w4a8_ws")
    assert ct.plan(int8, 8192, h100, tables).kernel == "w4a8_rs"
    del table["w4a8_ws_int8"]  # a table written before the kernel existed: no rows, the next kernel
    path.write_text(json.dumps(table))
    monkeypatch.delenv("TWINQUANT_DISABLED_KERNELS")
    assert ct.plan(int8, 8192, h100, load_tables(str(path))).kernel == "w4a8_rs"


def test_a_gpu_check_script_lets_its_own_process_plan_a_precision_once(monkeypatch):
    from csrc_triton.kernels import w4a8

    monkeypatch.setattr(w4a8, "CHECKED_ON_GPU", ("fp8", "int8"))
    assert not w4a8.device_supports("int4", (9, 0))[0]
    assert w4a8.check_here("int4") and not w4a8.check_here("int4") and not w4a8.check_here("int8")
    assert w4a8.CHECKED_ON_GPU == ("fp8", "int8", "int4") and w4a8.device_supports("int4", (9, 0))[0]


def test_profile_kernels_ws_words_build_a_w4a8_ws_config_with_each_fields_type_and_name_the_fields_on_a_bad_one():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "kernels"))
    import profile_kernels

    from csrc_triton.kernels.w4a8_ws import W4a8WsConfig

    cfg = profile_kernels.ws_config(["tokens=64", "stages=6", "persistent=1", "convert=bias", "overlap=false"])
    assert cfg == W4a8WsConfig(64, 6, persistent=True, convert="bias", overlap=False)
    with pytest.raises(SystemExit, match="W4a8WsConfig has the fields"):
        profile_kernels.ws_config(["tiles=64"])
