"""Compile one kernel of csrc_triton for sm_90 without a GPU, in a fresh process.

Used by the tests (PTX and register checks of the Gluon kernels, which have no CPU interpreter)
and by benchmarks/kernels/registers_sm90.py. The test suite runs Triton's CPU interpreter
(TRITON_INTERPRET=1), which patches triton.language while kernels run; compiling for a real
target in that process works only while Triton's cache already holds the result (an empty cache,
as on a fresh CI machine, then fails inside the interpreter's builder). So `compile_sm90(...)`
runs this file as a script with the interpreter switched off and returns the PTX.

    python csrc_triton/compile.py SPEC_JSON OUT_DIR   (what compile_sm90 runs)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compile_sm90(module: str, kernel: str, ptrs: dict[str, str], consts: dict, num_warps: int,
                 gluon: bool = False, aligned_extra: tuple[str, ...] = (), want_resources: bool = False,
                 want_sass: bool = False, maxnreg: int | None = None):
    """PTX of `module.kernel` compiled for sm_90. ptrs: pointer parameter -> Triton type
    ("*bf16"); consts: constexpr parameters; every other parameter is an i32. Pointers,
    strides and `aligned_extra` are declared 16-divisible, as the launches make them; a TMA
    descriptor parameter takes its mangled type (`tensordesc<...>`, `descriptor_type`) in ptrs.
    maxnreg: the registers per thread a launch asks for (warp-specialized kernels).
    want_resources: return (ptx, {"REG": .., "STACK": .., "LOCAL": .., ...}) read from the
    cubin by the cuobjdump that ships with Triton, and "SMEM": the shared memory a launch asks for).
    want_sass: also "SASS", cuobjdump's disassembly of the cubin."""
    spec = dict(module=module, kernel=kernel, ptrs=ptrs, consts=consts, num_warps=num_warps, gluon=gluon,
                aligned_extra=list(aligned_extra), sass=want_sass, maxnreg=maxnreg)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), json.dumps(spec), out], env=env,
                              capture_output=True, text=True, timeout=600)
        if proc.returncode:
            raise RuntimeError(f"compiling {module}.{kernel} for sm_90 failed:\n{proc.stderr[-4000:]}")
        with open(os.path.join(out, "kernel.ptx")) as f:
            ptx = f.read()
        if want_resources or want_sass:
            with open(os.path.join(out, "kernel.res")) as f:
                res = json.load(f)
            if want_sass:
                with open(os.path.join(out, "kernel.sass")) as f:
                    res["SASS"] = f.read()
            return ptx, res
        return ptx


def descriptor_type(dtype: torch.dtype, block: list[int], layout) -> str:
    """The signature type of a TMA descriptor argument (block shape, shared layout), as a launch mangles it."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    base = torch.zeros([b * 2 for b in block], dtype=dtype)
    return mangle_type(TensorDescriptor.from_tensor(base, block, layout))


def _main(spec_json: str, out: str) -> None:
    import importlib
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget

    spec = json.loads(spec_json)
    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    params = list(inspect.signature(fn.fn).parameters)
    consts = spec["consts"]
    if "num_warps" in params:  # Gluon kernels take it as a constexpr parameter
        consts.setdefault("num_warps", spec["num_warps"])
    unknown = set(consts) - set(params)
    if unknown:
        raise SystemExit(f"{spec['kernel']} has no parameters {sorted(unknown)}")
    signature = {p: "constexpr" if p in consts else spec["ptrs"].get(p, "i32") for p in params}
    aligned = [p for p in params if p.endswith("_ptr") or p.startswith("stride") or p in spec["aligned_extra"]]
    kw = dict(constexprs={(params.index(p),): v for p, v in consts.items()},
              attrs={(params.index(p),): [["tt.divisibility", 16]] for p in aligned})
    if spec["gluon"]:
        from triton.experimental.gluon._runtime import GluonASTSource

        src = GluonASTSource(fn, signature, **kw)
    else:
        from triton.compiler import ASTSource

        src = ASTSource(fn, signature, **kw)
    options = {"num_warps": spec["num_warps"]}
    if spec.get("maxnreg"):
        options["maxnreg"] = spec["maxnreg"]
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 128), options=options)
    with open(os.path.join(out, "kernel.ptx"), "w") as f:
        f.write(compiled.asm["ptx"])
    cubin = os.path.join(out, "kernel.cubin")
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(tool):
        text = subprocess.run([tool, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
        line = next(ln for ln in text.splitlines() if "REG:" in ln)
        res = {
            k: int(v)
            for k, v in (item.split(":") for item in line.split() if ":" in item and item.split(":")[1].isdigit())
        }
        res["SMEM"] = int(compiled.metadata.shared)  # bytes of shared memory a launch asks for (dynamic included)
        with open(os.path.join(out, "kernel.res"), "w") as f:
            json.dump(res, f)
        if spec["sass"]:
            sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True).stdout
            with open(os.path.join(out, "kernel.sass"), "w") as f:
                f.write(sass)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
