"""The launch plan (csrc_triton/dispatch.py) as properties: every token count of every layer gets a
kernel that can run it with a config that fits the layer, the tables are data, switches remove
kernels, a device without a table gets the nearest one, and what runs where can be printed."""

import dataclasses
import json
import logging
import os

import pytest
import torch

from csrc_triton import Device, LayerShape, plan, ranges, summary, tables_for
from csrc_triton import dispatch as P
from csrc_triton.kernels.dequant import DequantConfig, fold_lowrank
from csrc_triton.kernels.gemv import GemvConfig
from csrc_triton.kernels.mma_decode import MmaConfig
from csrc_triton.kernels.tile import TileConfig
from csrc_triton.kernels.wgmma_rs import RsConfig

H100 = Device.named("NVIDIA H100 80GB HBM3")
H200 = Device.named("NVIDIA H200")
DEVICES = {
    "h100": H100, "h200": H200,
    "sm90-new-triton": Device.named("NVIDIA H100 80GB HBM3", (9, 0), "3.9.0"),  # wgmma_rs not measured there
    "cpu-interpreter": Device.of(torch.device("cpu")),
}
LAYERS = {  # (N, K, slot bounds): Llama-3-8B and SmolLM2-135M, merged as vLLM merges them
    "llama-qkv": (6144, 4096, (4096, 5120)), "llama-o": (4096, 4096, ()), "llama-gate_up": (28672, 4096, (14336,)),
    "llama-down": (4096, 14336, ()), "smollm2-qkv": (960, 576, (576, 768)), "smollm2-gate_up": (3072, 576, (1536,)),
    "smollm2-down": (576, 1536, ()),
}
MS = list(range(1, 300)) + [384, 512, 1000, 1024, 4096, 16384]


def _fits(p, shape: LayerShape) -> None:
    c, max_bn = p.config, shape.max_block_n
    if isinstance(c, TileConfig):
        assert c.block_n <= max_bn and max_bn % c.block_n == 0 and shape.group_size % c.block_k == 0
        assert c.mode in (4, 7) and (c.mode == 7 or shape.group_size % 128 == 0)
    elif isinstance(c, MmaConfig):
        assert 16 * c.mt * c.warps <= max_bn and shape.group_size in (64, 128)
    elif isinstance(c, RsConfig):
        assert c.block_n <= max_bn and c.block_n % (16 * c.warps) == 0
    elif isinstance(c, GemvConfig):
        assert c.block_m in (1, 2) and c.block_w % 4 == 0
    else:
        assert isinstance(c, DequantConfig)


@pytest.mark.parametrize("device", sorted(DEVICES))
def test_every_token_count_of_every_layer_gets_a_kernel_that_can_run_it(device):
    dev = DEVICES[device]
    kernels = P.kernels()
    for (n, k, slots), g, r, dtype in [(v, g, r, d) for v in LAYERS.values() for g in (32, 64, 128)
                                       for r in (0, 64) for d in (torch.bfloat16, torch.float16)]:
        if k % g:
            continue
        shape = LayerShape(n, k, g, r, slots, dtype)
        for m in MS:
            p = plan(shape, m, dev)
            ok, why = kernels[p.kernel].can_implement(shape, dev)
            assert ok, (p, why)
            _fits(p, shape)
            if p.kernel == "wgmma_rs":
                assert 16 < m <= 256 and dev.capability == (9, 0)
            assert (p.lowrank is None) == (r == 0 or p.kernel == "dequant_cublas")


def test_the_gluon_kernels_are_planned_only_where_they_can_run():
    shape = LayerShape(28672, 4096, 128, 64, (14336,))
    used = {d: {plan(shape, m, dev).kernel for m in MS} for d, dev in DEVICES.items()}
    assert {"gemv", "mma_decode", "wgmma_rs", "dequant_cublas"} <= used["h100"]
    assert "wgmma_rs" not in used["sm90-new-triton"] and "mma_decode" in used["sm90-new-triton"]
    assert used["cpu-interpreter"] <= {"gemv", "tile", "dequant_cublas"}
    assert plan(LayerShape(28672, 4096, 32, 64), 8, H100).kernel != "mma_decode"  # G 32: whole chunks only


