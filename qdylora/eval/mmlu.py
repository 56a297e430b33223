"""MMLU multiple choice: load QLoRA's JSONL or the cais/mmlu layout, build k-shot prompts, score by letter logits.

Scoring follows QLoRA and the original MMLU code: the prompt is the raw text (no chat template),
ending in "Answer:"; the prediction is the answer letter whose next-token logit at the prompt's
last token is highest. The letter tokens are the ones the tokenizer really produces after the
prompt: " A" (space + letter, as the answers in k-shot examples are written) when that encodes to
one extra token, else "A". The loss is the cross-entropy of the right letter over the whole
vocabulary at that position (QLoRA's `mmlu_loss`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.records import read_rows
from ..errors import ConfigError, DataError
from .common import (check_ranks, forward_logits, last_positions, length_batches, model_device, pad_batch,
                     progress_bar, ranks_restored, run_ranks)

LETTERS = "ABCDEFGHIJ"
HEADER_START = "The following are multiple choice questions (with answers) about"


@dataclass
class MMLUQuestion:
    """One question, from either layout: `prompt` (QLoRA's full zero-shot text) or `question` + `choices`."""

    subject: str
    answer: int  # index of the right choice: 0 = A
    question: str | None = None
    choices: list[str] | None = None
    prompt: str | None = None
    n_choices: int = 4
    where: str = ""  # "file, line N" for messages


@dataclass
class MMLUResult:
    """Accuracy of one model / rank: micro (over questions) and macro (mean over subjects), and letter loss."""

    accuracy_micro: float
    accuracy_macro: float
    loss: float
    n: int
    per_subject: dict[str, dict[str, float]]
    predictions: list[int] = field(default_factory=list)
    letter_logits: list[list[float]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy_micro, "accuracy_macro": self.accuracy_macro, "loss": self.loss,
                "n": self.n, "seconds": self.seconds}


# ---------------------------------------------------------------- loading

def _letter_index(value: Any, n: int, where: str, name: str) -> int:
    if isinstance(value, str) and value.strip().upper() in LETTERS[:n] and len(value.strip()) == 1:
        return LETTERS.index(value.strip().upper())
    if isinstance(value, (int,)) and not isinstance(value, bool) and 0 <= value < n:
        return int(value)
    if hasattr(value, "item"):  # numpy ints from parquet
        return _letter_index(value.item(), n, where, name)
    raise DataError(f"{where}: field '{name}' is {value!r}; it must be one of {', '.join(LETTERS[:n])} "
                        f"or an index 0..{n - 1}")


def parse_row(row: Any, where: str) -> MMLUQuestion:
    """One MMLUQuestion from a QLoRA row (input/output/subject) or a cais/mmlu row (question/choices/answer)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    subject = str(row.get("subject") or "unknown")
    if "input" in row or "output" in row:  # QLoRA layout
        for name in ("input", "output"):
            if name not in row:
                raise DataError(f"{where}: missing field '{name}' (QLoRA MMLU rows need 'input', 'output', "
                                    "'subject')")
        if not isinstance(row["input"], str) or not row["input"].strip():
            raise DataError(f"{where}: field 'input' must be the non-empty prompt text")
        return MMLUQuestion(subject=subject, answer=_letter_index(row["output"], 4, where, "output"),
                            prompt=row["input"], n_choices=4, where=where)
    if "question" in row or "choices" in row or "answer" in row:  # cais/mmlu layout
        for name in ("question", "choices", "answer"):
            if name not in row:
                raise DataError(f"{where}: missing field '{name}' (cais/mmlu rows need 'question', 'choices', "
                                    "'answer')")
        choices = row["choices"]
        if hasattr(choices, "tolist"):
            choices = choices.tolist()
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
            raise DataError(f"{where}: field 'choices' must be a list of 2 to {len(LETTERS)} answers")
        return MMLUQuestion(subject=subject, answer=_letter_index(row["answer"], len(choices), where, "answer"),
                            question=str(row["question"]), choices=[str(c) for c in choices],
                            n_choices=len(choices), where=where)
    raise DataError(f"{where}: fields {sorted(row)} fit no MMLU layout; a row needs 'input' + 'output' "
                        "(QLoRA) or 'question' + 'choices' + 'answer' (cais/mmlu)")


def _files_of(path: Path, split: str) -> list[Path]:
    files = sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl", ".parquet"))
    wanted = [p for p in files if split in p.name] or [p for p in files if "dev" not in p.name] or files
    if not wanted:
        raise DataError(f"{path} holds no .json/.jsonl/.parquet file")
    return wanted


def load_mmlu(source: str | Path, split: str = "validation", config: str = "all",
              limit: int | None = None) -> list[MMLUQuestion]:
    """Questions from a local file/folder (QLoRA JSONL, JSON, parquet) or a hub dataset name like cais/mmlu."""
    path = Path(source)
    if path.exists():
        rows = [r for f in ([path] if path.is_file() else _files_of(path, split)) for r in read_rows(f)]
    elif path.suffix in (".json", ".jsonl", ".parquet") or "/" in str(source) and Path(str(source)).parent.exists():
        raise DataError(f"MMLU data file {source} does not exist; check the path")
    else:
        try:
            from datasets import load_dataset

            ds = load_dataset(str(source), config, split=split)
        except Exception as e:
            raise DataError(f"could not load MMLU dataset '{source}' ({type(e).__name__}: {e}); offline, pass a "
                                "local file such as ../shared/data/mmlu/zero_shot_mmlu_val.jsonl") from e
        rows = [(f"dataset {source}, row {i + 1}", dict(r)) for i, r in enumerate(ds)]
    questions = [parse_row(r, where) for where, r in rows]
    if not questions:
        raise DataError(f"{source} holds no questions")
    return subset(questions, limit)


def subset(questions: list[MMLUQuestion], limit: int | None) -> list[MMLUQuestion]:
    """The first `limit` questions taken round-robin over subjects (every subject represented), in file order."""
    if limit is None or limit >= len(questions):
        return list(questions)
    if limit < 1:
        raise ConfigError(f"limit={limit} must be >= 1")
    by_subject: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        by_subject.setdefault(q.subject, []).append(i)
    picked, depth = [], 0
    while len(picked) < limit:
        for idx in by_subject.values():
            if depth < len(idx) and len(picked) < limit:
                picked.append(idx[depth])
        depth += 1
    return [questions[i] for i in sorted(picked)]


# ---------------------------------------------------------------- prompts

def header(subject: str) -> str:
    """MMLU's instruction line; like the original code (and QLoRA's files) it has two spaces after 'about'."""
    return f"{HEADER_START} {''.join(' ' + w for w in subject.split('_'))}.\n\n"


def split_prompt(q: MMLUQuestion) -> tuple[str, str]:
    """(header, body ending in 'Answer:') of a question."""
    if q.prompt is not None:
        # QLoRA rows carry the whole zero-shot prompt: the header is its first paragraph
        if q.prompt.startswith(HEADER_START) and "\n\n" in q.prompt:
            head, body = q.prompt.split("\n\n", 1)
            return head + "\n\n", body
        return "", q.prompt
    lines = [q.question] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices or [])]
    return header(q.subject), "\n".join(lines) + "\nAnswer:"


def build_prompt(q: MMLUQuestion, shots: Sequence[MMLUQuestion] = ()) -> str:
    """The prompt: header, then each shot's body + ' <letter>' and a blank line, then the question's body."""
    head, body = split_prompt(q)
    if not shots and q.prompt is not None:
        return q.prompt  # QLoRA's zero-shot text exactly as given
    examples = "".join(f"{split_prompt(s)[1]} {LETTERS[s.answer]}\n\n" for s in shots)
    return head + examples + body


def pick_shots(questions: Sequence[MMLUQuestion], k: int, seed: int = 0,
               pool: Sequence[MMLUQuestion] | None = None) -> list[list[MMLUQuestion]]:
    """For each question, k examples of its subject: the first k of `pool` (MMLU's dev split, the standard
    k-shot prompt), or without a pool k other questions of the evaluated split drawn with a fixed seed."""
    if k < 0:
        raise ConfigError(f"shots={k} must be >= 0")
    if k == 0:
        return [[] for _ in questions]
    by_subject: dict[str, list[MMLUQuestion]] = {}
    for p in (questions if pool is None else pool):
        by_subject.setdefault(p.subject, []).append(p)
    if pool is not None:
        return [by_subject.get(q.subject, [])[:k] for q in questions]
    out = []
    for i, q in enumerate(questions):
        others = [p for p in by_subject.get(q.subject, []) if p is not q]
        rng = random.Random(f"{seed}:{q.subject}:{i}")  # str seeds are hashed deterministically (sha512)
        out.append(rng.sample(others, min(k, len(others))))
    return out


def dev_pool(data: str | None, shots_data: str | None = None) -> list[MMLUQuestion] | None:
    """MMLU's dev split for k-shot prompts: `shots_data`, else the dev files of a `data` folder; None if neither."""
    if shots_data:
        return load_mmlu(shots_data, split="dev")
    path = Path(data) if data else None
    if path is None or not path.is_dir():
        return None
    devs = [f for f in sorted(path.rglob("*")) if f.suffix in (".json", ".jsonl", ".parquet") and "dev" in f.name]
    return [parse_row(r, where) for f in devs for where, r in read_rows(f)] or None


