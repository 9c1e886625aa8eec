"""Evaluation: metrics, JSONL tasks and a registry of named tasks, with few-shot, chain-of-thought
and chat prompts, log-likelihood scoring with shared contexts, holistic metric groups (calibration,
selective answering, robustness, fairness, toxicity, efficiency: `lmforge.eval.holistic`, its report
in `lmforge.eval.report`), and an lm-evaluation-harness adapter (`lmforge.eval.harness`, imported on
demand: it needs lm-eval)."""

from lmforge.eval.registry import build_task, register_task, registered_tasks
from lmforge.eval.runner import evaluate, load_task, run_eval, summary
from lmforge.eval.scoring import loglikelihoods, rolling_loglikelihoods
from lmforge.eval.tasks import ChoiceItem, GenerationItem, Task, TextItem, load_task_file

__all__ = [
    "ChoiceItem", "GenerationItem", "Task", "TextItem", "build_task", "evaluate", "load_task", "load_task_file",
    "loglikelihoods", "register_task", "registered_tasks", "rolling_loglikelihoods", "run_eval", "summary",
]
