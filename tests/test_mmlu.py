"""MMLU evaluator: data formats, prompts, letter scoring against hand-computed numbers, padding, batched ranks."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import (QLORA_ROWS, SHARED_MMLU, bpe_tokenizer, needs_shared, tiny_qdylora, tiny_tokenizer,  # noqa: E402
                     write_jsonl)

from qdylora.errors import DataError as EvalDataError  # noqa: E402
from qdylora.eval.mmlu import (answer_token_ids, build_prompt, header, load_mmlu, pick_shots,  # noqa: E402
                               score_questions, subset)

HF_ROWS = [
    {"question": "What is 1+1?", "choices": ["2", "3", "4", "5"], "answer": 0, "subject": "elementary_mathematics"},
    {"question": "What is 2+2?", "choices": ["2", "3", "4", "5"], "answer": 2, "subject": "elementary_mathematics"},
    {"question": "Cells have a?", "choices": ["wheel", "membrane", "engine", "roof"], "answer": 1, "subject": "biology"},
]


# ------------------------------------------------------------------ stub model with known letter logits

class StubLM(nn.Module):
    """Causal stub: at each real token, the logits are table[ids of the prefix so far] (zeros elsewhere)."""

    def __init__(self, vocab_size: int, table: dict[tuple[int, ...], dict[int, float]], keep_arg: bool = True):
        super().__init__()
        self.vocab_size, self.table, self.calls = vocab_size, table, []
        if not keep_arg:
            self.forward = self._forward_plain  # a model without logits_to_keep

    def _logits(self, input_ids, attention_mask):
        B, L = input_ids.shape
        logits = torch.zeros(B, L, self.vocab_size)
        for b in range(B):
            real = attention_mask[b].nonzero()[:, 0].tolist()
            ids = input_ids[b, real].tolist()
            for j, t in enumerate(real):
                for tok, val in self.table.get(tuple(ids[:j + 1]), {}).items():
                    logits[b, t, tok] = val
        return logits

    def forward(self, input_ids, attention_mask, position_ids=None, logits_to_keep=0, **kwargs):
        self.calls.append(input_ids.shape)
        logits = self._logits(input_ids, attention_mask)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits)

    def _forward_plain(self, input_ids, attention_mask, position_ids=None, **kwargs):
        return SimpleNamespace(logits=self._logits(input_ids, attention_mask))


def stub_for(questions, tok, letter_logits: list[dict[str, float]]):
    letter_ids, _ = answer_token_ids(tok, build_prompt(questions[0]))
    table = {}
    for q, ll in zip(questions, letter_logits):
        key = tuple(tok(build_prompt(q))["input_ids"])
        table[key] = {letter_ids["ABCD".index(k)]: v for k, v in ll.items()}
    return StubLM(len(tok), table)


# ------------------------------------------------------------------ tests

def test_header_matches_qlora_file_format():
    # QLoRA's (and the original MMLU code's) header has two spaces after "about"
    assert header("abstract_algebra") == ("The following are multiple choice questions (with answers) about  "
                                          "abstract algebra.\n\n")


def test_qlora_jsonl_and_hf_layouts_give_the_same_prompts(tmp_path):
    q_qlora = load_mmlu(write_jsonl(tmp_path / "q.jsonl", QLORA_ROWS))
    hf = [dict(r, subject=q["subject"]) for r, q in zip(HF_ROWS, QLORA_ROWS)]
    q_hf = load_mmlu(write_jsonl(tmp_path / "h.jsonl", hf))
    assert [q.answer for q in q_qlora] == [0, 2, 1] == [q.answer for q in q_hf]
    assert [build_prompt(q) for q in q_qlora] == [build_prompt(q) for q in q_hf] == [r["input"] for r in QLORA_ROWS]


def test_json_array_jsonl_named_json_and_parquet(tmp_path):
    (tmp_path / "arr.json").write_text(json.dumps(HF_ROWS))
    assert [q.answer for q in load_mmlu(tmp_path / "arr.json")] == [0, 2, 1]
    # QLoRA ships JSON Lines under a .json name
    assert len(load_mmlu(write_jsonl(tmp_path / "zero_shot_mmlu_val.json", QLORA_ROWS))) == 3
    import pandas as pd

    folder = tmp_path / "cais_mmlu" / "all"
    folder.mkdir(parents=True)
    pd.DataFrame(HF_ROWS).to_parquet(folder / "validation-00000-of-00001.parquet")
    pd.DataFrame(HF_ROWS[:1]).to_parquet(folder / "test-00000-of-00001.parquet")
    qs = load_mmlu(tmp_path / "cais_mmlu", split="validation")
    assert [(q.subject, q.answer, q.choices) for q in qs] == [(r["subject"], r["answer"], r["choices"]) for r in HF_ROWS]


def test_k_shot_prompts_hand_written(tmp_path):
    qs = load_mmlu(write_jsonl(tmp_path / "h.jsonl", HF_ROWS))
    shots = pick_shots(qs, 1, seed=0)
    assert shots[0] == [qs[1]] and shots[1] == [qs[0]]  # the only other question of the subject
    assert shots[2] == []  # biology has no other question: fewer shots, not another subject's
    expected = ("The following are multiple choice questions (with answers) about  elementary mathematics.\n\n"
                "What is 2+2?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer: C\n\n"
                "What is 1+1?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer:")
    assert build_prompt(qs[0], shots[0]) == expected
    # QLoRA rows: shots are other rows' inputs (without their header) + the answer letter
    ql = load_mmlu(write_jsonl(tmp_path / "q.jsonl", QLORA_ROWS))
    assert build_prompt(ql[1], [ql[0]]) == (header("algebra") + "What is 1+1?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer: A\n\n"
                                            "What is 2+2?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer:")


def test_shots_are_seeded_and_from_the_same_subject():
    from qdylora.eval.mmlu import MMLUQuestion

    qs = [MMLUQuestion(subject=s, answer=i % 4, question=f"q{i}", choices=list("wxyz"))
          for i, s in enumerate(["a"] * 10 + ["b"] * 10)]
    s1, s2, s3 = pick_shots(qs, 3, seed=1), pick_shots(qs, 3, seed=1), pick_shots(qs, 3, seed=2)
    assert s1 == s2 and s1 != s3
    for q, shots in zip(qs, s1):
        assert len(shots) == 3 and q not in shots and all(s.subject == q.subject for s in shots)


def test_subset_is_round_robin_over_subjects():
    from qdylora.eval.mmlu import MMLUQuestion

    qs = [MMLUQuestion(subject=s, answer=0, prompt=f"p{i}") for i, s in enumerate("aaabbc")]
    assert [q.prompt for q in subset(qs, 4)] == ["p0", "p1", "p3", "p5"]


def test_scoring_against_hand_computed_example(tmp_path):
    tok = tiny_tokenizer()
    qs = load_mmlu(write_jsonl(tmp_path / "q.jsonl", QLORA_ROWS))
    # answers A, C, B; the stub prefers A (right), D (wrong), B (right)
    logits = [{"A": 2.0, "B": 1.0}, {"D": 3.0, "C": 0.5}, {"B": 1.5}]
    stub = stub_for(qs, tok, logits)
    res = score_questions(stub, tok, qs, progress=False)[None]
    assert res.predictions == [0, 3, 1]
    assert res.accuracy_micro == pytest.approx(2 / 3)
    assert res.accuracy_macro == pytest.approx((1 / 2 + 1) / 2)  # algebra 1/2, biology 1/1
    assert res.per_subject == {"algebra": {"accuracy": 0.5, "n": 2}, "biology": {"accuracy": 1.0, "n": 1}}
    V = len(tok)
    # full-vocabulary cross-entropy of the right letter; every other logit is 0
    losses = [math.log(V - 2 + math.exp(2) + math.exp(1)) - 2.0,
              math.log(V - 2 + math.exp(3) + math.exp(0.5)) - 0.5,
              math.log(V - 1 + math.exp(1.5)) - 1.5]
    assert res.loss == pytest.approx(sum(losses) / 3, rel=1e-5)
    assert res.letter_logits[0] == [2.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("keep_arg", [True, False])
def test_stub_scores_do_not_depend_on_padding_or_batching(tmp_path, side, keep_arg):
    tok = tiny_tokenizer(side)
    qs = load_mmlu(write_jsonl(tmp_path / "q.jsonl", QLORA_ROWS))
    stub = stub_for(qs, tok, [{"A": 2.0}, {"D": 3.0}, {"B": 1.5}])
    if not keep_arg:
        stub.forward = stub._forward_plain
    one = score_questions(stub, tok, qs, batch_size=1, progress=False)[None]
    many = score_questions(stub, tok, qs, batch_size=3, progress=False)[None]
    assert one.predictions == many.predictions == [0, 3, 1]
    assert one.loss == pytest.approx(many.loss)


def test_letter_tokens_prefer_space_letter():
    tok = tiny_tokenizer()
    ids, sep = answer_token_ids(tok, "Answer:")
    assert sep == " " and ids == [tok.convert_tokens_to_ids(c) for c in "ABCD"]


def test_bpe_tokenizer_scores_the_space_letter_tokens(tmp_path):
    """A BPE tokenizer tells " A" from "A" (the word-level one cannot): the letters scored are " A".." D",
    the tokens that follow "Answer:" in k-shot examples, even where the bare letters have higher logits."""
    tok = bpe_tokenizer()
    space = [tok.convert_tokens_to_ids("\u0120" + c) for c in "ABCD"]
    bare = [tok.convert_tokens_to_ids(c) for c in "ABCD"]
    assert len(set(space + bare)) == 8 and tok.unk_token_id not in space + bare
    qs = load_mmlu(write_jsonl(tmp_path / "q.jsonl", QLORA_ROWS))  # answers A, C, B
    assert answer_token_ids(tok, build_prompt(qs[0])) == (space, " ")
    logits = [{space[0]: 1.0, space[1]: 2.0, bare[0]: 9.0},  # " B" wins (wrong); bare "A" would have won
              {space[2]: 3.0, bare[3]: 8.0},  # " C" (right); bare "D" would have won
              {space[1]: 0.5, bare[1]: -4.0, space[3]: 0.25}]  # " B" (right)
    stub = StubLM(len(tok), {tuple(tok(build_prompt(q))["input_ids"]): ll for q, ll in zip(qs, logits)})
    res = score_questions(stub, tok, qs, batch_size=2, progress=False)[None]
    assert res.predictions == [1, 2, 1] and res.accuracy_micro == pytest.approx(2 / 3)
    assert res.letter_logits == [[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0], [0.0, 0.5, 0.0, 0.25]]
    V = len(tok)  # every other logit is 0: cross-entropy of the right " letter" over the vocabulary
    losses = [math.log(V - 3 + math.exp(1) + math.exp(2) + math.exp(9)) - 1.0,
              math.log(V - 2 + math.exp(3) + math.exp(8)) - 3.0,
              math.log(V - 3 + math.exp(0.5) + math.exp(-4) + math.exp(0.25)) - 0.5]
    assert res.loss == pytest.approx(sum(losses) / 3, rel=1e-5)


def test_left_and_right_padding_give_the_same_scores(tmp_path):
    model, tok = tiny_qdylora()
    qs = load_mmlu(write_jsonl(tmp_path / "q.jsonl", QLORA_ROWS * 2))
    kw = dict(ranks=[0, 2, 8], batch_size=6, progress=False)
    left = score_questions(model, tok, qs, padding_side="left", **kw)
    right = score_questions(model, tok, qs, padding_side="right", **kw)
    single = score_questions(model, tok, qs, padding_side="right", ranks=[0, 2, 8], batch_size=1, progress=False)
    for r in (0, 2, 8):
        assert torch.allclose(torch.tensor(left[r].letter_logits), torch.tensor(right[r].letter_logits), atol=1e-4)
        assert torch.allclose(torch.tensor(single[r].letter_logits), torch.tensor(right[r].letter_logits), atol=1e-4)
        assert left[r].predictions == right[r].predictions == single[r].predictions


def test_batched_ranks_equal_separate_passes(tmp_path):
    model, tok = tiny_qdylora()
    qs = load_mmlu(write_jsonl(tmp_path / "q.jsonl", QLORA_ROWS * 3))
    ranks = [0, 1, 3, 8]
    sep = score_questions(model, tok, qs, ranks=ranks, batch_size=4, progress=False)
    bat = score_questions(model, tok, qs, ranks=ranks, batch_size=4, batched_ranks=True, progress=False)
    for r in ranks:
        assert torch.allclose(torch.tensor(sep[r].letter_logits), torch.tensor(bat[r].letter_logits), atol=1e-5)
        assert sep[r].predictions == bat[r].predictions
        assert sep[r].accuracy_micro == bat[r].accuracy_micro and sep[r].loss == pytest.approx(bat[r].loss, rel=1e-5)
    # the ranks really differ, and rank 0 is the base model without adapter
    assert sep[1].letter_logits != sep[8].letter_logits
    with model.disable_adapter():
        base = score_questions(model, tok, qs, ranks=None, batch_size=4, progress=False)[None]
    assert torch.allclose(torch.tensor(base.letter_logits), torch.tensor(sep[0].letter_logits), atol=1e-5)


def test_evaluation_restores_the_rank(tmp_path):
    from qdylora.adapters.attach import dylora_layers, set_rank

    model, tok = tiny_qdylora()
    set_rank(model, 5)
    model.train()
    score_questions(model, tok, load_mmlu(write_jsonl(tmp_path / "q.jsonl", QLORA_ROWS)), ranks=[0, 2],
                    batched_ranks=True, progress=False)
    assert all(layer.rank == 5 for layer in dylora_layers(model)) and model.training


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("row,field", [
    ({"subject": "x", "input": "Q\nAnswer:"}, "output"),
    ({"subject": "x", "output": "A"}, "input"),
    ({"question": "q", "answer": 1}, "choices"),
    ({"question": "q", "choices": ["a", "b"]}, "answer"),
])
def test_missing_field_names_field_and_line(tmp_path, row, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [QLORA_ROWS[0], row])
    with pytest.raises(EvalDataError, match=rf"bad.jsonl, line 2: missing field '{field}'"):
        load_mmlu(path)


def test_bad_answer_and_unknown_layout_and_missing_file(tmp_path):
    with pytest.raises(EvalDataError, match=r"line 1: field 'output' is 'E'"):
        load_mmlu(write_jsonl(tmp_path / "a.jsonl", [dict(QLORA_ROWS[0], output="E")]))
    with pytest.raises(EvalDataError, match=r"line 1: fields \['foo'\] fit no MMLU layout"):
        load_mmlu(write_jsonl(tmp_path / "b.jsonl", [{"foo": 1}]))
    with pytest.raises(EvalDataError, match="line 1: not valid JSON"):
        (tmp_path / "c.jsonl").write_text("{oops\n")
        load_mmlu(tmp_path / "c.jsonl")
    with pytest.raises(EvalDataError, match="does not exist"):
        load_mmlu(tmp_path / "missing.jsonl")


@needs_shared(SHARED_MMLU)
def test_shared_qlora_file_loads():
    qs = load_mmlu(SHARED_MMLU)
    assert len(qs) == 1531 and len({q.subject for q in qs}) == 57
    assert all(build_prompt(q) == q.prompt and q.prompt.endswith("Answer:") for q in qs[:50])
    small = load_mmlu(SHARED_MMLU, limit=57)
    assert len({q.subject for q in small}) == 57


@pytest.mark.slow
def test_smollm2_tokenizer_uses_space_letter():
    from qdylora.load.model import load_tokenizer

    tok = load_tokenizer()
    ids, sep = answer_token_ids(tok, QLORA_ROWS[0]["input"])
    assert sep == " " and len(set(ids)) == 4
    assert ids == [tok(" " + c, add_special_tokens=False)["input_ids"][0] for c in "ABCD"]


def test_k_shot_examples_come_from_the_dev_split_in_order(tmp_path):
    import pandas as pd

    from qdylora.eval.mmlu import dev_pool

    folder = tmp_path / "cais_mmlu" / "all"
    folder.mkdir(parents=True)
    dev = [{"question": f"Dev {i}?", "subject": "elementary_mathematics", "choices": ["1", "2", "3", "4"],
            "answer": i % 4} for i in range(5)]
    pd.DataFrame(HF_ROWS).to_parquet(folder / "validation-00000-of-00001.parquet")
    pd.DataFrame(dev).to_parquet(folder / "dev-00000-of-00001.parquet")
    qs = load_mmlu(tmp_path / "cais_mmlu")  # the validation split only: dev questions are not evaluated
    assert [q.question for q in qs] == [r["question"] for r in HF_ROWS]
    pool = dev_pool(str(tmp_path / "cais_mmlu"))
    assert dev_pool(str(tmp_path / "cais_mmlu" / "all" / "validation-00000-of-00001.parquet")) is None
    shots = pick_shots(qs, 3, seed=7, pool=pool)
    # MMLU's standard k-shot prompt: the subject's first k dev questions, whatever the seed
    assert [s.question for s in shots[0]] == ["Dev 0?", "Dev 1?", "Dev 2?"] == [s.question for s in shots[1]]
    assert shots[2] == []  # no biology in dev
    head = "The following are multiple choice questions (with answers) about  elementary mathematics.\n\n"
    assert build_prompt(qs[0], shots[0][:1]) == (head + "Dev 0?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: A\n\n"
                                                 "What is 1+1?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer:")
