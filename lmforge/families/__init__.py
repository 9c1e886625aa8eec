"""How every family spells `config.json`, in one table keyed by family: the `architectures` and
`model_type` it is named by, a reader into `ModelConfig` fields and a writer back (transformers-5 style,
with the keys older readers look for). Llama-style families (`llama`: Llama, Mistral, Mixtral, Qwen2,
Qwen3, Qwen3-MoE; `gemma`: Gemma, Gemma 2/3) share Llama's keys and add their own; GPT-2, Phi-3, Falcon
and BLOOM have their own spellings. Only spelling lives here; what the fields do is the decoder's business."""

from __future__ import annotations

from typing import Any

from lmforge.families.bloom import Bloom
from lmforge.families.falcon import Falcon
from lmforge.families.gemma import Gemma, Gemma2, Gemma3
from lmforge.families.gpt2 import Gpt2
from lmforge.families.llama import Llama, Mistral, Mixtral, Qwen2, Qwen3, Qwen3Moe
from lmforge.families.phi3 import Phi3
from lmforge.families.spelling import Spelling

SPELLINGS: dict[str, Spelling] = {
    "llama": Llama("LlamaForCausalLM", "llama"),
    "mistral": Mistral("MistralForCausalLM", "mistral"),
    "mixtral": Mixtral("MixtralForCausalLM", "mixtral"),
    "qwen2": Qwen2("Qwen2ForCausalLM", "qwen2"),
    "gpt2": Gpt2("GPT2LMHeadModel", "gpt2"),
    "gemma": Gemma("GemmaForCausalLM", "gemma"),
    "gemma2": Gemma2("Gemma2ForCausalLM", "gemma2"),
    "gemma3": Gemma3("Gemma3ForCausalLM", "gemma3_text"),
    "qwen3": Qwen3("Qwen3ForCausalLM", "qwen3"),
    "qwen3_moe": Qwen3Moe("Qwen3MoeForCausalLM", "qwen3_moe"),
    "phi3": Phi3("Phi3ForCausalLM", "phi3"),
    "falcon": Falcon("FalconForCausalLM", "falcon"),
    "bloom": Bloom("BloomForCausalLM", "bloom"),
}
ARCHITECTURES: dict[str, str] = {spelling.architecture: family for family, spelling in SPELLINGS.items()}
FAMILY_ARCHITECTURE: dict[str, str] = {family: spelling.architecture for family, spelling in SPELLINGS.items()}


def family_of(hf: dict[str, Any], source: str) -> str:
    """The family a config.json dict names: by its `architectures`, else (none listed) its `model_type`
    (or the family's own name)."""
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    model_type = hf.get("model_type")
    model_type = {spelling.model_type: family for family, spelling in SPELLINGS.items()}.get(model_type, model_type)
    if not archs and model_type in SPELLINGS:
        return model_type
    supported = ", ".join(ARCHITECTURES)
    named = ", ".join(archs) or f"model_type {model_type!r}"
    raise ValueError(f"{source}: unsupported architecture {named}; lmforge supports {supported}")
