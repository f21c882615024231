"""What the quantizer knows about each model family: where a decoder block's norms and linears
are, how its RMSNorm scales (by w, or by 1 + w), and which of TwinQuant's transforms fold into
it exactly. One table, `FAMILIES`; `family_for(config)` picks the row or refuses the model with
an error naming the unsupported piece.

The transforms rely on three facts about a block (docs/method.md, "Model families"):

* a *pre-norm* (RMSNorm followed by the linears that read it) can absorb a per-channel factor:
  the norm weight is divided by it and the readers' input columns multiplied by it (smoothing),
  or moved entirely into the readers (norm folding, which leaves the norm at unit scale);
* the residual stream can be rotated (h -> h Q) only if everything that writes into it is a
  linear layer whose output rows can absorb Q^T. A *post-norm* (Gemma 2/3: RMSNorm on the
  attention and MLP outputs before the residual add) rescales each channel after normalising, so
  diag(g) Q != Q diag(g) and no fold is exact: those families refuse the rotation;
* the final norm folds into lm_head only if lm_head may be stored untied from the embeddings,
  which vLLM's implementation of the architecture must allow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ATTN_READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP_READERS = ("mlp.gate_proj", "mlp.up_proj")
WRITERS = ("self_attn.o_proj", "mlp.down_proj")

MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "dbrx", "olmoe",
                   "granitemoe", "jamba", "phimoe", "minimax", "llama4", "gpt_oss")
MULTIMODAL_MODEL_TYPES = ("gemma3", "llava", "mllama", "qwen2_vl", "qwen2_5_vl", "paligemma", "idefics3")


class UnsupportedModelError(ValueError):
    """A model (or one of its pieces) that the quantizer cannot handle; the message names it."""


@dataclass(frozen=True)
class NormReaders:
    """A pre-norm and the linears (block-relative names) that read its output."""

    norm: str
    readers: tuple[str, ...]


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    pre_norms: tuple[NormReaders, ...] = (NormReaders("input_layernorm", ATTN_READERS),
                                          NormReaders("post_attention_layernorm", MLP_READERS))
    writers: tuple[str, ...] = WRITERS
    post_norms: tuple[str, ...] = ()  # norms on the writers' outputs, before the residual add
    head_norms: tuple[str, ...] = ()  # per-head norms inside attention (q_norm, k_norm)
    norm_offset: float = 0.0  # the norm scales by (norm_offset + weight)
    # the linear whose output rows feed mlp.down_proj's input, and which of its rows (None: all)
    down_input_rows: tuple[str, str | None] = ("mlp.up_proj", None)
    # linears fused on disk that the checkpoint stores split, under the names vLLM's loader maps
    # back into the fused layer: name -> its parts, in output-row order
    stored_split: dict[str, tuple[str, ...]] = field(default_factory=dict)
    vllm_unties_head: bool = True  # vLLM's model class can load an lm_head distinct from the embeddings

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(r for g in self.pre_norms for r in g.readers) + self.writers

    @property
    def norms(self) -> tuple[str, ...]:
        return tuple(g.norm for g in self.pre_norms) + self.post_norms

    def rotation_refusal(self) -> str | None:
        """Why a residual-stream rotation cannot be folded into this family exactly (None: it can)."""
        if self.post_norms:
            return (f"{self.name}: the norms after attention and MLP ({', '.join(self.post_norms)}) scale each "
                    "residual-stream channel after normalising, so a rotation of the stream does not commute with "
                    "them and cannot be folded into the weights")
        if not self.vllm_unties_head:
            return (f"{self.name}: the rotation folds the final norm into lm_head, which unties it from the "
                    "embeddings, and vLLM's implementation of this architecture always ties them")
        return None

    def attention_aware_refusal(self) -> str | None:
        """Why v_proj's attention-mixed statistic cannot be computed for this family (None: it can)."""
        if "self_attn.v_proj" not in self.linears:
            return f"{self.name}: v_proj is fused with q/k on disk, so it has no statistic of its own"
        return None

    def stored_part_sizes(self, name: str, config) -> tuple[int, ...]:
        """Output rows of each stored part of a linear fused on disk."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if name.endswith("qkv_proj"):
            kv = config.num_key_value_heads * head_dim
            return (config.num_attention_heads * head_dim, kv, kv)
        if name.endswith("gate_up_proj"):
            return (config.intermediate_size, config.intermediate_size)
        raise UnsupportedModelError(f"{self.name}: no rule for the parts of fused layer {name}")


_GEMMA_POST = ("post_attention_layernorm", "post_feedforward_layernorm")
_GEMMA_PRE = (NormReaders("input_layernorm", ATTN_READERS), NormReaders("pre_feedforward_layernorm", MLP_READERS))

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",)),
    Family("mistral", ("mistral",)),
    Family("qwen2", ("qwen2",)),
    Family("qwen3", ("qwen3",), head_norms=("self_attn.q_norm", "self_attn.k_norm")),
    Family("gemma", ("gemma",), norm_offset=1.0, vllm_unties_head=False),  # vLLM 0.26's Gemma asserts tied
    Family("gemma2", ("gemma2",), pre_norms=_GEMMA_PRE, post_norms=_GEMMA_POST, norm_offset=1.0,
           vllm_unties_head=False),
    Family("gemma3", ("gemma3_text",), pre_norms=_GEMMA_PRE, post_norms=_GEMMA_POST, norm_offset=1.0,
           head_norms=("self_attn.q_norm", "self_attn.k_norm")),
    Family("phi3", ("phi3",),
           pre_norms=(NormReaders("input_layernorm", ("self_attn.qkv_proj",)),
                      NormReaders("post_attention_layernorm", ("mlp.gate_up_proj",))),
           down_input_rows=("mlp.gate_up_proj", "second_half"),
           stored_split={"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}),
)


def family_for(config) -> Family:
    """The family of a transformers config, or UnsupportedModelError naming what is not supported."""
    mt = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if mt in fam.model_types:
            return fam
    known = sorted(t for f in FAMILIES for t in f.model_types)
    if mt in MOE_MODEL_TYPES or getattr(config, "num_local_experts", 0) or getattr(config, "num_experts", 0):
        raise UnsupportedModelError(
            f"model_type {mt!r} has mixture-of-experts layers: TwinQuant quantizes dense linear layers only "
            f"(its format has no expert tensors, and vLLM's fused MoE layers take no TwinQuant method). "
            f"Supported model types: {known}")
    if mt in MULTIMODAL_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {mt!r} is a multimodal model: quantize its text model on its own (for Gemma 3, a "
            f"Gemma3ForCausalLM checkpoint, model_type 'gemma3_text'). Supported model types: {known}")
    raise UnsupportedModelError(f"model_type {mt!r} is not supported; supported model types: {known}")


def check_block(family: Family, block, where: str) -> None:
    """Every parameter of a decoder block belongs to a linear or a norm that the family names,
    so nothing of the block is silently left out of the checkpoint or of a transform."""
    known = set(family.linears) | set(family.norms) | set(family.head_norms)
    for name, _ in block.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if owner not in known:
            mod = block.get_submodule(owner)
            raise UnsupportedModelError(
                f"{where}.{owner} ({type(mod).__name__}) is not a part the {family.name} family has: the quantizer "
                f"handles the linears {list(family.linears)} and the norms {list(family.norms + family.head_norms)}")
