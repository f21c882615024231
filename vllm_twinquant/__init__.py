"""vllm-twinquant: TwinQuant (low-rank + 4-bit residual) checkpoints in vLLM.

`register()` is the `vllm.general_plugins` entry point: vLLM calls it in every process
before it parses engine arguments, so `--quantization twinquant` and auto-detection
of TwinQuant checkpoints both work without touching vLLM's files.
"""

__version__ = "0.1.0"


def register() -> None:
    # importing the module registers TwinQuantConfig under the name "twinquant"
    import vllm_twinquant.config  # noqa: F401
