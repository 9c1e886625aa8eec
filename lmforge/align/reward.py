"""`lmforge reward`: a reward model trained on preference pairs with the Bradley–Terry loss.

The reward model is the decoder trunk of an SFT or pretrained model with a scalar head `score` in
place of the LM head. A sequence's score is the head applied to the hidden state of its last token
that is not padding (transformers' rule for sequence classification, so right- and left-padded
batches score alike). It is saved as transformers' sequence-classification model
(`LlamaForSequenceClassification` and the other families' equivalents, `num_labels` 1), which
`AutoModelForSequenceClassification.from_pretrained` loads with the same scores.

A scored sequence is prompt + response rendered with the chat template, through the response's
end-of-turn marker: what the policy generates, so PPO's token ids score as training's do.
The stage trains trunk and head fully in the shared loop; each batch row holds one pair, the
loss is -log sigmoid(r_chosen - r_rejected - margin) summed over pairs (LLaMA-2's margin: the
record's numeric `margin` field, else the recipe's), and validation logs pairwise accuracy."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from tqdm.auto import tqdm

from lmforge.align.losses import bradley_terry_loss, whiten
from lmforge.checkpoint import atomic_dir, instantiate, load_model, read_tensors, to_disk, to_ours, write_weights
from lmforge.config import ModelConfig, load_recipe
from lmforge.data.chat import IGNORE, Example, padding_id
from lmforge.data.hub_datasets import label
from lmforge.data.preference import (
    EncodedPair, PreferenceDataConfig, PreferencePair, encode_pair, read_pairs, response_example,
)
from lmforge.data.sampling import SampledSource, holdout_split
from lmforge.families import FAMILY_ARCHITECTURE
from lmforge.hub import resolve_checkpoint
from lmforge.io import read_json
from lmforge.model import Decoder, Transformer
from lmforge.peft.adapters import is_adapter_dir
from lmforge.tokenizer import Message, Tokenizer
from lmforge.train.distributed import Dist, init_distributed, unwrap, wrap
from lmforge.train.loop import ModelFiles, TrainConfig, Trainer, finish_run

SEQ_CLS_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "mixtral": "MixtralForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "gpt2": "GPT2ForSequenceClassification",
    "gemma": "GemmaForSequenceClassification",
    "gemma2": "Gemma2ForSequenceClassification",
    "gemma3": "Gemma3TextForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification",
    "qwen3_moe": "Qwen3MoeForSequenceClassification",
    "phi3": "Phi3ForSequenceClassification",
    "falcon": "FalconForSequenceClassification",
    "bloom": "BloomForSequenceClassification",
}
HEAD = "score.weight"


# ---- the model -----------------------------------------------------------------------------------


class RewardModel(nn.Module):
    """Decoder trunk `model` + scalar head `score`, named as transformers' sequence classifiers."""

    def __init__(self, config: ModelConfig, trunk: Decoder | None = None) -> None:
        super().__init__()
        if config.pad_token_id is None:
            raise ValueError("a reward model needs pad_token_id (its score is read at the last non-padding token)")
        self.config = config
        self.model = trunk if trunk is not None else Decoder(config)
        self.model.config = config
        self.score = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Scores (B,) of right-padded (or left-padded) token ids (B, T)."""
        hidden = self.model(input_ids)
        last = last_token_index(input_ids, self.config.pad_token_id)
        return self.score(hidden[torch.arange(len(input_ids), device=hidden.device), last]).squeeze(-1)

    @classmethod
    def from_lm(cls, lm: Transformer, pad_token_id: int, seed: int = 0) -> RewardModel:
        """The trunk of `lm` (shared, not copied) with a new head drawn from N(0, 1/(hidden + 1)), as
        Stiennon et al. (2020) do: scores start near unit scale, and the trunk gets gradients from the
        first step (a zero head would pass none back until it had moved)."""
        config = lm.config.model_copy(update={"pad_token_id": pad_token_id, "tie_word_embeddings": False})
        model = cls(config, lm.model)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            head = torch.randn(1, config.hidden_size, generator=generator) / math.sqrt(config.hidden_size + 1)
            model.score.weight.copy_(head)
        return model.to(lm.model.embed_tokens.weight.dtype)

    def save(self, out: str | Path, *, tokenizer: Any = None, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write an HF sequence-classification directory, atomically (`state_dict` replaces the model's own)."""
        state = {k: v.detach().cpu() for k, v in (state_dict or self.state_dict()).items()}
        head = state.pop(HEAD)
        dtype = str(head.dtype).removeprefix("torch.")
        config = self.config.model_copy(update={"torch_dtype": dtype})
        with atomic_dir(out) as tmp:
            write_weights(tmp, {**to_disk(config.family, state, config), HEAD: head})
            (tmp / "config.json").write_text(json.dumps(hf_config(config), indent=2) + "\n")
            if tokenizer is not None:
                tokenizer.save(tmp)
        return Path(out)

    @classmethod
    def load(cls, path: str | Path, *, dtype: torch.dtype | str | None = None,
             device: torch.device | str = "cpu") -> RewardModel:
        """Load a sequence-classification directory (or Hub id) written here or by transformers."""
        path = resolve_checkpoint(path)
        config, state = read_reward_state(path)
        return instantiate(path, cls, config, state, dtype=dtype, device=device)


