"""How every family spells `config.json`, in one table keyed by family: the `architectures` and
`model_type` it is named by, a reader into `ModelConfig` fields and a writer back (transformers-5 style,
with the keys older readers look for). Llama-style families (`llama`: Llama, Mistral, Mixtral, Qwen2,
Qwen3, Qwen3-MoE; `gemma`: Gemma, Gemma 2/3) share Llama's keys and add their own; GPT-2, Phi-3, Falcon
and BLOOM have their own spellings. Encoder-decoder families (T5) are spelled in a table of their own,
`SEQ2SEQ_SPELLINGS`, read into `lmforge.seq2seq.Seq2SeqConfig`; `is_seq2seq_config` tells the two kinds
apart. Only spelling lives here; what the fields do is the models' business."""

from __future__ import annotations

from typing import Any

from lmforge.families.bloom import Bloom
from lmforge.families.falcon import Falcon
from lmforge.families.gemma import Gemma, Gemma2, Gemma3
from lmforge.families.gpt2 import Gpt2
from lmforge.families.llama import Llama, Mistral, Mixtral, Qwen2, Qwen3, Qwen3Moe
from lmforge.families.phi3 import Phi3
from lmforge.families.spelling import Spelling
from lmforge.families.t5 import T5

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
SEQ2SEQ_SPELLINGS: dict[str, T5] = {
    "t5": T5("T5ForConditionalGeneration", "t5", "T5EncoderModel", aliases=("T5WithLMHeadModel",)),
}
SEQ2SEQ_ARCHITECTURES: dict[str, str] = {
    arch: family for family, spelling in SEQ2SEQ_SPELLINGS.items() for arch in spelling.architectures
}


def is_seq2seq_config(hf: dict[str, Any]) -> bool:
    """Whether a config.json dict names an encoder-decoder family (or its encoder alone): by its
    `architectures`, else its `model_type`."""
    archs = hf.get("architectures") or []
    if archs:
        return any(arch in SEQ2SEQ_ARCHITECTURES for arch in archs)
    return hf.get("model_type") in {spelling.model_type for spelling in SEQ2SEQ_SPELLINGS.values()}


def seq2seq_family_of(hf: dict[str, Any], source: str) -> str:
    """The encoder-decoder family a config.json dict names (see `is_seq2seq_config`)."""
    for arch in hf.get("architectures") or []:
        if arch in SEQ2SEQ_ARCHITECTURES:
            return SEQ2SEQ_ARCHITECTURES[arch]
    for family, spelling in SEQ2SEQ_SPELLINGS.items():
        if not hf.get("architectures") and hf.get("model_type") == spelling.model_type:
            return family
    named = ", ".join(hf.get("architectures") or []) or f"model_type {hf.get('model_type')!r}"
    supported = ", ".join(SEQ2SEQ_ARCHITECTURES)
    raise ValueError(f"{source}: {named} is not an encoder-decoder model; lmforge supports {supported}")


def family_of(hf: dict[str, Any], source: str) -> str:
    """The family a config.json dict names: by its `architectures`, else (none listed) its `model_type`
    (or the family's own name)."""
    archs = hf.get("architectures") or []
    if is_seq2seq_config(hf):
        raise ValueError(f"{source}: {', '.join(archs) or hf.get('model_type')} is an encoder-decoder model, not a "
                         "decoder; load it with lmforge.seq2seq_checkpoint.load_seq2seq")
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