def test_above_the_large_m_threshold_the_plan_dequantizes_and_folds_by_the_rule():
    tables = tables_for(H100.name, H100.capability)
    for (n, k, slots) in LAYERS.values():
        for r in (0, 32, 64, 128):
            shape = LayerShape(n, k, 64, r, slots)
            thr = P.large_m_threshold(shape, H100, tables)
            assert thr >= 256  # wgmma_rs runs up to its last token count where it can
            assert plan(shape, thr, H100).kernel != "dequant_cublas"
            for m in (thr + 1, 4 * thr, 65536):
                p = plan(shape, m, H100)
                assert p.kernel == "dequant_cublas" and p.config.fold == (r == 0 or fold_lowrank(m, n, r))
    assert plan(LayerShape(4096, 4096, 128, 64), 1, H100, large_m=0).kernel == "dequant_cublas"
    assert plan(LayerShape(4096, 4096, 128, 64), 9000, H100, fused_only=True).kernel != "dequant_cublas"


def test_the_low_rank_launch_follows_the_kernel():
    """t in one reduced slice for the tensor-core kernels from 17 tokens and for mma_decode (one
    finishing program per column tile); 8 K-slices for gemv with PDL; PDL only on sm_90 and off
    where the table measured it slower."""
    shape = LayerShape(4096, 4096, 128, 64)
    for m in MS:
        p = plan(shape, m, H100)
        if p.lowrank is None:
            continue
        assert p.lowrank.reduce == (p.kernel == "mma_decode" or (p.kernel in ("tile", "wgmma_rs") and m > 16))
        assert p.lowrank.splits == (8 if p.kernel == "gemv" and p.pdl_trigger else None)
    assert all(plan(shape, m, DEVICES["cpu-interpreter"]).pdl_trigger == 0 for m in MS)
    tables = tables_for(H100.name, H100.capability)
    # gemv's K-slices are the table's (by K): another table, another launch
    rows = dataclasses.replace(tables, gemv_t=[P.TSplits(8192, 32, 16), P.TSplits(None, 16, None)])
    assert [dataclasses.astuple(plan(LayerShape(4096, k, 128, 64), 1, H100, rows).lowrank)
            for k in (4096, 14336)] == [(32, False, 16, False), (16, False, None, False)]
    off = tables.pdl_off[0]
    gate_up = LayerShape(28672, 4096, 128, 64)
    assert off["min_m"] <= 4 <= off["max_m"] and plan(gate_up, 4, H100).pdl_trigger == 0
    assert plan(gate_up, 1, H100).pdl_trigger == 1


