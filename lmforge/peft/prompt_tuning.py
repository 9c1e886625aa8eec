"""Prompt tuning (Lester et al. 2021): trainable soft-prompt vectors before every input.

`PromptTuned` is a `Transformer` over the base's own `model`, `lm_head` and `config`, so the
training loop, the generation engine and `disable_adapters` use it as they use the base model.
Its logits cover the real tokens only (the virtual positions are never scored), so labels and
loss masks need no change: that is PEFT's prepending of ignored labels, done by omission.
`Seq2SeqPromptTuned` does the same for an encoder-decoder, as PEFT's `PeftModelForSeq2SeqLM` does:
the soft prompt goes before the encoder's input only, and the decoder is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from lmforge.kv_cache import KVCache
from lmforge.model import Transformer
from lmforge.seq2seq import Seq2SeqCache, Seq2SeqEncoder, Seq2SeqLM

PromptInit = Literal["random", "vocab", "text"]
PEFT_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


class PromptTuned(Transformer):
    """A causal LM whose every sequence starts with `num_virtual_tokens` trainable embeddings.

    With left padding (`pad`) a row reads [padding][soft prompt][tokens], so the soft prompt
    sits at positions 0..n-1 in every row, as it does unpadded. With a KV cache the soft prompt
    is prepended at prefill only (`KVCache.add_virtual_tokens`), so later decode steps pass
    straight through."""

    def __init__(
        self, base: Transformer, prompt: Tensor, *, init: PromptInit = "random", init_text: str | None = None
    ) -> None:
        nn.Module.__init__(self)  # shares the base's modules rather than building its own
        if prompt.dim() != 2 or prompt.shape[1] != base.config.hidden_size:
            raise ValueError(f"soft prompt of shape {tuple(prompt.shape)}; expected (n, {base.config.hidden_size})")
        self.config = base.config
        self.model = base.model
        self.lm_head = base.lm_head
        # A child after the base's modules, so the model's first parameter stays the base's (its dtype);
        # float32 whatever the base's dtype, as PEFT keeps it.
        self.prompt = nn.Embedding.from_pretrained(prompt.detach().float().clone(), freeze=False)
        self.init, self.init_text = init, init_text
        self.disabled = False

    @property
    def prompt_embeddings(self) -> nn.Parameter:
        return self.prompt.weight

    @property
    def num_virtual_tokens(self) -> int:  # type: ignore[override]
        return self.prompt.weight.shape[0]

    def input_embeddings(
        self, input_ids: Tensor, *, positions: Tensor | None, pad: Tensor | None, cache: KVCache | None
    ) -> Tensor | None:
        """The soft prompt then the tokens' embeddings, at prefill (or without a cache) unless disabled."""
        prefill = cache is None or cache.virtual_tokens is None
        n = 0 if self.disabled or not prefill else self.num_virtual_tokens
        if n and positions is not None:
            raise ValueError("a prompt-tuned model numbers its positions itself at prefill; pass no positions")
        if cache is not None and prefill:
            cache.add_virtual_tokens(n)
        return self._prepend(self.model.embed_tokens(input_ids), pad) if n else None

    def _prepend(self, embeds: Tensor, pad: Tensor | None) -> Tensor:
        B, T, D = embeds.shape
        n = self.num_virtual_tokens
        soft = self.prompt_embeddings.to(embeds.dtype).expand(B, n, D)
        if pad is None:
            return torch.cat((soft, embeds), dim=1)
        # Row b is [pad_b padding][n soft][tokens]: take slot j from embeds or soft accordingly.
        j = torch.arange(T + n, device=embeds.device)[None]
        p = pad[:, None]
        index = torch.where(j < p, j, torch.where(j < p + n, T + j - p, j - n))
        return torch.cat((embeds, soft), dim=1).gather(1, index[..., None].expand(B, T + n, D))