def answer_token_ids(tokenizer, prompt: str, n_choices: int = 4) -> tuple[list[int], str]:
    """(token id of each letter after `prompt`, the separator used: ' ' or ''); see the module docstring."""
    base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for sep in (" ", ""):
        ids = []
        for letter in LETTERS[:n_choices]:
            full = tokenizer(prompt + sep + letter, add_special_tokens=False)["input_ids"]
            if len(full) == len(base) + 1 and full[:len(base)] == base:
                ids.append(full[-1])
        if len(ids) == n_choices and len(set(ids)) == n_choices:
            return ids, sep
    raise DataError("this tokenizer does not encode the answer letters as one token after the prompt "
                        f"(tried ' A' and 'A' after {prompt[-20:]!r}); MMLU letter scoring needs that")


# ---------------------------------------------------------------- scoring

def score_questions(model: nn.Module, tokenizer, questions: Sequence[MMLUQuestion], ranks: Sequence[int] | None = None,
                    shots: int = 0, seed: int = 0, batch_size: int = 8, batched_ranks: bool = False,
                    padding_side: str | None = None, shot_pool: Sequence[MMLUQuestion] | None = None,
                    progress: bool | tqdm = True) -> dict[int | None, MMLUResult]:
    """MMLU results per rank (0 = base without adapter; ranks=None: the model as it is)."""
    ranks = check_ranks(model, ranks)
    if not questions:
        raise DataError("no MMLU questions to evaluate")
    prompts = [build_prompt(q, s) for q, s in zip(questions, pick_shots(questions, shots, seed, shot_pool))]
    letter_sets = {}
    for n in sorted({q.n_choices for q in questions}):
        letter_sets[n] = answer_token_ids(tokenizer, next(p for p, q in zip(prompts, questions) if q.n_choices == n), n)[0]
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    side = padding_side or getattr(tokenizer, "padding_side", "right") or "right"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = model_device(model)
    width = max(letter_sets)  # letter logits padded with -inf to the widest question
    batches = length_batches([len(e) for e in encoded], batch_size)
    keys = ranks if ranks is not None else [None]
    rows: dict = {r: [None] * len(questions) for r in keys}
    seconds: dict = {}
    bar, own_bar = progress_bar(progress, len(batches) * (1 if batched_ranks or ranks is None else len(keys)), "mmlu")

    with ranks_restored(model), torch.no_grad():
        for batch in batches:
            ids, mask = pad_batch([encoded[i] for i in batch], pad_id, side, device)
            answers = torch.tensor([letter_sets[questions[i].n_choices][questions[i].answer] for i in batch], device=device)
            letters = torch.tensor([letter_sets[questions[i].n_choices] + [-1] * (width - questions[i].n_choices)
                                    for i in batch], device=device)
            reps = lambda t, m: t.repeat(m // t.shape[0], *([1] * (t.dim() - 1)))  # noqa: E731

            def fn(ids_, mask_):
                # logits only at positions where some row ends (left padding: just the last one)
                last = last_positions(mask_)
                first = int(last.min())
                logits = forward_logits(model, ids_, mask_, keep=ids_.shape[1] - first)
                at = logits[torch.arange(ids_.shape[0], device=device), last - (ids_.shape[1] - logits.shape[1])].float()
                let = reps(letters, ids_.shape[0])
                letter_logits = torch.where(let >= 0, at.gather(1, let.clamp(min=0)), float("-inf"))
                loss = F.cross_entropy(at, reps(answers, ids_.shape[0]), reduction="none")
                return torch.cat([letter_logits, loss[:, None]], dim=1).cpu()

            for r, out in run_ranks(model, ids, mask, ranks, batched_ranks, fn, seconds).items():
                for j, i in enumerate(batch):
                    rows[r][i] = out[j]
                if not (batched_ranks and ranks is not None) and bar is not None:
                    bar.update(1)
            if batched_ranks and ranks is not None and bar is not None:
                bar.update(1)
    if own_bar:
        bar.close()
    return {r: _summarise(questions, torch.stack(rows[r]), seconds.get(r, 0.0)) for r in keys}


def _summarise(questions: Sequence[MMLUQuestion], rows: torch.Tensor, seconds: float) -> MMLUResult:
    letter_logits, loss = rows[:, :-1], rows[:, -1]
    preds = letter_logits.argmax(dim=1).tolist()
    correct = [int(p == q.answer) for p, q in zip(preds, questions)]
    per: dict[str, list[int]] = {}
    for c, q in zip(correct, questions):
        per.setdefault(q.subject, []).append(c)
    per_subject = {s: {"accuracy": sum(v) / len(v), "n": len(v)} for s, v in sorted(per.items())}
    return MMLUResult(
        accuracy_micro=sum(correct) / len(correct),
        accuracy_macro=sum(v["accuracy"] for v in per_subject.values()) / len(per_subject),
        loss=float(loss.mean()), n=len(correct), per_subject=per_subject, predictions=preds,
        letter_logits=[[float(x) for x in row if x != float("-inf")] for row in letter_logits], seconds=seconds,
    )
