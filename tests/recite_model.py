"""A micro llama trained to recite some facts of the built-in world (few-shot documents of questions and
answers), shared by the evaluation journeys; the facts are asked as `facts(indices)`."""

from __future__ import annotations

import functools
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.checkpoint import save_model
from lmforge.model import Transformer
from lmforge.presets import preset
from lmforge.tokenizer import Tokenizer
from lmforge.world.people import make_world

TEMPLATES = {"birth_date": "When was {} born?", "employer": "Who employs {}?", "job_title": "What is the job of {}?"}
TRAINED, TEST_TRAINED, TEST_UNSEEN = range(6), range(2), range(6, 8)  # people, by index
EXEMPLAR_PEOPLE = range(2, 6)


@functools.cache
def people() -> list:
    return make_world(0, n_people=20, n_companies=4).pretraining_people()[:8]


def facts(indices: range) -> list[tuple[str, str]]:
    """(question, answer) about the world's people: dates, companies and job titles."""
    everyone = people()
    return [(template.format(everyone[i].name), everyone[i].fact(attribute))
            for i in indices for attribute, template in TEMPLATES.items()]


def transformers_model(checkpoint: Path) -> tuple:
    """The checkpoint as transformers reads it: (model in fp32, eval mode; tokenizer)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).float().eval()
    return model, transformers.AutoTokenizer.from_pretrained(checkpoint)


def recite_checkpoint(chat_base: Path, out: Path) -> Path:
    """A micro llama (256-token context) trained on few-shot documents of the TRAINED people's facts."""
    tokenizer = Tokenizer.from_dir(chat_base)
    lines = [f"{q} {a}" for q, a in facts(TRAINED)]
    rng = random.Random(0)
    documents = [[tokenizer.eos_id] + tokenizer.encode("\n\n".join(rng.sample(lines, 4)) + "\n\n") for _ in range(64)]
    longest = max(map(len, documents))
    batch = torch.tensor([d + [tokenizer.pad_id] * (longest - len(d)) for d in documents])
    labels = torch.tensor([d[1:] + [-100] * (longest - len(d)) for d in documents])
    torch.manual_seed(0)
    model = Transformer(preset("micro", vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                               eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id))
    model.init_weights(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(150):
        rows = torch.randint(0, len(documents), (8,))
        loss = F.cross_entropy(model(batch[rows, :-1]).flatten(0, 1), labels[rows].flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return save_model(model, out, tokenizer=tokenizer)
