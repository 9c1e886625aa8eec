"""Language-modelling loss: next-token cross-entropy with a mask, as (sum, count)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

IGNORE = -100


def causal_lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy of `labels` (already shifted: labels[t] is the token after input t;
    IGNORE where no loss is taken) and the number of tokens it sums over."""
    logits = model(batch["input_ids"])
    labels = batch["labels"]
    total = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return total, (labels != IGNORE).sum()
