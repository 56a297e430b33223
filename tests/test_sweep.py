"""Rank sweeps: held-out loss / exact match per rank, batched ranks, the sweep command's files, bad input."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import (QLORA_ROWS, randomize_adapters, tiny_llama, tiny_qdylora, tiny_tokenizer,  # noqa: E402
                     write_jsonl)

from qdylora.adapters.config import ConfigError  # noqa: E402
from qdylora.eval.loss import encode_records, evaluate_loss  # noqa: E402

RECORDS = [
    {"instruction": "Name the colour of the sky.", "input": "", "output": "blue"},
    {"instruction": "Name the colour of grass.", "input": "", "output": "green"},
    {"instruction": "What is 1 + 2?", "input": "", "output": "3"},
    {"instruction": "Name the colour of the sun.", "input": "sky", "output": "yellow"},
    {"text": "The sky is blue and the grass is green."},
]


@pytest.fixture(scope="module")
def tiny():
    return tiny_qdylora(r_max=8, seed=1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny):
    """A base model folder (tiny Llama + tokenizer) and an adapter trained on it (random values)."""
    from qdylora.adapters.files import save_adapter
    from qdylora.adapters.config import QDyLoRAConfig
    from qdylora.load.model import load_model_and_tokenizer
    from qdylora.adapters.attach import attach_adapters

    root = tmp_path_factory.mktemp("sweep")
    tok = tiny_tokenizer()
    tiny_llama(3, tokenizer=tok).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    base, _ = load_model_and_tokenizer(str(root / "base"), device="cpu")
    pm = attach_adapters(base, QDyLoRAConfig(r_min=2, r_max=8, alpha=8.0))
    randomize_adapters(pm, seed=3)
    save_adapter(pm, root / "adapter")
    write_jsonl(root / "mmlu.jsonl", QLORA_ROWS)
    write_jsonl(root / "heldout.jsonl", RECORDS)
    return root


def test_loss_matches_a_hand_computed_cross_entropy(tiny):
    model, tok = tiny
    from qdylora.eval.common import apply_rank

    ex = encode_records(RECORDS[:2], tok, 512)
    res = evaluate_loss(model, tok, RECORDS[:2], ranks=[4], progress=False)[4]
    apply_rank(model, 4)
    nll, count = 0.0, 0
    with torch.no_grad():
        for e in ex:
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1]
            lab = torch.tensor(e["labels"][1:])
            keep = lab != -100
            nll += float(torch.nn.functional.cross_entropy(logits[keep], lab[keep], reduction="sum"))
            count += int(keep.sum())
    assert res.n_tokens == count and res.loss == pytest.approx(nll / count, rel=1e-4)


def test_loss_batched_ranks_and_padding_sides_agree(tiny):
    model, tok = tiny
    ranks = [0, 1, 4, 8]
    sep = evaluate_loss(model, tok, RECORDS, ranks, batch_size=3, padding_side="right", progress=False)
    bat = evaluate_loss(model, tok, RECORDS, ranks, batch_size=3, padding_side="left", batched_ranks=True,
                        progress=False)
    for r in ranks:
        assert bat[r].loss == pytest.approx(sep[r].loss, rel=1e-5)
        assert bat[r].token_accuracy == sep[r].token_accuracy and bat[r].exact_match == sep[r].exact_match
    assert sep[1].loss != pytest.approx(sep[8].loss, rel=1e-6)


def _greedy_exact_match(model, tok, records) -> float:
    """Reference: decode each prompt greedily with generate() and compare with output + EOS token by token."""
    from qdylora.data.examples import format_example

    hits = 0
    for rec in records:
        prompt, response = format_example(rec, tok)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        target = tok(response, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([p_ids]), attention_mask=torch.ones(1, len(p_ids), dtype=torch.long),
                                 max_new_tokens=len(target), min_new_tokens=len(target), do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=None)
        hits += int(out[0, len(p_ids):].tolist() == target)
    return hits / len(records)


def test_exact_match_equals_greedy_decoding(tiny):
    from qdylora.eval.common import apply_rank
    from qdylora.eval.exact_match import default_records, evaluate_exact_match

    model, tok = tiny
    records = default_records(8)
    ours = evaluate_exact_match(model, tok, records, ranks=[2], batch_size=4, progress=False)[2]
    apply_rank(model, 2)
    model.eval()
    assert ours.exact_match == _greedy_exact_match(model, tok, records)
    # a model that always says EOS answers "" exactly and "blue" not: 1 of 2
    plain = tiny_llama(tokenizer=tok)
    plain.lm_head = torch.nn.Linear(64, len(tok), bias=True)
    with torch.no_grad():
        plain.lm_head.weight.zero_()
        plain.lm_head.bias.zero_()
        plain.lm_head.bias[tok.eos_token_id] = 10.0
    recs = [dict(RECORDS[0], output=""), RECORDS[0]]
    res = evaluate_exact_match(plain, tok, recs, ranks=None, batch_size=2, padding_side="left", progress=False)[None]
    assert res.exact_match == 0.5 == _greedy_exact_match(plain, tok, recs)


def test_sweep_cli_writes_table_json_csv_png(saved, capsys):
    from qdylora.cli import main

    out = saved / "out"
    rc = main(["sweep", str(saved / "adapter"), "--ranks", "2,4,8", "--task", "mmlu", "--data",
               str(saved / "mmlu.jsonl"), "--output", str(out), "--batched-ranks", "--batch-size", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "base" in printed and "acc.macro" in printed
    data = json.loads((out / "sweep_mmlu.json").read_text())
    assert [r["label"] for r in data["rows"]] == ["base", "2", "4", "8"]
    assert set(data["per_subject"]["8"]) == {"algebra", "biology"}
    rows = list(csv.DictReader(open(out / "sweep_mmlu.csv")))
    assert [r["rank"] for r in rows] == ["0", "2", "4", "8"]
    assert (out / "sweep_mmlu.png").stat().st_size > 1000


def test_sweep_api_loss_and_default_tasks(saved):
    from qdylora.eval.sweep import sweep

    res = sweep(saved / "adapter", [2, 8], task="loss", data=str(saved / "heldout.jsonl"), batch_size=2,
                progress=False)
    assert [r["rank"] for r in res.rows] == [0, 2, 8] and (saved / "adapter" / "sweep_loss.csv").exists()
    assert all(r["perplexity"] == pytest.approx(torch.tensor(r["loss"]).exp().item(), rel=1e-4) for r in res.rows)
    sep = sweep(saved / "adapter", [2, 8], task="default", limit=6, batch_size=3, progress=False, save=False)
    bat = sweep(saved / "adapter", [2, 8], task="default", limit=6, batch_size=3, progress=False, save=False,
                batched_ranks=True)
    for a, b in zip(sep.rows, bat.rows):
        assert a["rank"] == b["rank"] and a["accuracy"] == b["accuracy"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_unknown_task_and_rank_outside_the_range(saved):
    from qdylora.cli import main
    from qdylora.eval.sweep import check_task, parse_ranks, sweep

    with pytest.raises(ValueError, match="unknown task 'bogus'; use one of mmlu, loss, default"):
        check_task("bogus")
    with pytest.raises(ValueError, match="unknown task"):
        sweep(saved / "adapter", [2], task="bogus")
    assert main(["sweep", str(saved / "adapter"), "--task", "bogus"]) == 2  # argparse refuses it, listing the choices
    # the adapter covers ranks 2..8: 1 and 9 are refused before any model loads
    for bad in (1, 9):
        with pytest.raises(ConfigError, match=rf"rank {bad} is outside this adapter's range \[2, 8\]"):
            sweep(saved / "adapter", [2, bad], task="default")
    with pytest.raises(ValueError, match="not a rank"):
        parse_ranks("1,x")
    assert parse_ranks("1-3,8,2") == [1, 2, 3, 8]


def test_cli_bad_data_says_file_line_and_field(saved, capsys):
    from qdylora.cli import main

    bad = write_jsonl(saved / "bad_mmlu.jsonl", [QLORA_ROWS[0], {"subject": "x", "input": "Q?\nAnswer:"}])
    assert main(["sweep", str(saved / "adapter"), "--task", "mmlu", "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad_mmlu.jsonl, line 2: missing field 'output'" in err
    assert main(["sweep", str(saved / "adapter"), "--task", "mmlu"]) == 2
    assert "--task mmlu needs --data" in capsys.readouterr().err
    bad_loss = write_jsonl(saved / "bad_loss.jsonl", [RECORDS[0], {"instruction": "no output"}])
    assert main(["sweep", str(saved / "adapter"), "--task", "loss", "--data", str(bad_loss)]) == 2
    assert "bad_loss.jsonl, line 2" in capsys.readouterr().err


def test_ranks_on_a_model_without_adapters_are_refused(tiny):
    from qdylora.eval.common import check_ranks

    _, tok = tiny
    plain = tiny_llama(tokenizer=tok)
    with pytest.raises(ValueError, match="no qdylora adapters"):
        check_ranks(plain, [4])
    assert check_ranks(plain, None) is None


def test_resolve_base(saved):
    from qdylora.adapters.files import read_adapter
    from qdylora.eval.sweep import resolve_base

    meta, _ = read_adapter(saved / "adapter")
    assert resolve_base(meta) == str((saved / "base").resolve())
    assert resolve_base(meta, "other") == "other"
    with pytest.raises(ValueError, match="pass it with --model"):
        resolve_base({"base_model": {"name": "LlamaForCausalLM"}})


def test_logits_at_runs_the_head_on_the_marked_positions_only(tiny, monkeypatch):
    from qdylora.eval.common import apply_rank, logits_at

    model, _ = tiny
    apply_rank(model, 4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.get_input_embeddings().num_embeddings, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    at = torch.rand(3, 9, generator=g) < 0.4
    at[1, -3:] = False
    at[2] = False  # a row with no marked position
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask,
                     position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        head_rows = []
        handle = model.get_output_embeddings().register_forward_hook(
            lambda _m, args, _out: head_rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
        picked = logits_at(model, ids, mask, at)
        handle.remove()
        torch.testing.assert_close(picked, full[at], rtol=1e-5, atol=1e-5)
        assert head_rows == [int(at.sum())]
        # a model whose head cannot be found: the same logits, taken from the full (or trimmed) output
        monkeypatch.setattr(model.get_base_model(), "get_output_embeddings", lambda: None)
        torch.testing.assert_close(logits_at(model, ids, mask, at), full[at], rtol=1e-5, atol=1e-5)
