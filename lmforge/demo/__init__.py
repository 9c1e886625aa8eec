"""`lmforge demo`: the whole pipeline on the built-in world, one module per stage, with numbers,
plots, `report.md` and `summary.json`.

Stages: pretraining (the world's corpus, a BPE tokenizer, a small Llama-family model, the facts it
learnt), finetuning (LoRA instruction tuning, few-shot prompting), alignment (reward models, DPO,
PPO, safety), retrieval (a context store, grounded answers, the ReAct agent); `report` writes the
summary and the files, `pipeline` runs it all."""

from lmforge.demo.pipeline import run_demo

__all__ = ["run_demo"]
