"""svd-sorted adapters: every rank is the best approximation of the full update of its rank (Eckart-Young, from a
dense SVD), the full rank is unchanged, per-row ranks agree, a saved adapter keeps the state, training sorts the
final adapter only when the run's truncation is 'svd', and taylor scores agree with autograd."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import mean_response_loss, tiny_nf4

from qdylora.adapters.attach import attach_adapters, dylora_layers, module_layers, set_rank
from qdylora.adapters.config import QDyLoRAConfig
from qdylora.adapters.files import load_adapter, read_adapter, save_adapter
from qdylora.adapters.svd_sort import sort_components, svd_sorted
from qdylora.allocate.calib import CalibBatch
from qdylora.allocate.scores import taylor_scores
from qdylora.cli import main
from qdylora.data.examples import IGNORE_INDEX

IDS = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(2))


def _model(r_max=8, alpha=12.0, seed=5):
    model = attach_adapters(tiny_nf4(0), QDyLoRAConfig(r_min=1, r_max=r_max, alpha=alpha))
    g = torch.Generator().manual_seed(seed)
    for layer in dylora_layers(model):
        for p in (layer.lora_dyA["default"], layer.lora_dyB["default"]):
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _best(W: torch.Tensor, b: int) -> torch.Tensor:
    """The best rank-b approximation of W (Eckart-Young), from a dense float64 SVD."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return (U[:, :b] * S[:b]) @ Vh[:b]


@pytest.mark.parametrize("r,n_in,n_out", [(8, 16, 12), (8, 4, 12), (8, 16, 3), (16, 16, 16)])
def test_sorted_prefixes_are_the_best_approximations(r, n_in, n_out):
    g = torch.Generator().manual_seed(r + n_in + n_out)
    A, B = torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g)
    A2, B2 = svd_sorted(A, B)
    assert A2.shape == A.shape and B2.shape == B.shape and A2.dtype == A.dtype
    torch.testing.assert_close((B2 @ A2).double(), (B @ A).double(), rtol=0, atol=1e-5)
    for b in range(1, r + 1):
        torch.testing.assert_close((B2[:, :b] @ A2[:b]).double(), _best(B @ A, b), rtol=0, atol=1e-5)
    norms = B2.norm(dim=0) * A2.norm(dim=1)
    assert torch.all(norms[:-1] >= norms[1:] - 1e-6)  # non-increasing singular values
    k = min(r, n_in, n_out)
    gram = A2[:k] @ A2[:k].t()  # orthogonal rows: the components are independent directions
    torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), rtol=0, atol=1e-4)
    assert torch.count_nonzero(A2[k:]) == 0 and torch.count_nonzero(B2[:, k:]) == 0


def test_sorted_layer_runs_every_rank_at_the_full_scale():
    model = _model()
    layer = module_layers(model)["model.layers.0.self_attn.q_proj"]
    A, B = layer.factors()
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.set_rank(8)
        before = layer(x)
        base = layer.get_base_layer()(x)
        sort_components(model)
        assert layer.svd_sorted
        layer.set_rank(8)
        torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-5)  # the full adapter is unchanged
        for b in (1, 2, 5):
            layer.set_rank(b)
            want = base + x @ (12.0 / 8 * _best(B @ A, b)).float().t()
            torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-5)
        # per-row ranks: each batch element at its own rank, as if run alone at that rank
        ranks = torch.tensor([3, 1])
        layer.set_rank(ranks)
        got = layer(x)
        for i, b in enumerate(ranks.tolist()):
            layer.set_rank(b)
            torch.testing.assert_close(got[i], layer(x[i:i + 1])[0], rtol=0, atol=1e-6)
        layer.set_rank(0)
        torch.testing.assert_close(layer(x), base, rtol=0, atol=0)


def test_saved_sorted_adapter_loads_sorted(tmp_path):
    model = sort_components(_model())
    set_rank(model, 2)
    with torch.no_grad():
        want = model(IDS).logits
    save_adapter(model, tmp_path / "ad")
    meta, _ = read_adapter(tmp_path / "ad")
    assert meta["svd_sorted"] is True
    loaded = load_adapter(tiny_nf4(0), tmp_path / "ad").eval()
    assert all(layer.svd_sorted for layer in dylora_layers(loaded))
    set_rank(loaded, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, want, rtol=0, atol=0)
    # an adapter saved as trained loads as trained, also into a model that held a sorted one
    save_adapter(_model(), tmp_path / "raw")
    assert read_adapter(tmp_path / "raw")[0]["svd_sorted"] is False
    assert not any(layer.svd_sorted for layer in dylora_layers(load_adapter(loaded, tmp_path / "raw")))


def test_truncation_setting_defaults_and_legacy():
    assert QDyLoRAConfig().truncation == "prefix"
    assert QDyLoRAConfig(r_max_prob=0.0, truncation="svd").truncation == "svd"
    saved = {k: v for k, v in QDyLoRAConfig(truncation="svd").to_dict().items() if k != "truncation"}
    assert QDyLoRAConfig.from_dict(saved).truncation == "prefix"  # runs saved before the setting kept components


def _batches():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 256, (3, 10), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    return [CalibBatch(ids, torch.ones_like(ids), labels)]


