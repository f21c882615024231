"""Tensor-parallel loading of the TwinQuant parameters, at unit level (tp_size 2, both ranks).

Column-parallel (merged q/k/v): each rank's output rows must equal the matching rows of the
full layer. Row-parallel: the sum of the ranks' partial outputs must equal the full layer
(the all-reduce's job)."""

import pytest
import torch
import vllm.model_executor.parameter as vparam

from vllm_twinquant import format as fmt
from vllm_twinquant.kernels import TorchTwinQuantKernel
from vllm_twinquant.linear_method import TwinQuantLinearMethod

K, G, TP = 256, 32, 2


def _full(n, r, seed, lowrank_dtype):
    g = torch.Generator().manual_seed(seed)
    up, down = torch.randn(n, r, generator=g) * 0.1, torch.randn(r, K, generator=g) * 0.1
    spec = fmt.TwinQuantSpec(group_size=G, rank=r, lowrank_dtype=lowrank_dtype)
    up, down = fmt.round_lowrank(up, down, spec.lowrank_torch_dtype)
    return {
        "weight_packed": fmt.pack_codes(torch.randint(-8, 8, (n, K), dtype=torch.int8, generator=g)),
        "weight_scale": (torch.rand(n, K // G, generator=g) * 0.02).half(),
        **{k.rsplit(".", 1)[1]: v for k, v in fmt.lowrank_tensors("p", up, down, spec).items()},
    }


def _factors(t):
    return (fmt.dequantize_lowrank(t["lowrank_down"], t.get("lowrank_down_scale")),
            fmt.dequantize_lowrank(t["lowrank_up"], t.get("lowrank_up_scale")))


def _full_out(x, t):
    return fmt.reference_linear(x, t["weight_packed"], t["weight_scale"], G, *_factors(t))


@pytest.fixture(params=["bfloat16", "int8"])
def lowrank_dtype(request):
    """Every loader test runs with bf16 factors and with int8 factors (+ their row scales)."""
    return request.param


def _make_layer(monkeypatch, rank, in_part, out_parts, ranks, lowrank_dtype="bfloat16"):
    monkeypatch.setattr(vparam, "get_tensor_model_parallel_rank", lambda: rank)
    monkeypatch.setattr(vparam, "get_tensor_model_parallel_world_size", lambda: TP)
    layer = torch.nn.Module()
    spec = fmt.TwinQuantSpec(group_size=G, rank=max(ranks), lowrank_dtype=lowrank_dtype)
    method = TwinQuantLinearMethod(spec, "test.layer", ranks)
    method.create_weights(layer, in_part, out_parts, in_part * TP, sum(out_parts) * TP, torch.float32,
                          weight_loader=lambda *a, **k: None)
    return layer, method


def _run(layer, x):
    c = layer.twinquant_config
    kernel = TorchTwinQuantKernel(c)
    names = ("weight_packed", "weight_scale", "lowrank_down", "lowrank_up")
    names += ("lowrank_down_scale", "lowrank_up_scale") if c.int8_lowrank else ()
    p = {
        n: getattr(layer, n).data.double() if n.startswith("lowrank") and not c.int8_lowrank else getattr(layer, n).data
        for n in names
    }
    holder = torch.nn.Module()
    for n, v in p.items():
        setattr(holder, n, v)
    return kernel.apply(holder, x.double(), None)


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_merged_qkv_column_parallel(monkeypatch, tp_rank, lowrank_dtype):
    sizes = {"q": 128, "k": 64, "v": 64}  # full output sizes; kv heads split too
    ranks = {"q": 8, "k": 4, "v": 8}  # k's factors are padded to the slot width 8
    full = {s: _full(n, ranks[s], i, lowrank_dtype) for i, (s, n) in enumerate(sizes.items())}
    parts = [n // TP for n in sizes.values()]
    layer, _ = _make_layer(monkeypatch, tp_rank, K, parts, list(ranks.values()), lowrank_dtype)
    offset = 0
    for s, n in sizes.items():
        for name, t in full[s].items():
            getattr(layer, name).load_qkv_weight(
                loaded_weight=t, shard_id=s, shard_offset=offset, shard_size=n // TP, num_heads=1
            )
        offset += n // TP
    x = torch.randn(3, K)
    y = _run(layer, x)
    expect = torch.cat([_full_out(x, full[s])[:, tp_rank * (n // TP) : (tp_rank + 1) * (n // TP)]
                        for s, n in sizes.items()], dim=1)
    torch.testing.assert_close(y, expect, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_merged_gate_up_column_parallel(monkeypatch, tp_rank, lowrank_dtype):
    full = [_full(96, 8, 10, lowrank_dtype), _full(96, 8, 11, lowrank_dtype)]
    layer, _ = _make_layer(monkeypatch, tp_rank, K, [48, 48], [8, 8], lowrank_dtype)
    for i, t in enumerate(full):
        for name, v in t.items():
            getattr(layer, name).load_merged_column_weight(
                loaded_weight=v, shard_id=i, shard_offset=48 * i, shard_size=48
            )
    x = torch.randn(2, K)
    y = _run(layer, x)
    expect = torch.cat([_full_out(x, t)[:, tp_rank * 48 : (tp_rank + 1) * 48] for t in full], dim=1)
    torch.testing.assert_close(y, expect, rtol=1e-6, atol=1e-6)


def test_row_parallel_partials_sum_to_full(monkeypatch, lowrank_dtype):
    full = _full(64, 8, 3, lowrank_dtype)
    x = torch.randn(4, K)
    total = 0
    for tp_rank in range(TP):
        layer, _ = _make_layer(monkeypatch, tp_rank, K // TP, [64], [8], lowrank_dtype)
        for name, v in full.items():
            getattr(layer, name).load_row_parallel_weight(v)
        total = total + _run(layer, x[:, tp_rank * K // TP : (tp_rank + 1) * K // TP])
    torch.testing.assert_close(total, _full_out(x, full), rtol=1e-6, atol=1e-6)


def test_group_must_divide_rank_input(monkeypatch):
    with pytest.raises(ValueError, match="group_size 32 does not divide this rank's 48 input columns"):
        _make_layer(monkeypatch, 0, 48, [64], [8])


def test_checkpoint_rank_larger_than_config_is_an_error(monkeypatch):
    layer, _ = _make_layer(monkeypatch, 0, K, [64], [4])
    with pytest.raises(ValueError, match="checkpoint rank 8 exceeds the rank 4"):
        layer.lowrank_up.load_row_parallel_weight(torch.zeros(64, 8))


def _lm_head(monkeypatch, tp_rank, vocab, lowrank_dtype, rank=8):
    import vllm.model_executor.layers.vocab_parallel_embedding as vpe

    from vllm_twinquant.config import TwinQuantConfig

    for mod in (vpe, vparam):
        monkeypatch.setattr(mod, "get_tensor_model_parallel_rank", lambda: tp_rank)
        monkeypatch.setattr(mod, "get_tensor_model_parallel_world_size", lambda: TP)
    spec = fmt.TwinQuantSpec(group_size=G, rank=rank, lowrank_dtype=lowrank_dtype, modules_to_not_convert=[])
    return vpe.ParallelLMHead(vocab, K, quant_config=TwinQuantConfig(spec), prefix="lm_head",
                              params_dtype=torch.float32)


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_a_quantized_lm_head_takes_its_rows_of_the_vocabulary_and_zeroes_the_padding(monkeypatch, tp_rank,
                                                                                    lowrank_dtype):
    vocab = 200  # padded to 256: rank 0 holds rows 0-127, rank 1 rows 128-199 and 56 padding rows
    head = _lm_head(monkeypatch, tp_rank, vocab, lowrank_dtype)
    assert isinstance(head.quant_method, TwinQuantLinearMethod)
    full = _full(vocab, 8, 5, lowrank_dtype)
    for name, v in full.items():
        p = getattr(head, name)
        p.data.fill_(3)  # poisoned: every row the loader does not write must come out zero
        p.weight_loader(p, v)
    x = torch.randn(3, K)
    y = _run(head, x)
    first, real = tp_rank * 128, min(128, vocab - tp_rank * 128)
    torch.testing.assert_close(y[:, :real], _full_out(x, full)[:, first : first + real], rtol=1e-6, atol=1e-6)
    assert y.shape == (3, 128) and bool((y[:, real:] == 0).all())


def test_a_quantized_lm_head_refuses_a_tensor_of_another_vocabulary_or_rank_by_name(monkeypatch):
    head = _lm_head(monkeypatch, 0, 200, "bfloat16")
    full = _full(192, 8, 6, "bfloat16")
    with pytest.raises(ValueError, match=r"lm_head\.weight_packed: checkpoint tensor has 192 rows, expected one per "
                                         r"vocabulary entry \(200\)"):
        head.weight_packed.weight_loader(head.weight_packed, full["weight_packed"])
    with pytest.raises(ValueError, match=r"lm_head\.lowrank_down: checkpoint tensor has 16 rows, expected at most 8"):
        head.lowrank_down.weight_loader(head.lowrank_down, torch.zeros(16, K))
    with pytest.raises(ValueError, match=r"the checkpoint quantizes lm_head, but its config.json ties"):
        head.tie_weights(torch.nn.Module())