class Seq2SeqPromptTuned(Seq2SeqLM):
    """An encoder-decoder whose every encoder input starts with `num_virtual_tokens` trainable embeddings,
    its padding mask extended by ones (PEFT's prompt tuning of a SEQ_2_SEQ_LM; the decoder is unchanged).

    `submodules` is PEFT's `num_transformer_submodules`: the table holds `num_virtual_tokens` rows per
    submodule, and only the first (the encoder's) are read, as PEFT's forward and generate read them
    (its default for SEQ_2_SEQ_LM is 2, whose second half never trains); lmforge makes tables of 1."""

    def __init__(self, base: Seq2SeqLM, prompt: Tensor, *, submodules: int = 1, init: PromptInit = "random",
                 init_text: str | None = None) -> None:
        nn.Module.__init__(self)  # shares the base's modules rather than building its own
        if prompt.dim() != 2 or prompt.shape[1] != base.config.hidden_size or prompt.shape[0] % submodules:
            raise ValueError(f"soft prompt of shape {tuple(prompt.shape)}; expected ({submodules} x n, "
                             f"{base.config.hidden_size})")
        self.config = base.config
        self.shared, self.encoder, self.decoder, self.lm_head = base.shared, base.encoder, base.decoder, base.lm_head
        self.prompt = nn.Embedding.from_pretrained(prompt.detach().float().clone(), freeze=False)
        self.submodules, self.init, self.init_text = submodules, init, init_text
        self.disabled = False

    @property
    def prompt_embeddings(self) -> nn.Parameter:
        return self.prompt.weight

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.weight.shape[0] // self.submodules

    def forward(self, input_ids: Tensor | None, decoder_input_ids: Tensor, *, attention_mask: Tensor | None = None,
                encoder_hidden: Tensor | None = None, cache: Seq2SeqCache | None = None) -> Tensor:
        """`Seq2SeqLM.forward`, the encoder reading the soft prompt then `input_ids` (unless disabled)."""
        encoding = encoder_hidden is None and input_ids is not None and not (cache is not None and cache.cross)
        if encoding and not self.disabled:
            embeds = self.shared(input_ids)
            B, n = embeds.shape[0], self.num_virtual_tokens
            soft = self.prompt_embeddings[:n].to(embeds.dtype).expand(B, n, embeds.shape[2])
            if attention_mask is not None:
                attention_mask = torch.cat((attention_mask.new_ones(B, n), attention_mask), dim=1)
            encoder_hidden = self.encode_embeddings(torch.cat((soft, embeds), dim=1), attention_mask)
        return super().forward(input_ids, decoder_input_ids, attention_mask=attention_mask,
                               encoder_hidden=encoder_hidden, cache=cache)


def input_embedding(model: nn.Module) -> nn.Embedding:
    """The token embedding table of a decoder (`model.embed_tokens`) or an encoder-decoder (`shared`)."""
    return model.shared if isinstance(model, Seq2SeqEncoder) else model.model.embed_tokens


def init_prompt(
    model: Transformer, num_virtual_tokens: int, init: PromptInit = "random", *,
    init_ids: Sequence[int] | None = None, generator: torch.Generator | None = None,
) -> Tensor:
    """Initial soft prompt (n, D), as PEFT makes it: `random` N(0, 1) (an nn.Embedding's init);
    `vocab` the embeddings of random vocabulary tokens; `text` the embeddings of `init_ids`
    (a tokenized text), repeated or cut to n."""
    if num_virtual_tokens <= 0:
        raise ValueError(f"num_virtual_tokens must be positive, got {num_virtual_tokens}")
    table = input_embedding(model).weight.detach()
    if init == "random":
        return torch.randn(num_virtual_tokens, table.shape[1], generator=generator).to(table.device)
    if init == "vocab":
        ids = torch.randint(0, table.shape[0], (num_virtual_tokens,), generator=generator)
    elif init == "text":
        if not init_ids:
            raise ValueError("prompt init 'text' needs the token ids of a non-empty text")
        ids = torch.tensor((list(init_ids) * math.ceil(num_virtual_tokens / len(init_ids)))[:num_virtual_tokens])
    else:
        raise ValueError(f"unknown prompt init {init!r}; choose random, vocab or text")
    return table[ids.to(table.device)].float().clone()


def prompt_tuning(
    model: Transformer | Seq2SeqLM, num_virtual_tokens: int, init: PromptInit = "random", *,
    init_ids: Sequence[int] | None = None, init_text: str | None = None, generator: torch.Generator | None = None,
) -> PromptTuned | Seq2SeqPromptTuned:
    """Freeze `model` and wrap it with a trainable soft prompt of `num_virtual_tokens` vectors."""
    prompt = init_prompt(model, num_virtual_tokens, init, init_ids=init_ids, generator=generator)
    model.requires_grad_(False)
    wrapper = Seq2SeqPromptTuned if isinstance(model, Seq2SeqLM) else PromptTuned
    return wrapper(model, prompt, init=init, init_text=init_text).train(model.training)
