"""Language-modelling loss: next-token cross-entropy with a mask, as (sum, count), and the
evaluator that averages it over validation batches."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.data.chat import IGNORE


def causal_lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy of `labels` (already shifted: labels[t] is the token after input t;
    IGNORE where no loss is taken) and the number of tokens it sums over."""
    logits = model(batch["input_ids"])
    labels = batch["labels"]
    total = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return total, (labels != IGNORE).sum()


def validation_loss(batches: Sequence[dict[str, Tensor]], device: torch.device) -> Callable[[nn.Module], dict[str, float]]:
    """Evaluator: mean next-token loss (`val_loss`) and perplexity (`val_ppl`) over the tokens that
    take a loss in `batches`."""

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        model.eval()
        total, count = 0.0, 0
        for batch in batches:
            loss, tokens = causal_lm_loss(model, {k: v.to(device) for k, v in batch.items()})
            total, count = total + float(loss), count + int(tokens)
        model.train()
        return {"val_loss": total / count, "val_ppl": math.exp(min(total / count, 50.0))}

    return evaluate