def test_a_table_row_in_kernel_has_gemv_make_t_itself_without_pdl_up_to_its_token_and_row_limits():
    from csrc_triton.kernels.base import T_ROWS
    from csrc_triton.kernels.gemv import T_TOKENS

    tables = dataclasses.replace(tables_for(H100.name, H100.capability), gemv_t=[P.TSplits(None, 16, None, True)])
    for shape in (LayerShape(4096, 4096, 128, 64), LayerShape(6144, 4096, 128, 64, (4096, 5120))):
        for m in MS:
            p = plan(shape, m, H100, tables)
            if p.kernel != "gemv":
                assert p.lowrank is None or not p.lowrank.in_kernel
                continue
            assert m <= T_TOKENS and p.lowrank.in_kernel and p.pdl_trigger == 0
            assert (p.lowrank.splits, p.lowrank.block_r, p.lowrank.reduce) == (16, 64, False)
    wide = LayerShape(6144, 4096, 128, T_ROWS // 2, (4096, 5120))  # three slots of D: more rows than the scratch
    assert plan(wide, 1, H100, tables).kernel == "gemv" and not plan(wide, 1, H100, tables).lowrank.in_kernel
    assert plan(LayerShape(4096, 4096, 128, 64), 1, H100, tables).lowrank.in_kernel
    assert not plan(LayerShape(4096, 4096, 128, 64), 1, H100).lowrank.in_kernel  # the committed table: PDL


def test_a_table_row_in_kernel_has_mma_decode_make_t_itself_up_to_16_tokens(monkeypatch):
    from csrc_triton.kernels.mma_decode import T_TOKENS

    monkeypatch.setenv("TWINQUANT_DISABLED_KERNELS", "wgmma_rs")  # mma_decode then runs 17+ tokens too

    tables = dataclasses.replace(tables_for(H100.name, H100.capability), mma_t=[P.TSplits(None, 8, 32, True)])
    seen = set()
    for shape in (LayerShape(4096, 14336, 128, 64), LayerShape(6144, 4096, 128, 64, (4096, 5120))):
        for m in MS:
            p = plan(shape, m, H100, tables)
            if p.kernel != "mma_decode":
                continue
            seen.add(m <= T_TOKENS)
            assert p.lowrank.in_kernel == (m <= T_TOKENS)
            if m <= T_TOKENS:
                assert (p.lowrank.splits, p.lowrank.block_r, p.lowrank.reduce, p.pdl_trigger) == (8, 32, False, 0)
            assert not plan(shape, m, H100).lowrank.in_kernel  # the committed table: lowrank_down
    assert seen == {True, False}
    assert T_TOKENS == 16


def test_disabled_kernels_leave_the_plan(monkeypatch):
    shape = LayerShape(28672, 4096, 128, 64)
    monkeypatch.setenv("TWINQUANT_DISABLED_KERNELS", "wgmma_rs, mma_decode,pdl")
    kinds = {plan(shape, m, H100).kernel for m in MS}
    assert kinds == {"gemv", "tile", "dequant_cublas"}
    assert all(plan(shape, m, H100).pdl_trigger == 0 for m in MS)
    monkeypatch.setenv("TWINQUANT_DISABLED_KERNELS", "tile,gemv")
    with pytest.raises(P.NoKernel, match="tile: disabled by TWINQUANT_DISABLED_KERNELS"):
        plan(shape, 300, DEVICES["cpu-interpreter"], fused_only=True)
    monkeypatch.setenv("TWINQUANT_DISABLED_KERNELS", "wgmma")
    with pytest.raises(ValueError, match=r"TWINQUANT_DISABLED_KERNELS names \['wgmma'\]"):
        plan(shape, 64, H100)


def test_every_table_is_data_the_plan_reads(tmp_path):
    """Each shipped table loads into the kernels' config dataclasses; a field no config has is an
    error naming it, not a silently ignored launch parameter."""
    folder = os.path.join(os.path.dirname(P.__file__), "configs")
    names = [f for f in os.listdir(folder) if f.endswith(".json")]
    assert {"NVIDIA_H100_80GB_HBM3.json", "NVIDIA_H200.json"} <= set(names)
    for fn in names:
        t = P.load_tables(os.path.join(folder, fn))
        assert t.device.replace(" ", "_") + ".json" == fn
        assert t.tile.rules[-1].max_m is None and t.large_m[-1][0] is None  # every M, every layer covered
    bad = json.load(open(os.path.join(folder, names[0])))
    bad["gemv"][0]["config"]["block_x"] = 3
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"GemvConfig has no fields \['block_x'\]"):
        P.load_tables(str(path))


def test_a_device_without_a_table_uses_the_nearest_and_says_so(caplog):
    a100 = Device.named("NVIDIA A100-SXM4-80GB", (8, 0))
    gh = Device.named("NVIDIA GH200 480GB", (9, 0))
    with caplog.at_level(logging.WARNING, logger="vllm.twinquant"):
        t1 = tables_for(a100.name, a100.capability)
        t2 = tables_for(gh.name, gh.capability)
    assert t1.device == "NVIDIA H100 80GB HBM3"  # no sm_80 table: the H100's
    assert t2.device in ("NVIDIA H100 80GB HBM3", "NVIDIA H200")  # same compute capability
    assert "no launch table for NVIDIA A100-SXM4-80GB" in caplog.text and "NVIDIA GH200 480GB" in caplog.text
    shape = LayerShape(28672, 4096, 128, 64)
    assert all(plan(shape, m, a100).kernel != "wgmma_rs" for m in MS)  # sm_80: no wgmma


