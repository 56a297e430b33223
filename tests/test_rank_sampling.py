"""Rank granularity: the ranks each row and module really ran at (seen by forward hooks in every micro-step)
equal the documented draws, a resume draws the same, frozen mode stays exact with per-example ranks under
every optimizer, and the per-example loss is the usual mean."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import error_line
from safetensors.torch import load_file

from qdylora.adapters.attach import attach_adapters, dylora_layers, set_rank
from qdylora.adapters.config import QDyLoRAConfig
from qdylora.adapters.layer import DyLoRALinear
from qdylora.adapters.rank_sampler import RankSampler
from qdylora.cli import main
from qdylora.train import TrainConfig, train

SEED = 5


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "d.jsonl"
    p.write_text("\n".join(json.dumps({"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i)))})
                           for i in range(1, 25)))
    return p


class RankRecorder:
    """Forward pre-hooks on every DyLoRA layer: the rank each forward call ran at, in call order."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[int, list[int]]] = []
        orig = DyLoRALinear.forward
        recorder = self

        def forward(layer, x, *a, **k):
            if layer.training:
                r = layer.rank
                recorder.calls.append((id(layer), r.tolist() if torch.is_tensor(r) else [r] * x.shape[0]))
            return orig(layer, x, *a, **k)

        monkeypatch.setattr(DyLoRALinear, "forward", forward)

    def by_micro_step(self, n_layers: int) -> list[list[list[int]]]:
        """[micro-step][layer] -> the rows' ranks."""
        assert len(self.calls) % n_layers == 0
        return [[ranks for _, ranks in self.calls[i:i + n_layers]] for i in range(0, len(self.calls), n_layers)]


def _train(model_dir, data, out, rank_per, steps=3, batch=3, accum=2, update="nested", resume=False, **kw):
    q = QDyLoRAConfig(r_min=1, r_max=8, alpha=8, seed=SEED, rank_per=rank_per, update=update, r_max_prob=0.0)
    t = TrainConfig(max_steps=steps, batch_size=batch, grad_accum=accum, max_seq_len=64, save_steps=2, seed=SEED,
                    learning_rate=1e-3, optim="adamw_torch", gradient_checkpointing=False, warmup_steps=0, **kw)
    return train(str(model_dir), str(data), str(out), q, t, resume=resume)


def _expected(rank_per, steps, accum, batch, n_layers):
    """The documented draws (qdylora.adapters.rank_sampler) as [micro-step][layer] -> rows' ranks."""
    s = RankSampler(QDyLoRAConfig(r_min=1, r_max=8, seed=SEED, rank_per=rank_per, r_max_prob=0.0))
    out = []
    for t in range(steps):
        for k in range(accum):
            if rank_per == "step":
                out.append([[s.sample(t)] * batch] * n_layers)
            elif rank_per == "module":
                out.append([[s.module(t, i)] * batch for i in range(n_layers)])
            elif rank_per == "example":
                out.append([s.rows(t, k, batch)] * n_layers)
            else:
                out.append([s.rows(t, k, batch, module=i) for i in range(n_layers)])
    return out


@pytest.mark.parametrize("rank_per", ["step", "example", "module", "example+module"])
def test_observed_ranks_equal_the_documented_draws(tiny_model_dir, data_file, tmp_path, monkeypatch, rank_per):
    rec = RankRecorder(monkeypatch)
    res = _train(tiny_model_dir, data_file, tmp_path / "run", rank_per)
    n_layers = len(dylora_layers(res["model"]))
    seen = rec.by_micro_step(n_layers)
    assert seen == _expected(rank_per, 3, 2, 3, n_layers)
    if rank_per in ("example", "example+module"):
        assert len({r for micro in seen for rows in micro for r in rows}) > 2  # many ranks in one step


def test_resume_draws_the_same_ranks(tiny_model_dir, data_file, tmp_path, monkeypatch):
    rec = RankRecorder(monkeypatch)
    _train(tiny_model_dir, data_file, tmp_path / "full", "example+module", steps=4)
    full = list(rec.calls)
    rec.calls.clear()
    _train(tiny_model_dir, data_file, tmp_path / "cut", "example+module", steps=2)
    first = list(rec.calls)
    rec.calls.clear()
    _train(tiny_model_dir, data_file, tmp_path / "cut", "example+module", steps=4, resume=True)
    strip = lambda calls: [r for _, r in calls]  # noqa: E731
    assert strip(first) + strip(rec.calls) == strip(full)


def test_example_ranks_with_batch_size_1_draw_once_per_micro_step(tiny_model_dir, data_file, tmp_path, monkeypatch):
    rec = RankRecorder(monkeypatch)
    res = _train(tiny_model_dir, data_file, tmp_path / "run", "example", batch=1, accum=3, steps=2)
    seen = rec.by_micro_step(len(dylora_layers(res["model"])))
    assert [micro[0] for micro in seen] == [RankSampler(res["qdylora_config"]).rows(t, k, 1) for t in range(2)
                                            for k in range(3)]


