"""T5's `config.json` (`d_model`, `d_kv`, `d_ff`, `num_layers`, `feed_forward_proj`, ...), read into
`Seq2SeqConfig` fields and written back: T5 v1.0 (ReLU MLP, tied head scaled by d_model**-0.5), T5 v1.1 and
FLAN-T5 (gated-GELU MLP, untied head), and T5's encoder alone (`T5EncoderModel`).

transformers 5 always ties the head on load unless the checkpoint holds a different `lm_head.weight`, and
records the v1.0 head scaling as `scale_decoder_outputs`; transformers 4 reads `tie_word_embeddings` for
both. Both keys are read and written, so either version loads what the other wrote."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmforge.families.spelling import Spelling

if TYPE_CHECKING:
    from lmforge.seq2seq import Seq2SeqConfig

# feed_forward_proj -> the activation transformers applies (`T5Config.dense_act_fn`); "gated-" adds a gate.
FEED_FORWARD_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_new", "silu": "silu",
                            "gated-relu": "relu", "gated-gelu": "gelu_new", "gated-silu": "silu"}


class T5(Spelling):
    """T5's spelling; `encoder_architecture` names the encoder-only model (`T5EncoderModel`)."""

    def __init__(self, architecture: str, model_type: str, encoder_architecture: str,
                 aliases: tuple[str, ...] = ()) -> None:
        super().__init__(architecture, model_type)
        self.encoder_architecture = encoder_architecture
        self.architectures = (architecture, encoder_architecture, *aliases)

    def read(self, hf: dict[str, Any], source: str) -> dict[str, Any]:
        proj = hf.get("feed_forward_proj", "relu")
        if proj not in FEED_FORWARD_ACTIVATIONS:
            raise ValueError(f"{source}: feed_forward_proj {proj!r} is not supported "
                             f"(one of {', '.join(FEED_FORWARD_ACTIVATIONS)})")
        tied = hf.get("tie_word_embeddings", True) is not False
        fields = dict(
            vocab_size=hf.get("vocab_size", 32128),
            hidden_size=hf.get("d_model", 512),
            head_dim=hf.get("d_kv", 64),
            intermediate_size=hf.get("d_ff", 2048),
            num_hidden_layers=hf.get("num_layers", 6),
            num_decoder_layers=hf.get("num_decoder_layers") or hf.get("num_layers", 6),
            num_attention_heads=hf.get("num_heads", 8),
            relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
            feed_forward_proj=proj,
            dropout_rate=hf.get("dropout_rate", 0.1),
            norm_eps=hf.get("layer_norm_epsilon", 1e-6),
            tie_word_embeddings=tied,
            scale_decoder_outputs=hf.get("scale_decoder_outputs", tied),
            initializer_factor=hf.get("initializer_factor", 1.0),
            decoder_start_token_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)),
        )
        for key in ("pad_token_id", "eos_token_id"):
            if key in hf:
                fields[key] = hf[key]
        return fields

    def write(self, config: Seq2SeqConfig, *, encoder_only: bool = False) -> dict[str, Any]:
        proj = config.feed_forward_proj
        return dict(
            architectures=[self.encoder_architecture if encoder_only else self.architecture],
            model_type=self.model_type,
            vocab_size=config.vocab_size,
            d_model=config.hidden_size,
            d_kv=config.head_dim,
            d_ff=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_decoder_layers=config.num_decoder_layers,
            num_heads=config.num_attention_heads,
            relative_attention_num_buckets=config.relative_attention_num_buckets,
            relative_attention_max_distance=config.relative_attention_max_distance,
            feed_forward_proj=proj,
            dense_act_fn=FEED_FORWARD_ACTIVATIONS[proj],
            is_gated_act=proj.startswith("gated-"),
            dropout_rate=config.dropout_rate,
            layer_norm_epsilon=config.norm_eps,
            initializer_factor=config.initializer_factor,
            tie_word_embeddings=config.tie_word_embeddings,
            scale_decoder_outputs=config.scale_decoder_outputs,
            is_encoder_decoder=not encoder_only,
            use_cache=not encoder_only,
            pad_token_id=config.pad_token_id,
            eos_token_id=config.eos_token_id,
            decoder_start_token_id=config.decoder_start_token_id,
            dtype=config.torch_dtype,
            torch_dtype=config.torch_dtype,
        )