def last_token_index(input_ids: Tensor, pad_id: int) -> Tensor:
    """Each row's rightmost position that is not `pad_id` (0 for a row of padding), as transformers picks it."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad_id)).amax(dim=1)


def hf_config(config: ModelConfig) -> dict[str, Any]:
    """transformers' `config.json` of the family's sequence classifier with one label."""
    return {**config.to_hf(), "architectures": [SEQ_CLS_ARCHITECTURES[config.family]], "num_labels": 1,
            "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}


def read_reward_state(path: Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The config and state dict (our names) of a sequence-classification directory."""
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no config.json; is {path} a reward model directory?")
    hf = read_json(file)
    families = [f for f, arch in SEQ_CLS_ARCHITECTURES.items() if arch in (hf.get("architectures") or [])]
    if not families:
        raise ValueError(f"{file}: architectures {hf.get('architectures')} name no sequence classifier; a reward "
                         f"model is one of {', '.join(SEQ_CLS_ARCHITECTURES.values())}")
    config = ModelConfig.from_hf({**hf, "architectures": [FAMILY_ARCHITECTURE[families[0]]]}, source=str(file))
    config.tie_word_embeddings = False
    disk = read_tensors(path)
    head = disk.pop(HEAD, None)
    state = to_ours(config.family, disk, config)
    if head is not None:
        state[HEAD] = head
    return config, state


# ---- scoring -------------------------------------------------------------------------------------


def scored_ids(example: Example, max_len: int) -> list[int]:
    """An example's ids through its last labelled token (the response's end-of-turn marker, not the
    template's whitespace after it), cut to `max_len`."""
    last = max(t for t, label in enumerate(example.labels) if label != IGNORE)
    return (example.input_ids[: last + 1] + [example.labels[last]])[:max_len]


def turn_end_id(tokenizer: Tokenizer) -> int:
    """The token the chat template closes an assistant turn with (ChatML's `<|im_end|>`): the last
    token of every scored sequence, where the reward model reads its score."""
    prompt: list[Message] = [{"role": "user", "content": "?"}]
    prompt_tokens = len(tokenizer.encode_chat(prompt))
    reply = response_example(tokenizer, prompt, [{"role": "assistant", "content": "."}], prompt_tokens, 1 << 20)
    return scored_ids(reply, 1 << 20)[-1]