def test_the_plan_reads_in_one_line_and_in_ranges(capsys):
    shape = LayerShape(6144, 4096, 128, 64, (4096, 5120))
    line = summary("qkv_proj", shape, H100)
    assert line == ("twinquant: qkv_proj 4096->6144 r64 g128: gemv <=1, mma_decode <=16, wgmma_rs <=256, "
                    "dequant_cublas >256")
    rs = ranges(shape, H100, with_config=True)
    assert rs[0][0] == 1 and rs[-1][1] == 65536
    assert all(a[1] + 1 == b[0] for a, b in zip(rs, rs[1:]))  # contiguous, no M left out
    fold_at = next(lo for lo, _, label in rs if "fold=True" in label)
    assert fold_at == 6144 * 64 // 256 + 1  # the fold rule's exact boundary, found between the samples
    for lo, _, label in rs:  # each range says how t is made, as its plan does
        p = plan(shape, lo, H100)
        assert ("t by lowrank_down" in label) == (p.lowrank is not None)
        assert ("with PDL" in label) == (p.lowrank is not None and p.pdl_trigger > 0)
    tin = dataclasses.replace(tables_for(H100.name, H100.capability), gemv_t=[P.TSplits(None, 32, 16, True)])
    assert "t made in the launch (32 K-slices x 16 rows of D)" in ranges(shape, H100, tin, with_config=True)[0][2]
    from vllm_twinquant.explain import main

    main(["--k", "4096", "--n", "28672", "--slots", "14336", "--rank", "64", "--device", "h200"])
    out = capsys.readouterr().out
    assert "NVIDIA H200" in out and "M = 17-256" in out and "wgmma_rs" in out
    assert "dequant_cublas (transient weights 224 MiB)" in out
    main(["--k", "4096", "--n", "128256", "--device", "h100"])  # a 128k-vocabulary lm_head
    assert "(transient weights 1,002 MiB, made in 4 row ranges)" in capsys.readouterr().out
    main(["--k", "4096", "--n", "28672", "--slots", "14336", "--rank", "64", "--activations", "int4", "--subspace",
          "128"])
    out = capsys.readouterr().out
    assert "3968 -> 28672, rank 0" in out and "first 3968 input columns" in out and "width 256" in out


def test_a_tuned_table_makes_the_plan_pick_the_fastest_measured_config(tmp_path):
    """benchmarks/kernels/tune.py: from a sweep (here synthetic timings), the table it writes makes
    the plan choose, at every swept (M, shape class), the (kernel, config) measured fastest."""
    import random
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                                    "kernels"))
    import tune

    rng = random.Random(0)
    ms = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    recs = []
    for (cls, _, _, (n, k)), m in [(c, m) for c in tune.CLASSES for m in ms]:
        for kernel in tune.PRIORITY:
            for cfg in tune.candidates(kernel, m):
                recs.append({"class": cls, "N": n, "K": k, "M": m, "kernel": kernel, "config": vars(cfg),
                             "ms": rng.uniform(0.01, 0.1)})
    sweep = {"device": "NVIDIA TEST 1", "capability": [9, 0], "ms": ms, "rank": 64, "command": "synthetic",
             "records": recs}
    base = json.load(open(os.path.join(os.path.dirname(P.__file__), "configs", "NVIDIA_H100_80GB_HBM3.json")))
    path = tmp_path / "NVIDIA_TEST_1.json"
    path.write_text(json.dumps(tune.build_table(sweep, base)))
    tables = P.load_tables(str(path))
    dev = Device.named("NVIDIA TEST 1")
    for (cls, _, _, (n, k)), m in [(c, m) for c in tune.CLASSES for m in ms]:
        win = min((r for r in recs if r["class"] == cls and r["M"] == m), key=lambda r: r["ms"])
        p = plan(LayerShape(n, k, 128, 64), m, dev, tables)
        assert (p.kernel, vars(p.config) if p.kernel != "tile" else None) == \
            (win["kernel"], win["config"] if win["kernel"] != "tile" else None), (cls, m, p, win)


def test_a_w4a4_sweep_checks_the_int8_candidates_and_writes_no_rows():
    """tune.py sweep-w4a8 --act-quant int4 is the GPU check of W4A4's codes on the kernels int8 rows name."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                                    "kernels"))
    import tune

    for m in (1, 16, 64, 128, 4096):
        assert tune.w4a8_candidates(m, "int4") == tune.w4a8_candidates(m, "int8")
    from offline_quantizer.recipe import Activations, load_recipe

    assert tune.INT4_CLIP == load_recipe("twinquant-w4a4-resq").get(Activations).clip  # the codes the preset makes
    with pytest.raises(ValueError, match="int4 activation codes is a check"):
        tune.build_w4a8_rows({"act_quant": "int4", "ms": [1], "records": []})


def test_a_w4a8_layer_keeps_the_w4a16_kernels_only_for_the_small_token_counts_before_w4a8_first_wins():
    """Rows are null (W4A16 on x unquantized) at the swept token counts before the first where a W4A8 kernel beat
    the W4A16 plan, never past W4A16_KEPT_MAX_M and never again after that first win, for every W4A8 row."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                                    "kernels"))
    import tune

    cap = tune.W4A16_KEPT_MAX_M
    ms = [1, 16, 64, cap, 2 * cap, 8 * cap]
    ws = {"tokens": 128, "stages": 6, "band": 16, "persistent": False, "warpgroups": 2, "convert": "cvt"}
    first_win = {"qkv": 64, "o": 8 * cap, "gate_up": 2 * cap, "down": 1}  # where W4A8 first beats W4A16
    recs = []
    for cls, _, _, _ in tune.CLASSES:
        for m in ms:
            w8 = 0.01 if m >= first_win[cls] else 0.03  # W4A16 faster before the first win only ...
            w16 = 0.02 if not (cls == "qkv" and m == 2 * cap) else 0.005  # ... and for qkv once after it
            recs += [{"class": cls, "M": m, "kernel": "w4a16_plan", "config": None, "ms": w16},
                     {"class": cls, "M": m, "kernel": "w4a8_ws", "config": ws, "ms": w8}]
    rows = tune.build_w4a8_rows({"act_quant": "int8", "ms": ms, "records": recs})
    for i, (cls, _, _, _) in enumerate(tune.CLASSES):
        named = [rows["w4a8_ws_int8"][j * len(tune.CLASSES) + i]["config"] is not None for j in range(len(ms))]
        want = [m >= first_win[cls] or m > cap for m in ms]
        assert named == want, (cls, named)
        assert all(rows["w4a8_int8"][j * len(tune.CLASSES) + i]["config"] is None for j in range(len(ms)))


