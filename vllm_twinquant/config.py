"""The `twinquant` QuantizationConfig: reads and validates a checkpoint's
quantization_config and hands each linear layer its method."""

from __future__ import annotations

import os
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

from vllm_twinquant import format as fmt
from vllm_twinquant.linear_method import TwinQuantLinearMethod

logger = init_logger("vllm.twinquant")


@register_quantization_config(fmt.QUANT_METHOD)
class TwinQuantConfig(QuantizationConfig):
    def __init__(self, spec: fmt.TwinQuantSpec | None = None) -> None:
        super().__init__()
        if spec is None:
            # vLLM builds the config without arguments when the checkpoint has none
            raise ValueError(
                "--quantization twinquant needs a TwinQuant checkpoint: the model's config.json has no "
                "quantization_config with quant_method 'twinquant' (make one with `twinquant-quantize`)"
            )
        self.spec = spec

    def __repr__(self) -> str:
        return f"TwinQuantConfig({self.spec.to_dict()})"

    @classmethod
    def get_name(cls) -> str:
        return fmt.QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the config lives in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TwinQuantConfig:
        return cls(fmt.TwinQuantSpec.from_dict(config))

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        # A local checkpoint is checked file by file before any weight is read, so a bad one
        # fails with the file and tensor named instead of deep inside the model loader. vLLM
        # wraps the exception in its config validation's traceback, so the reason is also
        # logged on one line of its own, ahead of it.
        if os.path.isdir(model_name):
            try:
                fmt.validate_checkpoint(model_name, check_values=False)
            except fmt.TwinQuantFormatError as e:
                logger.error("twinquant: cannot serve %s: %s", model_name, e)
                raise

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        if self.spec.rank_overrides and hasattr(hf_to_vllm_mapper, "apply_dict"):
            self.spec.rank_overrides = hf_to_vllm_mapper.apply_dict(self.spec.rank_overrides)
        if self.spec.modules_to_not_convert and hasattr(hf_to_vllm_mapper, "apply_list"):
            self.spec.modules_to_not_convert = hf_to_vllm_mapper.apply_list(self.spec.modules_to_not_convert)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if type(layer).__name__ == "FusedMoE":
            raise ValueError(f"{prefix}: a mixture-of-experts layer; TwinQuant checkpoints quantize dense linear "
                             "layers only (twinquant-quantize refuses MoE models)")
        if isinstance(layer, ParallelLMHead):  # quantized when the checkpoint leaves it out of modules_to_not_convert
            if self.spec.is_skipped(prefix):
                return None
            return TwinQuantLinearMethod(self.spec, prefix, [self.spec.rank_for(prefix)])
        if not isinstance(layer, LinearBase):
            return None  # the embeddings stay unquantized
        if self.spec.is_skipped(prefix):
            return UnquantizedLinearMethod()
        subspace = self._sublayer_values(prefix, self.spec.subspace_channels_for)
        if len(set(subspace)) > 1:
            raise ValueError(f"{prefix}: its sub-layers have activation subspaces of {subspace} channels; "
                             "layers that vLLM fuses share one input and need the same (activation_subspace_modules)")
        return TwinQuantLinearMethod(self.spec, prefix, self._sublayer_values(prefix, self.spec.rank_for),
                                     subspace[0])

    def _sublayer_values(self, prefix: str, query) -> list:
        """query(name) for each of the checkpoint's sub-layers that vLLM fused into `prefix`
        (one value for a layer that is not fused)."""
        head, _, last = prefix.rpartition(".")
        mapping = self.packed_modules_mapping or fmt.DEFAULT_PACKED_MODULES
        subs = mapping.get(last)
        if subs == [last]:  # fused on disk (Phi-3): the checkpoint stores the parts (format.DEFAULT_PACKED_MODULES)
            subs = fmt.DEFAULT_PACKED_MODULES.get(last)
        if not subs:
            return [query(prefix)]
        return [query(f"{head}.{s}" if head else s) for s in subs]
