"""Evaluation: metrics, JSONL and built-in world tasks with few-shot, chain-of-thought and chat
prompts, log-likelihood scoring with shared contexts, and an lm-evaluation-harness adapter
(`lmforge.eval.harness`, imported on demand: it needs lm-eval)."""

from lmforge.eval.builtin import BUILTIN_TASKS, world_task
from lmforge.eval.runner import evaluate, load_task, run_eval, summary
from lmforge.eval.scoring import loglikelihoods, rolling_loglikelihoods
from lmforge.eval.tasks import ChoiceItem, GenerationItem, Task, TextItem, load_task_file

__all__ = [
    "BUILTIN_TASKS", "ChoiceItem", "GenerationItem", "Task", "TextItem", "evaluate", "load_task", "load_task_file",
    "loglikelihoods", "rolling_loglikelihoods", "run_eval", "summary", "world_task",
]
