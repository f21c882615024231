"""Every environment switch of vllm-twinquant, read in one place (vLLM's envs.py in spirit).

Each variable, its default and its effect:

- `TWINQUANT_DISABLED_KERNELS` (none): comma-separated kernel names the selection skips: the layer kernels
  of the plugin (`triton`, `cpu_int4pack`, `cpu_wna16`, `torch`), the CUDA kernels of the launch plan
  (`wgmma_rs`, `mma_decode`, `gemv`, `tile`, `dequant_cublas`), and `pdl` (programmatic dependent launch
  between the low-rank down projection and the residual kernel). `python -m vllm_twinquant.explain` shows
  the result.
- `TWINQUANT_CONFIG_DIR` (`csrc_triton/configs`): folder of the per-device launch tables (`<device name>.json`).
- `TWINQUANT_GLUON_ANY_TRITON` (`0`): `1` lets the plan pick the Hopper Gluon kernel (`wgmma_rs`) with a
  Triton version it was not measured with.
- `TRITON_INTERPRET` (`0`): Triton's own; `1` runs the Triton kernels in its CPU interpreter (tests), and the
  kernels then take their plain-Triton code paths instead of inline PTX, with no Gluon or PDL.

Functions, not constants, so that tests (and a process that changes its environment) see the
current value. The plugin's switches are also part of the key of vLLM's torch.compile cache
(`register_compile_factors`): a layer's kernel decides what the compiled graph calls, so a graph compiled
under other switches is never reused.
"""

from __future__ import annotations

import os

LAYER_KERNELS = ("triton", "cpu_int4pack", "cpu_wna16", "torch")
CUDA_KERNELS = ("wgmma_rs", "mma_decode", "gemv", "tile", "dequant_cublas", "w4a8", "w4a8_rs", "w4a8_ws", "fp8_cublas")
FEATURES = ("pdl",)


SWITCHES = ("TWINQUANT_DISABLED_KERNELS", "TWINQUANT_CONFIG_DIR", "TWINQUANT_GLUON_ANY_TRITON")


def register_compile_factors(environment_variables: dict) -> None:
    """Adds the plugin's switches to vLLM's `vllm.envs.environment_variables`, whose values vLLM hashes into
    the key of its torch.compile cache (`vllm.envs.compile_factors`)."""
    for name in SWITCHES:
        environment_variables.setdefault(name, lambda name=name: os.environ.get(name))


def disabled_kernels() -> frozenset[str]:
    """The names in TWINQUANT_DISABLED_KERNELS; an unknown name is an error (a typo would
    otherwise silently disable nothing)."""
    raw = os.environ.get("TWINQUANT_DISABLED_KERNELS", "")
    names = frozenset(n.strip() for n in raw.split(",") if n.strip())
    unknown = sorted(names - set(LAYER_KERNELS + CUDA_KERNELS + FEATURES))
    if unknown:
        raise ValueError(f"TWINQUANT_DISABLED_KERNELS names {unknown}; known: "
                         f"{list(LAYER_KERNELS + CUDA_KERNELS + FEATURES)}")
    return names


def disabled(name: str) -> bool:
    return name in disabled_kernels()


def config_dir() -> str:
    default = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc_triton", "configs")
    return os.environ.get("TWINQUANT_CONFIG_DIR", default)


def gluon_any_triton() -> bool:
    return os.environ.get("TWINQUANT_GLUON_ANY_TRITON") == "1"


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
