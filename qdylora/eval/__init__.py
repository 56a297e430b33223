"""Evaluators for rank sweeps: MMLU multiple choice, held-out loss, exact match on the default task."""

from .common import BASE_RANK
from .exact_match import default_records, evaluate_exact_match
from .loss import LossResult, evaluate_examples, evaluate_loss
from .mmlu import MMLUQuestion, MMLUResult, build_prompt, load_mmlu, pick_shots, score_questions

__all__ = [
    "BASE_RANK", "LossResult", "MMLUQuestion", "MMLUResult", "build_prompt", "default_records",
    "evaluate_examples", "evaluate_exact_match", "evaluate_loss", "load_mmlu", "pick_shots", "score_questions",
]