def _adapter(run, step):
    return load_file(str(run / f"checkpoint-{step}" / "adapter" / "qdylora_adapter.safetensors"))


def _optimizer_state(run, step):
    return torch.load(run / f"checkpoint-{step}" / "optimizer.pt", weights_only=True)["state"]


@pytest.mark.parametrize("optim", ["adamw_torch", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit"])
def test_frozen_example_ranks_change_exactly_the_trained_components(tiny_model_dir, data_file, tmp_path,
                                                                    monkeypatch, optim):
    """Step 2 runs its 3 rows at ranks 2, 5, 8: exactly components 2, 5 and 8 (1-based) change, with weight
    decay; every other component and its optimizer state stays bit for bit."""
    draws = {0: [1, 3, 3], 1: [2, 5, 8]}
    monkeypatch.setattr(RankSampler, "rows", lambda self, step, micro, n, first_row=0, module=None: draws[step])
    out = tmp_path / "run"
    q = QDyLoRAConfig(r_min=1, r_max=8, alpha=8, seed=SEED, rank_per="example", update="frozen")
    t = TrainConfig(max_steps=2, batch_size=3, grad_accum=1, max_seq_len=64, save_steps=1, learning_rate=1e-2,
                    weight_decay=0.1, optim=optim, gradient_checkpointing=False, warmup_steps=0,
                    save_total_limit=5)
    train(str(tiny_model_dir), str(data_file), str(out), q, t)
    a1, a2 = _adapter(out, 1), _adapter(out, 2)
    s1, s2 = _optimizer_state(out, 1), _optimizer_state(out, 2)
    trained = {1, 4, 7}  # 0-based components of ranks 2, 5, 8
    for name in a1:
        comp_axis = 0 if name.endswith("lora_A") else 1
        for k in range(8):
            before, after = a1[name].select(comp_axis, k), a2[name].select(comp_axis, k)
            assert torch.equal(before, after) != (k in trained), (name, k)
    for pid, st in s2.items():
        for key, value in st.items():
            for k in range(8):
                same = torch.equal(value[k], s1[pid][key][k]) if pid in s1 else not value[k].any()
                if k not in trained:
                    assert same, (pid, key, k)
        assert st["step"].tolist() == [int(k == 0 or k == 2) + int(k in trained) for k in range(8)]


def test_per_example_loss_is_the_mean_over_every_response_token(tiny_model_dir):
    """One batch with rows at ranks 2, 5, 8 gives the token-mean of each row's loss at its own rank."""
    from transformers import AutoModelForCausalLM

    from qdylora.load.model import load_quantized_model

    base = load_quantized_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), device="cpu")
    model = attach_adapters(base, QDyLoRAConfig(r_max=8, update="nested"))
    g = torch.Generator().manual_seed(0)
    for layer in dylora_layers(model):
        layer.lora_dyB["default"].data.normal_(0, 0.05, generator=g)
    ids = torch.randint(0, 200, (3, 10), generator=g)
    labels = ids.clone()
    labels[0, :4] = labels[1, :7] = labels[2, :2] = -100  # different numbers of response tokens
    set_rank(model, torch.tensor([2, 5, 8]))
    with torch.no_grad():
        batch_loss = model(input_ids=ids, labels=labels).loss
    total, count = 0.0, 0
    for i, r in enumerate([2, 5, 8]):
        set_rank(model, r)
        with torch.no_grad():
            logits = model(input_ids=ids[i:i + 1]).logits[0, :-1]
        target = labels[i, 1:]
        keep = target != -100
        total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
        count += int(keep.sum())
    assert float(batch_loss) == pytest.approx(total / count, rel=1e-5)


def test_rank_per_is_checked(tiny_model_dir, tmp_path, capsys):
    assert main(["train", "--model", str(tiny_model_dir), "--output", str(tmp_path / "o"), "--rank-per", "token"]) == 2
    err = error_line(capsys.readouterr().err)
    assert "--rank-per" in err and all(f"'{c}'" in err for c in ("step", "example", "module", "example+module"))
    with pytest.raises(Exception, match="rank_per='token' is unknown"):
        QDyLoRAConfig(rank_per="token")


def _seen(model_dir, data, out, monkeypatch, steps: int, **q) -> list[list[list[int]]]:
    """Train `steps` steps of 2 micro-batches of 3 rows with r_max 8 and QDyLoRAConfig fields `q`; the ranks the
    forwards ran at, [micro-step][layer] -> rows."""
    rec = RankRecorder(monkeypatch)
    t = TrainConfig(max_steps=steps, batch_size=3, grad_accum=2, max_seq_len=64, save_steps=10, seed=SEED,
                    learning_rate=1e-3, optim="adamw_torch", gradient_checkpointing=False, warmup_steps=0)
    res = train(str(model_dir), str(data), str(out), QDyLoRAConfig(r_min=1, r_max=8, alpha=8, seed=SEED, **q), t)
    return rec.by_micro_step(len(dylora_layers(res["model"])))