def test_a_w4a8_sweep_gives_each_integer_kernel_rows_where_it_was_the_fastest_and_the_plan_follows(tmp_path):
    """table-w4a8 on an INT8 sweep: w4a8_ws_int8 and w4a8_rs_int8 name their kernel's config exactly where it was
    the fastest W4A8 candidate, and the plan of a table with those rows runs that kernel there; a sweep that did
    not time a kernel leaves it no rows."""
    import json
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                                    "kernels"))
    import tune

    from csrc_triton import dispatch as P

    ws, rs = {"tokens": 128, "stages": 6, "band": 16, "persistent": True, "warpgroups": 2, "convert": "cvt"}, \
        {"tokens": 64, "warps": 8, "stages": 4, "overlap": True, "convert": "cvt"}
    triton_cfg = {"block_m": 64, "block_n": 128, "warps": 4, "stages": 4, "split_k": 1, "block_k": 128,
                  "dense": False, "convert": "cvt"}
    ms, recs = [16, 128, 4096], []
    for cls, _, _, _ in tune.CLASSES:
        for m in ms:
            fast = "w4a8_ws" if (m == 4096 or cls == "gate_up") and m > 16 else "w4a8_rs" if m > 16 else "w4a8"
            recs.append({"class": cls, "M": m, "kernel": "w4a16_plan", "config": None, "ms": 0.05})
            for kernel, cfg in (("w4a8", triton_cfg), ("w4a8_rs", rs), ("w4a8_ws", ws)):
                recs.append({"class": cls, "M": m, "kernel": kernel, "config": cfg, "ms": 0.01 if kernel == fast
                             else 0.02})
    rows = tune.build_w4a8_rows({"act_quant": "int8", "ms": ms, "records": recs})
    assert {"w4a8_int8", "w4a8_ws_int8", "w4a8_rs_int8"} <= set(rows)
    with open(P.table_file("NVIDIA H100 80GB HBM3")) as f:
        table = json.load(f)
    table.update(rows)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    tables = P.load_tables(str(path))
    h100 = Device.named("NVIDIA H100 80GB HBM3")
    for cls, _, _, (n, k) in tune.CLASSES:
        for m in ms:
            p = plan(LayerShape(n, k, 128, 64, act_quant="int8"), m, h100, tables)
            want = "w4a8_ws" if (m == 4096 or cls == "gate_up") and m > 16 else "w4a8_rs" if m > 16 else "w4a8"
            assert p.kernel == want, (cls, m, p)
    # a later sweep that left w4a8_ws out (disabled after it failed) empties its rows: none outlive that sweep
    rows = tune.build_w4a8_rows({"act_quant": "int8", "ms": ms, "records": [r for r in recs
                                                                            if r["kernel"] != "w4a8_ws"]})
    assert rows["w4a8_ws_int8"] == []
    table.update(rows)
    path.write_text(json.dumps(table))
    tables = P.load_tables(str(path))
    for _, _, _, (n, k) in tune.CLASSES:
        for m in ms:
            assert plan(LayerShape(n, k, 128, 64, act_quant="int8"), m, h100, tables).kernel != "w4a8_ws"
