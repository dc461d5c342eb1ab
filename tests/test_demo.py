"""The demo: data, model, the validation step's diagnostics, and ``metrics-suite demo`` end to end (2 ranks)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytorch_lightning")
pytest.importorskip("matplotlib")

import metrics_suite as ms
from metrics_suite.capture import ForwardCapture
from metrics_suite.cli import main
from metrics_suite.demo.data import markov_chain, markov_dataset, sample_sequences
from metrics_suite.demo.figure import format_tables
from metrics_suite.demo.model import NoisyEmbedding, TinyCausalLM, nearest_token_ids
from metrics_suite.demo.training import DemoConfig, DemoModule

TINY = {"vocab_size": 12, "dim": 8, "num_layers": 2, "num_heads": 2, "seq_len": 6, "val_sequences": 8}


# ---------------------------------------------------------------------------------------------- data, model
def test_markov_data_is_reproducible_and_follows_the_chain() -> None:
    P = markov_chain(6, seed=3)
    assert torch.allclose(P.sum(1), torch.ones(6)) and bool((P > 0).all())
    assert torch.equal(sample_sequences(P, 5, 7, seed=1), sample_sequences(P, 5, 7, seed=1))
    # a near-deterministic chain: every step follows the most likely successor
    sharp = markov_chain(6, seed=3, sharpness=200.0)
    ids = sample_sequences(sharp, 20, 8, seed=2)
    assert torch.equal(ids[:, 1:], sharp.argmax(1)[ids[:, :-1]])
    train, val = markov_dataset(6, 10, 4, seed=0, split=0), markov_dataset(6, 10, 4, seed=0, split=1)
    assert train.tensors[0].shape == (10, 5) and not torch.equal(train.tensors[0], val.tensors[0])


def test_noisy_embedding_records_what_it_adds() -> None:
    layer = NoisyEmbedding(4, init_log_sigma=math.log(0.3))
    with torch.no_grad():
        layer.mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    x = torch.randn(2, 3, 4)
    with ForwardCapture(layer, inputs={"input": "x"}, names=("input", "mean", "noise")) as capture:
        y = layer(x)
    got = capture.pop()
    assert torch.equal(got["input"], x)
    torch.testing.assert_close(y.detach(), x + got["mean"] + got["noise"])
    assert torch.equal(got["mean"][1, 2], layer.mean.detach())
    assert not torch.equal(got["noise"], torch.zeros_like(x))


def test_model_is_causal_and_layers_compose() -> None:
    torch.manual_seed(0)
    model = TinyCausalLM(vocab_size=10, dim=8, num_layers=2, num_heads=2, max_length=6)
    ids = torch.randint(0, 10, (3, 6))
    changed = ids.clone()
    changed[:, 4] = (ids[:, 4] + 1) % 10
    logits = model(ids, noise=False)
    torch.testing.assert_close(
        model(changed, noise=False)[:, :4], logits[:, :4]
    )  # the past ignores the future
    assert not torch.allclose(model(changed, noise=False)[:, 4], logits[:, 4])
    states = model.hidden_states(model.embed(ids))
    for layer, h in enumerate(states):
        torch.testing.assert_close(model.from_layer(h, layer), logits)


def test_nearest_token_ids_matches_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    table = torch.randn(7, 3, generator=g)
    emb = torch.randn(2, 4, 3, generator=g)
    expected = torch.tensor(
        [
            [min(range(7), key=lambda v: float((emb[b, t] - table[v]).norm())) for t in range(4)]
            for b in range(2)
        ]
    )
    assert torch.equal(nearest_token_ids(emb, table), expected)


def test_validation_step_feeds_all_four_suites() -> None:
    """Without a trainer: one validation step, every metric updated and finite; aligned feedback
    weights give costate cosine 1, the exact gradient as credit gives correlation ~1 and Δ < 0."""
    module = DemoModule(DemoConfig(**TINY))
    module.lq_feedback.copy_(module.lq_weights)
    with torch.no_grad():  # a zero mean has no cosine with the input (NaN by definition)
        module.model.noise.mean.copy_(
            0.1 * torch.randn(TINY["dim"], generator=torch.Generator().manual_seed(0))
        )
    module.eval()
    with torch.no_grad():
        module.validation_step(module.val_data[:], 0)
    values = module.diagnostics["val"].compute()
    for suite in ms.SUITES:
        assert any(k.startswith(f"{suite}/") for k in values)
    assert all(math.isfinite(float(v)) for v in values.values()), values
    for layer in range(module.config.lq_layers):
        assert float(values[f"credit/cosine/layer_{layer}"]) == pytest.approx(1.0, abs=1e-6)
    for layer in range(module.config.num_layers):
        assert float(values[f"credit/perturbation_correlation/layer_{layer}"]) > 0.99
        assert float(values[f"credit/nudging/delta/layer_{layer}"]) < 0
    assert float(values["credit/feature_drift/head.weight"]) == 0.0  # nothing trained yet


# ---------------------------------------------------------------------------------------------- end to end
def test_demo_command_on_two_processes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "2", "--devices", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out

    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["config"]["epochs"] == 2
    val = [r for r in results["history"] if r["stage"] == "val"]
    assert [r["epoch"] for r in val] == [0, 1]
    assert [r["epoch"] for r in results["history"] if r["stage"] == "train"] == [0, 1]
    expected_metrics = {
        "reconstruction": {"reconstruction_score", "changed_tokens", "activations"},
        "utility": {"next_token", "cross_entropy", "prediction_change"},
        "noise": {"noise"},
        "credit": {"cosine", "perturbation_correlation", "nudging", "feature_drift"},
    }
    for record in val:
        seen: dict[str, set[str]] = {}
        for key, value in record["values"].items():
            assert math.isfinite(value), key
            suite, metric = key.split("/")[:2]
            seen.setdefault(suite, set()).add(metric)
            if key.endswith("/nonfinite_count"):
                assert value == 0, key
        assert seen == expected_metrics
    # the model learns: the noisy model's validation cross-entropy goes down
    ce = [r["values"]["utility/cross_entropy/cross_entropy"] for r in val]
    assert ce[1] < ce[0]

    png = out / "results.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    for suite in ms.SUITES:
        assert f"{suite} (val)" in printed
    assert format_tables(results) in printed
    assert "wall time" in printed


def test_python_m_entry_point_and_plot_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listing = subprocess.run(
        [sys.executable, "-m", "metrics_suite", "suites"], capture_output=True, text=True, check=True
    )
    assert "perturbation_correlation" in listing.stdout and "(needs configuration)" in listing.stdout
    results = tmp_path / "r.json"
    history = [{"stage": "val", "epoch": 0, "values": {"noise/noise/input_norm": 1.0}}]
    results.write_text(json.dumps({"history": history}))
    assert main(["plot", str(results)]) == 0
    assert (tmp_path / "r.png").exists() and "r.png" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["demo", "--epochs", "0"])
    with pytest.raises(SystemExit):
        main(["demo", "--devices", "two"])
    assert "argument --devices: invalid positive_int value: 'two'" in capsys.readouterr().err


def test_demo_without_matplotlib_stops_before_training(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    import metrics_suite.demo.training as training

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "matplotlib" else find_spec(name, *args),
    )
    monkeypatch.setattr(training, "run_demo", lambda config: pytest.fail("trained without matplotlib"))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--devices", "1", "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "needs matplotlib" in captured.err and "metrics_suite[lightning,plots]" in captured.err
    assert captured.out == "" and not out.exists()


def test_getting_started_examples_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import re
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.chdir(tmp_path)
    text = (Path(__file__).resolve().parents[1] / "docs" / "getting-started.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4
    namespace: dict[str, object] = {"__name__": "docs_getting_started"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for block in blocks:
            exec(compile(block, "getting-started.md", "exec"), namespace)
    plt.close("all")
    assert float(namespace["score"].compute()) == pytest.approx(2 / 3)  # type: ignore[attr-defined]
