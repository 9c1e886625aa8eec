"""Training commands: the tokenizer, and the recipe stages (pretrain, sft, reward, ppo, dpo, rejection-sample),
built from one table."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from lmforge.cli.common import Handler, Subcommands, add_recipe_flags, runs


def model_or_adapter(out: Path) -> str:
    return "adapter" if out.name == "adapter" else "model"


def tokenizer_train(args: argparse.Namespace) -> None:
    from lmforge.data.corpus import corpus_documents, source_names
    from lmforge.data.hub_datasets import is_hub_dataset
    from lmforge.tokenizer import train_t5_tokenizer, train_tokenizer

    paths, texts = args.input, None
    if any(is_hub_dataset(p) for p in args.input) or args.text_column != "text":
        source_names(args.input)  # a missing file is an error before any reading
        paths, texts = [], corpus_documents(args.input, split=args.split, column=args.text_column)
    if args.kind == "t5":
        tokenizer = train_t5_tokenizer(paths, args.vocab_size, args.out, extra_ids=args.extra_ids, texts=texts)
    else:
        tokenizer = train_tokenizer(paths, args.vocab_size, args.out, min_frequency=args.min_frequency, texts=texts)
    print(f"tokenizer with {tokenizer.vocab_size} tokens written to {args.out}")


def run_pretrain(args: argparse.Namespace) -> None:
    from lmforge.train.pretrain import load_pretrain_config, pretrain

    model_dir = pretrain(load_pretrain_config(args.config, args.overrides), resume=args.resume)
    print(f"model written to {model_dir}")


def run_sft(args: argparse.Namespace) -> None:
    from lmforge.train.sft import load_sft_config, sft

    out = sft(load_sft_config(args.config, args.overrides), resume=args.resume)
    print(f"{model_or_adapter(out)} written to {out}")


def run_reward(args: argparse.Namespace) -> None:
    from lmforge.align.reward import load_reward_config, train_reward

    out = train_reward(load_reward_config(args.config, args.overrides), resume=args.resume)
    print(f"reward model written to {out}")


def run_ppo(args: argparse.Namespace) -> None:
    from lmforge.align.ppo import load_ppo_config, ppo

    print(f"adapter written to {ppo(load_ppo_config(args.config, args.overrides), resume=args.resume)}")


def run_dpo(args: argparse.Namespace) -> None:
    from lmforge.align.dpo import load_dpo_config, train_dpo

    out = train_dpo(load_dpo_config(args.config, args.overrides), resume=args.resume)
    print(f"{model_or_adapter(out)} written to {out}")


def run_rejection_sampling(args: argparse.Namespace) -> None:
    from lmforge.align.rejection import load_rejection_config, rejection_sample

    config = load_rejection_config(args.config, args.overrides)
    out = rejection_sample(config)
    print(f"{model_or_adapter(out)} written to {out}; scores per round in {config.out_dir / 'rounds.jsonl'}")


@dataclass(frozen=True)
class RecipeCommand:
    """A stage run from a YAML recipe: `lmforge NAME --config FILE [key=value ...] [--resume]`."""

    name: str
    help: str
    description: str
    example: str  # the recipe to point at in --config's help
    overrides: str  # help of the key=value arguments, with examples
    run: Handler
    resumable: bool = True


DOTTED = "override recipe fields, dotted for sections"
RECIPE_COMMANDS = (
    RecipeCommand("pretrain", "pretrain a model on a text corpus",
                  "Pretrain with next-token prediction. Launch under torchrun for DDP/FSDP2 (train.strategy=ddp|fsdp).",
                  "configs/", f"{DOTTED} (train.steps=100 data.seq_len=128)", run_pretrain),
    RecipeCommand("sft", "fine-tune on conversations (or input/target pairs for T5): full, LoRA, QLoRA, prompt tuning",
                  "Supervised fine-tuning with the loss on assistant tokens only; a T5 base (by its config.json) "
                  "trains on input/target pairs with the loss on the target. The recipe's adapter.method picks "
                  "full, lora, qlora, prompt or selective.",
                  "configs/sft-tiny.yaml", f"{DOTTED} (adapter.method=qlora train.steps=50)", run_sft),
    RecipeCommand("reward", "train a reward model on preference pairs (Bradley–Terry)",
                  "Train a reward model: the base's trunk with a scalar head, Bradley–Terry loss on chosen/rejected "
                  "pairs (data.kind=safety for LLaMA-2's safety model). Writes a sequence-classification model to "
                  "out_dir/model.",
                  "configs/reward-tiny.yaml", f"{DOTTED} (data.kind=safety margin=0.5 train.steps=50)", run_reward),
    RecipeCommand("ppo", "RLHF with PPO against a reward model (per-token KL penalty, LoRA policy)",
                  "PPO from an SFT model: rollouts with the generation engine, reward-model score minus beta x KL to "
                  "the reference (the policy with adapters disabled), GAE, clipped policy and value losses, "
                  "adaptive KL.",
                  "configs/ppo-tiny.yaml", "override recipe fields (ppo.iterations=50)", run_ppo),
    RecipeCommand("dpo", "align a model with preference pairs by DPO",
                  "Direct Preference Optimization on {prompt, chosen, rejected} pairs. The reference is the starting "
                  "model (its adapters disabled, or a frozen copy). loss_type picks TRL's sigmoid (DPO), ipo or "
                  "sigmoid_norm (length-normalised); rpo_alpha adds that multiple of the chosen responses' NLL "
                  "(RPO). Launch under torchrun for DDP/FSDP2.",
                  "configs/dpo-tiny.yaml", f"{DOTTED} (beta=0.05 rpo_alpha=1.0 train.steps=50)", run_dpo),
    RecipeCommand("rejection-sample", "fine-tune on the best of K samples by a reward model (LLaMA-2)",
                  "Per round: sample K responses per prompt, keep the one the reward model scores best, fine-tune on "
                  "the kept ones with the SFT stage; the next round samples from the result. Per-round scores go to "
                  "OUT_DIR/rounds.jsonl.",
                  "configs/rejection-tiny.yaml", f"{DOTTED} (rounds=3 sampling.k=8)", run_rejection_sampling,
                  resumable=False),
)


def add_commands(sub: Subcommands) -> None:
    tokenizer = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer (decoders) or a T5 Unigram one")
    actions = tokenizer.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    train = runs(actions.add_parser("train", help="train on text/JSONL/Parquet files or folders",
                                    description="Train a tokenizer and save it in Hugging Face format: byte-level BPE "
                                                "for decoder models, or T5's Unigram with sentinel tokens for "
                                                "encoder-decoders (span-corruption pretraining)."),
                 tokenizer_train)
    train.add_argument("--input", nargs="+", required=True, type=Path, metavar="PATH",
                       help=".txt, .jsonl (text field) or .parquet (text column) files, folders of them, or Hub "
                            "datasets hf:org/name[:config][@revision]")
    train.add_argument("--split", default="train", help="the split of the Hub datasets (default train)")
    train.add_argument("--text-column", default="text",
                       help="the JSONL field, Parquet or Hub dataset column holding the text (default text)")
    train.add_argument("--kind", choices=("bpe", "t5"), default="bpe",
                       help="bpe: byte-level BPE (default); t5: SentencePiece-style Unigram as T5's, <pad> </s> <unk> "
                            "first and --extra-ids sentinels <extra_id_N> last")
    train.add_argument("--vocab-size", type=int, required=True,
                       help="vocabulary size: bpe counts the special tokens in it; t5 counts neither specials nor "
                            "sentinels, and a small corpus may yield fewer pieces")
    train.add_argument("--min-frequency", type=int, default=2, help="bpe: least count for a merge (default 2)")
    train.add_argument("--extra-ids", type=int, default=100, help="t5: sentinel tokens (default 100, as T5's)")
    train.add_argument("--out", type=Path, required=True, help="output directory (tokenizer.json + config)")

    for recipe in RECIPE_COMMANDS:
        p = runs(sub.add_parser(recipe.name, help=recipe.help, description=recipe.description), recipe.run)
        add_recipe_flags(p, recipe.example, recipe.overrides, recipe.resumable)