def pad_right(sequences: list[list[int]], pad_id: int) -> Tensor:
    ids = torch.full((len(sequences), max(map(len, sequences))), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids


class RewardScorer:
    """Scores prompt + response conversations (or their token ids) with a reward model, for PPO,
    rejection sampling and evaluation. Sequences longer than `max_len` (default: the model's
    context) are cut to their first `max_len` tokens, as training cut its pairs."""

    def __init__(self, model: RewardModel, tokenizer: Tokenizer, *, max_len: int | None = None) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_len = max_len or model.config.max_position_embeddings
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> RewardScorer:
        return cls(RewardModel.load(path), Tokenizer.from_dir(path), **kwargs)

    def score(self, prompts: list[list[Message]], responses: list[str], batch_size: int = 32) -> list[float]:
        """The score of each assistant `response` to its `prompt` (a list of chat messages)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        sequences = [self.encode(p, r) for p, r in zip(prompts, responses)]
        return self.score_ids(sequences, batch_size).tolist()

    def encode(self, prompt: list[Message], response: str) -> list[int]:
        """The token ids scored for `prompt` + the assistant turn `response`."""
        prompt_ids = self.tokenizer.encode_chat(prompt)
        if len(prompt_ids) >= self.max_len:
            raise ValueError(f"a prompt of {len(prompt_ids)} tokens leaves no room for the response within "
                             f"max_len {self.max_len}")
        reply = [{"role": "assistant", "content": response}]
        return scored_ids(response_example(self.tokenizer, prompt, reply, len(prompt_ids), self.max_len),
                          self.max_len)

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]], batch_size: int = 32) -> Tensor:
        """Float scores (N,) of tokenized prompt + response sequences."""
        if any(not seq for seq in sequences):
            raise ValueError("cannot score an empty sequence")
        scores = [self.model(pad_right([s[: self.max_len] for s in sequences[i : i + batch_size]],
                                       self.model.config.pad_token_id).to(self.device)).float().cpu()
                  for i in range(0, len(sequences), batch_size)]
        return torch.cat(scores) if scores else torch.zeros(0)


def combined_reward(helpful: Tensor, safety: Tensor, risky: Tensor, threshold: float = 0.15, *,
                    whitened: bool = False) -> Tensor:
    """LLaMA-2's reward for PPO (Touvron et al. 2023, section 3.2.2): the safety score where the prompt
    is risky or the response looks unsafe (sigmoid(safety) < `threshold`, the paper's 0.15 being in
    sigmoid space), the helpfulness score elsewhere. Our scores are logits already, so the paper's
    LOGIT step is the identity; `whitened` then normalises the batch to zero mean and unit variance."""
    use_safety = risky.to(torch.bool) | (torch.sigmoid(safety) < threshold)
    reward = torch.where(use_safety, safety, helpful)
    return whiten(reward, torch.ones_like(reward)) if whitened else reward


# ---- data ----------------------------------------------------------------------------------------


@dataclass
class PairIds:
    """One preference pair as the token ids scored, with its margin."""

    chosen: list[int]
    rejected: list[int]
    margin: float
    kind: str | None = None


def load_pairs(path: Path, tokenizer: Tokenizer, max_len: int, *, kind: str | None = None, margin: float = 0.0,
               split: str = "train", columns: Mapping[str, str] | None = None) -> list[PairIds]:
    """The pairs of a preference file or Hub dataset split (only those of `kind`, if given), tokenized for
    scoring, each with its record's margin or `margin`; reports how many had a response cut to fit `max_len`."""
    pairs = read_pairs(path, split=split, columns=columns)
    if kind is not None:
        kinds = sorted({str(p.kind) for p in pairs})
        pairs = [p for p in pairs if p.kind == kind]
        if not pairs:
            raise ValueError(f"{label(path, split)}: no records of kind {kind!r} (kinds found: {', '.join(kinds)})")
    encoded = [encode_pair(tokenizer, p, max_len) for p in pairs]
    cut = sum(e.chosen.truncated or e.rejected.truncated for e in encoded)
    if cut:
        tqdm.write(f"{label(path, split)}: {cut} of {len(pairs)} pairs have a response cut to fit {max_len} tokens")
    return [pair_ids(p, e, max_len, margin if p.margin is None else p.margin) for p, e in zip(pairs, encoded)]


def pair_ids(pair: PreferencePair, encoded: EncodedPair, max_len: int, margin: float) -> PairIds:
    chosen, rejected = scored_ids(encoded.chosen, max_len), scored_ids(encoded.rejected, max_len)
    if chosen == rejected:
        raise ValueError(f"{pair.path}:{pair.line}: field 'rejected': identical to 'chosen' within max_len "
                         f"{max_len} tokens")
    return PairIds(chosen, rejected, margin, pair.kind)


def collate_pairs(pairs: list[PairIds], pad_id: int) -> dict[str, Tensor]:
    """Chosen and rejected ids right-padded to one length (a row per pair), and the margins."""
    ids = pad_right([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    return {"chosen_input_ids": ids[: len(pairs)], "rejected_input_ids": ids[len(pairs) :],
            "margin": torch.tensor([p.margin for p in pairs], dtype=torch.float32)}


def pair_scores(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Scores of the chosen and the rejected sequences, in one forward pass."""
    n = len(batch["chosen_input_ids"])
    scores = model(torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])).float()
    return scores[:n], scores[n:]


def pairwise_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Bradley–Terry loss summed over the batch's pairs, the number of pairs, and the sums of pairwise
    accuracy and score gap r_chosen - r_rejected (which the loop logs as means: accuracy, margin)."""
    chosen, rejected = pair_scores(model, batch)
    gap = (chosen - rejected).detach()
    loss = bradley_terry_loss(chosen, rejected, batch["margin"]) * len(chosen)
    return loss, torch.tensor(len(chosen)), {"accuracy": (gap > 0).float().sum(), "margin": gap.sum()}


def pairwise_metrics(pairs: list[PairIds], batch_size: int, pad_id: int, device: torch.device):
    """Evaluator: loss, accuracy (chosen scored strictly higher) and mean score gap (margin) over
    `pairs`, and the accuracy per kind where pairs have kinds."""

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        model.eval()
        scored = [pair_scores(model, {k: v.to(device) for k, v in collate_pairs(pairs[i : i + batch_size],
                                                                                 pad_id).items()})
                  for i in range(0, len(pairs), batch_size)]
        model.train()
        chosen, rejected = torch.cat([c for c, _ in scored]).cpu(), torch.cat([r for _, r in scored]).cpu()
        margins = torch.tensor([p.margin for p in pairs])
        right = chosen > rejected
        metrics = {"val_loss": float(bradley_terry_loss(chosen, rejected, margins)),
                   "val_accuracy": float(right.float().mean()), "val_margin": float((chosen - rejected).mean())}
        for kind in sorted({p.kind for p in pairs if p.kind}):
            metrics[f"val_accuracy_{kind}"] = float(right[[p.kind == kind for p in pairs]].float().mean())
        return metrics

    return evaluate


# ---- the stage -----------------------------------------------------------------------------------


@torch.no_grad()
def scored_samples(model: RewardModel, tokenizer: Tokenizer, pairs: list[PairIds]) -> list[tuple[str, str]]:
    """(prompt, both responses with their scores) for a report's samples table."""
    out = []
    for pair in pairs:
        shared = next((i for i, (a, b) in enumerate(zip(pair.chosen, pair.rejected)) if a != b),
                      min(len(pair.chosen), len(pair.rejected)))
        model.eval()
        chosen, rejected = model(pad_right([pair.chosen, pair.rejected], model.config.pad_token_id)).tolist()
        text = [tokenizer.decode(ids[shared:], skip_special_tokens=True) for ids in (pair.chosen, pair.rejected)]
        out.append((tokenizer.decode(pair.chosen[:shared], skip_special_tokens=True),
                    f"chosen ({chosen:+.2f}): {text[0]} / rejected ({rejected:+.2f}): {text[1]}"))
    return out


class RewardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out_dir: Path
    base: Path = Field(description="HF-format model directory (with its tokenizer) or Hub id: the trunk to start from")
    data: PreferenceDataConfig
    margin: float = Field(0.0, ge=0, description="LLaMA-2's margin for records without a 'margin'; 0 disables")
    train: TrainConfig = TrainConfig(steps=200, lr=1e-4, warmup_steps=10, weight_decay=0.0, eval_every=50,
                                     save_every=100)


class RewardFiles(ModelFiles):
    """Checkpoints hold the reward model as a sequence-classification directory `model/`."""

    def save(self, model: nn.Module, out: Path, state: dict[str, Tensor], tokenizer: Any) -> None:
        unwrap(model).save(out / "model", tokenizer=tokenizer, state_dict=state)

    def load(self, model: nn.Module, checkpoint: Path) -> dict[str, Tensor]:
        return read_reward_state(checkpoint / "model")[1]


def load_data(config: PreferenceDataConfig, tokenizer: Tokenizer, margin: float,
              seed: int) -> tuple[list[PairIds], list[PairIds]]:
    """Training and validation pairs (validation from val_path, or a seeded share of the training file)."""
    train = load_pairs(config.train_path, tokenizer, config.max_len, kind=config.kind, margin=margin,
                       split=config.split, columns=config.columns)
    if config.val_path is not None:
        return train, load_pairs(config.val_path, tokenizer, config.max_len, kind=config.kind, margin=margin,
                                 split=config.val_split, columns=config.columns)
    return holdout_split(train, config.val_fraction, seed)


def train_reward(config: RewardConfig, resume: bool = False) -> Path:
    """Train a reward model; returns its directory (`out_dir/model`)."""
    started = time.perf_counter()
    env: Dist = init_distributed()
    cfg = config.train
    if is_adapter_dir(config.base):
        raise ValueError(f"reward: {config.base} is an adapter; merge it first (`lmforge merge --checkpoint "
                         f"{config.base} --out DIR`) and use DIR as base")
    tokenizer = Tokenizer.from_dir(config.base)
    lm = load_model(config.base, dtype=torch.float32)
    # without a pad token, pad with EOS (a trailing EOS is then not scored, as in transformers)
    pad_id = lm.config.pad_token_id if lm.config.pad_token_id is not None else padding_id(tokenizer)
    train, val = load_data(config.data, tokenizer, config.margin, cfg.seed)
    if env.is_main:
        tqdm.write(f"reward: {len(train)} training pairs, {len(val)} validation pairs")
    model = wrap(RewardModel.from_lm(lm, pad_id, seed=cfg.seed).to(env.device), cfg.strategy, env)
    source = SampledSource(len(train), lambda rows: collate_pairs([train[i] for i in rows], pad_id),
                           cfg.global_batch_size(env.world_size), cfg.seed)
    trainer = Trainer(
        model, cfg, source, pairwise_loss, config.out_dir, env=env, tokenizer=tokenizer, files=RewardFiles(),
        run_config=config, evaluate=pairwise_metrics(val, cfg.micro_batch_size, pad_id, env.device) if val else None,
    )
    trainer.run(resume=resume)
    finish_run(trainer, config, "Reward model", started, samples=scored_samples(unwrap(model), tokenizer, val[:4]))
    return config.out_dir / "model"


def load_reward_config(path: str | Path, overrides: list[str]) -> RewardConfig:
    return load_recipe(RewardConfig, path, overrides)
