"""Language-modelling losses: token cross-entropy with a mask, as (sum, count), for decoder-only
(causal) and encoder-decoder (seq2seq) models, and the evaluator that averages a loss over
validation batches."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.data.chat import IGNORE


def token_cross_entropy(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy of `labels` under `logits` (..., V), in fp32, skipping IGNORE; and the
    number of labels it sums over."""
    total = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return total, (labels != IGNORE).sum()


def causal_lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy of `labels` (already shifted: labels[t] is the token after input t;
    IGNORE where no loss is taken) and the number of tokens it sums over."""
    return token_cross_entropy(model(batch["input_ids"]), batch["labels"])


def seq2seq_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy over the target tokens (IGNORE skipped), as `T5ForConditionalGeneration`'s
    loss, and their number. `logits[b, t]` predicts `labels[b, t]` (the decoder input is the labels
    shifted right), so nothing is shifted here."""
    total, count = token_cross_entropy(logits, labels)
    return total / count, count


def seq2seq_lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The training loop's loss for an encoder-decoder model: summed cross-entropy over the target
    tokens of a `lmforge.data.seq2seq` batch and their number."""
    logits = model(batch["input_ids"], batch["decoder_input_ids"], attention_mask=batch["attention_mask"])
    return token_cross_entropy(logits, batch["labels"])


def validation_loss(batches: Sequence[dict[str, Tensor]], device: torch.device,
                    loss_fn: Callable[[nn.Module, dict[str, Tensor]], tuple[Tensor, Tensor]] = causal_lm_loss,
                    ) -> Callable[[nn.Module], dict[str, float]]:
    """Evaluator: mean loss (`val_loss`) and perplexity (`val_ppl`) of `loss_fn` over the tokens that
    take a loss in `batches`."""

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        model.eval()
        total, count = 0.0, 0
        for batch in batches:
            loss, tokens = loss_fn(model, {k: v.to(device) for k, v in batch.items()})
            total, count = total + float(loss), count + int(tokens)
        model.train()
        return {"val_loss": total / count, "val_ppl": math.exp(min(total / count, 50.0))}

    return evaluate
