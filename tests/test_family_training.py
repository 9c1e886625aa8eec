"""Training every family: lmforge's next-token loss and its gradients equal transformers' on the same
checkpoint. The gradients are compared in transformers' own layout: ours are written with `save_model`
as if they were weights (fused, transposed or split on disk as each family spells it) and read back by
transformers, so every on-disk mapping is checked for the backward pass as well."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from hf_models import VOCAB
from test_model import FAMILIES

from lmforge.checkpoint import load_model, save_model


@pytest.mark.parametrize("name", FAMILIES)
def test_loss_and_gradients_equal_transformers(hf_checkpoint, tmp_path, name):
    hf, path = hf_checkpoint(name)
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    theirs = hf(ids, labels=ids).loss
    theirs.backward()
    model = load_model(path)
    ours = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    ours.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    grads = {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in
             model.state_dict(keep_vars=True).items()}
    as_weights = tf.AutoModelForCausalLM.from_pretrained(save_model(model, tmp_path / "grads", state_dict=grads))
    expected = dict(hf.named_parameters())
    for key, ours_grad in as_weights.named_parameters():
        grad = expected[key].grad
        scale = grad.abs().max().item()
        assert scale > 0, key  # every weight takes part in the loss
        torch.testing.assert_close(ours_grad, grad, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{key}: {m}")