def test_taylor_on_sorted_components_from_autograd():
    """Sorted components run at alpha / r_max at every rank, so component k >= R switched on at the reference is
    the full-rank model with its other side zeroed: autograd at rank r_max there gives its gradient."""
    R, batches = 3, _batches()
    model = sort_components(_model())
    got = taylor_scores(model, batches, R)
    grads = {}
    for side in ("A", "B"):  # zero this side of components >= R (they are off) and take this side's gradient
        check = sort_components(_model())
        with torch.no_grad():
            for layer in dylora_layers(check):
                if side == "A":
                    layer.lora_dyA["default"][R:] = 0
                else:
                    layer.lora_dyB["default"][:, R:] = 0
        set_rank(check, 8)
        mean_response_loss(check, batches).backward()
        for name, layer in module_layers(check).items():
            grads[name, side] = (layer.lora_dyA if side == "A" else layer.lora_dyB)["default"].grad.clone()
    for i, (name, layer) in enumerate(module_layers(model).items()):
        A, B = layer.factors()
        want = (A * grads[name, "A"]).abs().sum(1) + (B * grads[name, "B"]).abs().sum(0)
        torch.testing.assert_close(got.gains[i].float(), want, rtol=1e-4, atol=1e-8)


def _check_sorted_from(final: dict, trained: dict, targets: list[str]) -> None:
    """final's prefixes are the best approximations of trained's full update (dense SVD), rank r_max unchanged."""
    for t in targets:
        A, B = trained[f"{t}.lora_A"], trained[f"{t}.lora_B"]
        A2, B2 = final[f"{t}.lora_A"], final[f"{t}.lora_B"]
        for b in (1, 3, A.shape[0]):
            torch.testing.assert_close((B2[:, :b] @ A2[:b]).double(), _best(B @ A, b), rtol=0, atol=1e-5)


def test_training_sorts_the_final_adapter_only(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--output", str(out), "--max-steps",
            "2", "--r-max", "8", "--batch-size", "2", "--save-steps", "1", "--max-seq-len", "64", "--lr", "5e-2",
            "--optim", "adamw_torch", "--sweep-ranks", ""]
    assert main(args + ["--truncation", "svd"]) == 0
    assert json.loads((out / "run_config.json").read_text())["qdylora"]["truncation"] == "svd"
    meta, final = read_adapter(out / "adapter")
    ck_meta, trained = read_adapter(out / "checkpoint-2" / "adapter")
    assert meta["svd_sorted"] is True and ck_meta["svd_sorted"] is False  # a resume needs the trained components
    _check_sorted_from(final, trained, meta["targets"])
    # killed between the last checkpoint and the final adapter: --resume writes it sorted from the checkpoint
    shutil.rmtree(out / "adapter")
    assert main(["train", "--output", str(out), "--resume"]) == 0
    meta2, final2 = read_adapter(out / "adapter")
    assert meta2["svd_sorted"] is True
    _check_sorted_from(final2, trained, meta2["targets"])
    # the default (--truncation prefix) keeps the trained components
    out3 = tmp_path / "prefix"
    assert main(args[:6] + [str(out3)] + args[7:]) == 0
    meta3, final3 = read_adapter(out3 / "adapter")
    _, trained3 = read_adapter(out3 / "checkpoint-2" / "adapter")
    assert meta3["svd_sorted"] is False and all(torch.equal(final3[k], trained3[k]) for k in final3)


def test_sort_command_writes_a_sorted_copy_and_refuses_bad_outputs(tiny_model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--output", str(out),
                 "--max-steps", "2", "--r-max", "8", "--batch-size", "2", "--max-seq-len", "64", "--lr", "5e-2",
                 "--optim", "adamw_torch", "--sweep-ranks", ""]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    meta, trained = read_adapter(out / "adapter")
    assert main(["sort", str(out), "--output", str(tmp_path / "sorted")]) == 0
    smeta, final = read_adapter(tmp_path / "sorted")
    assert smeta["svd_sorted"] is True and meta["svd_sorted"] is False
    _check_sorted_from(final, trained, smeta["targets"])
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # the run is untouched
    capsys.readouterr()
    for args, says in ((["sort", str(tmp_path / "sorted"), "--output", str(tmp_path / "again")], "already svd-sorted"),
                       (["sort", str(out), "--output", str(out / "inside")], "overlaps"),
                       (["sort", str(out), "--output", str(tmp_path / "sorted")], "not empty")):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and says in err and "\n" not in err
    assert not (tmp_path / "again").exists() and not (out / "inside").exists()


def test_bad_truncation_settings_are_clear_errors(tmp_path):
    from qdylora.errors import AdapterError, ConfigError

    with pytest.raises(ConfigError, match="truncation='best' is unknown; use one of prefix, svd"):
        QDyLoRAConfig(truncation="best")
    save_adapter(_model(), tmp_path / "ad")
    cfg = tmp_path / "ad" / "qdylora_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "svd_sorted": "yes"}))
    with pytest.raises(AdapterError, match="'svd_sorted' must be true or false"):
        read_adapter(tmp_path / "ad")
    assert main(["train", "--output", str(tmp_path / "r"), "--truncation", "best"]) == 2
    assert not (tmp_path / "r").exists()