def test_max_rows_run_the_first_rows_at_r_max_in_every_micro_step(tiny_model_dir, data_file, tmp_path, monkeypatch):
    seen = _seen(tiny_model_dir, data_file, tmp_path / "run", monkeypatch, 3, rank_per="example", update="nested",
                 max_rows=1, r_max_prob=0.0)
    plain = RankSampler(QDyLoRAConfig(r_min=1, r_max=8, seed=SEED, rank_per="example", r_max_prob=0.0))
    # row 0 at r_max = 8, rows 1 and 2 the same draws as without max_rows
    assert [micro[0] for micro in seen] == [[8] + plain.rows(s, k, 3)[1:] for s in range(3) for k in range(2)]
    assert all(len({tuple(r) for r in micro}) == 1 for micro in seen)  # the same in every module


def test_max_rows_needs_per_row_ranks():
    from qdylora.errors import ConfigError

    for bad in ({"rank_per": "step", "max_rows": 1}, {"rank_per": "module", "max_rows": 1},
                {"rank_per": "example", "max_rows": -1}):
        with pytest.raises(ConfigError, match="max_rows"):
            QDyLoRAConfig(**bad)


def test_r_max_prob_mixes_r_max_into_every_draw():
    # hand mixture: (1 - p) * uniform over 1..8 + p * [8]
    probs = RankSampler(QDyLoRAConfig(r_max=8, r_max_prob=0.5, rank_per="example")).probabilities()
    assert probs[8] == pytest.approx(0.5 + 0.5 / 8) and all(probs[r] == pytest.approx(0.5 / 8) for r in range(1, 8))
    # a list without r_max still draws r_max at p
    listed = RankSampler(QDyLoRAConfig(r_max=8, r_max_prob=0.25, rank_sampler="list", rank_list=[1, 2])).probabilities()
    assert listed == pytest.approx({1: 0.375, 2: 0.375, 8: 0.25})
    # observed frequencies of real row draws (max_rows 0): r_max 9/16 of the rows, within 5 sigma of 6000 draws
    s = RankSampler(QDyLoRAConfig(r_max=8, seed=SEED, r_max_prob=0.5, rank_per="example", max_rows=0))
    rows = [r for step in range(1000) for r in s.rows(step, 0, 6)]
    share, sigma = rows.count(8) / len(rows), (9 / 16 * 7 / 16 / len(rows)) ** 0.5
    assert abs(share - 9 / 16) < 5 * sigma
    assert abs(rows.count(3) / len(rows) - 1 / 16) < 5 * (1 / 16 * 15 / 16 / len(rows)) ** 0.5
    # per-step and per-module draws take the same mixture
    steps = [s.sample(k) for k in range(6000)]
    assert abs(steps.count(8) / 6000 - 9 / 16) < 5 * (9 / 16 * 7 / 16 / 6000) ** 0.5


def test_r_max_prob_one_trains_every_row_at_r_max(tiny_model_dir, data_file, tmp_path, monkeypatch):
    seen = _seen(tiny_model_dir, data_file, tmp_path / "run", monkeypatch, 2, rank_per="example", update="even",
                 max_rows=0, r_max_prob=1.0)
    assert len(seen) == 4 and all(ranks == [8, 8, 8] for micro in seen for ranks in micro)


def test_r_max_prob_is_checked(tiny_model_dir, tmp_path, capsys):
    assert main(["train", "--model", str(tiny_model_dir), "--output", str(tmp_path / "o"), "--r-max-prob", "1.5"]) == 2
    err = error_line(capsys.readouterr().err)
    assert "--r-max-prob" in err and "[0, 1]" in err
    assert not (tmp_path / "o").exists()


def test_r_max_prob_default_is_the_measured_winner_and_old_runs_keep_their_draws():
    # the defaults (example, nested): every row at r_max; a chosen rank rule draws as it says
    assert {r: p for r, p in RankSampler(QDyLoRAConfig(r_max=8)).probabilities().items() if p} == {8: 1.0}
    assert QDyLoRAConfig(update="even").r_max_prob == 1.0
    for other in ({"update": "frozen"}, {"rank_per": "step"}, {"rank_per": "module"}, {"rank_per": "example+module"},
                  {"update": "matryoshka", "rank_per": "step"}):
        assert QDyLoRAConfig(r_max=8, **other).r_max_prob == 0.0, other
    # a run saved before r_max_prob existed drew every rank
    old = QDyLoRAConfig.from_dict({"r_max": 8, "rank_per": "example", "update": "nested", "max_rows": 1})
    assert old.r_max_prob == 0.0 and RankSampler(old).probabilities()[3] == pytest.approx(1 / 8)
