"""The demo: data, model, the validation step's diagnostics, and ``metrics-suite demo`` end to end (2 ranks)."""

from __future__ import annotations

import json
import math
import re
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
from metrics_suite.demo.chain import FeedbackAlignmentChain
from metrics_suite.demo.data import markov_chain, markov_dataset, sample_sequences
from metrics_suite.demo.figure import demo_figure, format_tables
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
    """Without a trainer: one validation step, every metric updated and finite; the credit rules
    rank as their construction says (backprop exact, noise alone uninformative)."""
    module = DemoModule(DemoConfig(**TINY))
    module._batch_seed = lambda batch_idx: batch_idx  # type: ignore[method-assign]
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
    for layer in range(module.config.chain_layers - 1):
        assert float(values[f"credit/cosine/backprop/layer_{layer}"]) == pytest.approx(1.0, abs=1e-6)
        assert float(values[f"credit/perturbation_correlation/backprop/layer_{layer}"]) > 0.99
        assert float(values[f"credit/nudging/backprop/delta/layer_{layer}"]) < 0
        assert abs(float(values[f"credit/cosine/random/layer_{layer}"])) < 0.3
    assert float(values["credit/feature_drift/head.weight"]) == 0.0  # nothing trained yet


def test_demo_config_metrics_is_the_one_place_to_add_a_statistic() -> None:
    config = DemoConfig(**TINY, noise_scales=(1.0,), metrics={"next_token": False})
    keys = DemoModule(config).diagnostics["val"].keys()
    assert not any("next_token" in k for k in keys) and "utility/cross_entropy/sigma_100pct" in keys
    with pytest.raises(ValueError, match="unknown metric"):
        DemoModule(DemoConfig(**TINY, metrics={"no_such_metric": {}}))


def test_feedback_alignment_chain_credit_matches_autograd_and_aligns() -> None:
    chain = FeedbackAlignmentChain(dim=8, num_layers=3, out_dim=2, seed=0)
    x, y = chain.sample(5, torch.Generator().manual_seed(1))
    hidden, exact, aligned = chain.credits(x, y)
    for layer, h in enumerate(hidden):
        h = h.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(chain.loss_from(layer + 1, y)(h).sum(), h)
        torch.testing.assert_close(exact[layer], grad)
    # the last hidden layer's feedback-alignment credit is the error sent through B, by hand
    torch.testing.assert_close(aligned[-1], (chain.states(x)[-1] - y) @ chain.feedback(2))

    def alignment() -> float:
        _, exact, aligned = chain.credits(*chain.sample(256, torch.Generator().manual_seed(2)))
        return float(torch.nn.functional.cosine_similarity(aligned[-1], exact[-1], dim=1).mean())

    before = alignment()
    chain.train_steps(150, 0.02, 64, torch.Generator().manual_seed(3))
    assert alignment() > max(before, 0.0) + 0.3


# ---------------------------------------------------------------------------------------------- end to end
def assert_discriminating(values: dict[str, float]) -> None:
    """The demo's rows say something: the credit rules rank backprop > feedback alignment, noisy >
    random on ρ, cosine and nudging; utility and reconstruction move with the noise scale; uneven
    lengths separate the per-sequence from the per-token changed-token rate."""
    layers = sorted({k.rsplit("_", 1)[1] for k in values if k.startswith("credit/cosine/backprop/layer_")})
    assert len(layers) == 3
    for layer in layers:
        for metric in ("cosine", "perturbation_correlation"):
            rho = [
                values[f"credit/{metric}/{rule}/layer_{layer}"]
                for rule in ("backprop", "feedback_alignment", "noisy", "random")
            ]
            # feedback alignment overtakes the noisy gradient only after a few epochs of alignment
            assert rho[0] > 0.99 and rho[0] > max(rho[1], rho[2]) and min(rho[1], rho[2]) > rho[3] + 0.3, (
                metric,
                layer,
                rho,
            )
            assert abs(rho[3]) < 0.2 and 0.55 < rho[2] < 0.85  # noise of the gradient's norm: ≈ 1/√2
        delta = [
            values[f"credit/nudging/{rule}/delta/layer_{layer}"] for rule in ("backprop", "noisy", "random")
        ]
        assert delta[0] < delta[1] < 0 and abs(delta[2]) < abs(delta[1]) / 3, delta
        assert values[f"credit/nudging/random/improved_fraction/layer_{layer}"] < 0.7
        assert values[f"credit/nudging/backprop/improved_fraction/layer_{layer}"] == 1.0
    scales = ["sigma_050pct", "sigma_100pct", "sigma_200pct"]
    for key in (
        "utility/next_token/{}/jensen_shannon",
        "reconstruction/changed_tokens/{}/token_rate",
        "reconstruction/activations/{}/mse",
        "utility/prediction_change/{}/target_change",
    ):
        series = [values[key.format(s)] for s in scales]
        assert series[0] < series[1] < series[2], (key, series)
    cosine = [values[f"reconstruction/activations/{s}/cosine_similarity"] for s in scales]
    assert cosine[0] > cosine[1] > cosine[2]
    score = [values[f"reconstruction/reconstruction_score/{s}"] for s in scales]
    assert score[0] > score[2]
    changed = "reconstruction/changed_tokens/sigma_100pct/"
    assert values[changed + "sequence_mean"] != pytest.approx(values[changed + "token_rate"], rel=1e-3)
    # the per-token divergence quantiles: ordered, the mean inside their range, growing with the noise
    for scale in scales:
        for divergence in ("jeffreys", "jensen_shannon", "total_variation", "kl_clean_noisy"):
            key = f"utility/next_token/{scale}/{divergence}"
            q = [values[f"{key}_{level}"] for level in ("p50", "p90", "p99", "max")]
            assert 0 < q[0] <= q[1] <= q[2] <= q[3] and values[key] < q[3], (key, q)
    p90 = [values[f"utility/next_token/{s}/jensen_shannon_p90"] for s in scales]
    assert p90[0] < p90[1] < p90[2], p90


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
        "reconstruction": {"reconstruction_score", "changed_tokens", "activations", "downstream"},
        "utility": {"next_token", "cross_entropy", "prediction_change"},
        "noise": {"noise"},
        "credit": {"cosine", "perturbation_correlation", "nudging", "feature_drift"},
    }
    last = val[-1]["values"]
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
    ce = [r["values"]["utility/cross_entropy/sigma_100pct/cross_entropy"] for r in val]
    assert ce[1] < ce[0]
    assert_discriminating(last)

    png = out / "results.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    figure = demo_figure(results)
    titles = [ax.get_title() for ax in figure.axes]
    assert len(titles) == 12 and len(set(titles)) == 12  # one quantity per panel, distinct titles
    assert all(ax.get_ylabel() for ax in figure.axes)
    assert all(ax.get_legend() is not None for ax in figure.axes)  # e.g. "train, σ × 1" vs "val, ..."
    assert "utility: JS, clean vs noisy: mean and p90 (dotted)" in titles
    for suite in ms.SUITES:
        assert f"{suite} (val)" in printed
    assert format_tables(results) in printed
    assert re.search(r"next_token/sigma_100pct/jensen_shannon_p99 +[0-9.e-]+ +[0-9.e-]+\n", printed)
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


def test_demo_without_matplotlib_writes_results_and_tables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import metrics_suite.demo.training as training

    history = [{"stage": "val", "epoch": 0, "values": {"noise/noise/input_norm": 2.5}}]

    def fake_run(config: DemoConfig) -> dict[str, object]:  # the training is tested end to end above
        results = {"history": history, "world_size": 1, "wall_time_s": 0.1}
        (Path(config.out) / "results.json").write_text(json.dumps(results))
        return results

    monkeypatch.setattr(training, "run_demo", fake_run)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--devices", "1", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "noise (val)" in captured.out and re.search(r"noise/input_norm +2.5\n", captured.out)
    assert "no figure: it needs matplotlib, the [plots] extra" in captured.out
    assert json.loads((out / "results.json").read_text())["history"] == history
    assert not (out / "results.png").exists() and captured.err == ""


def test_demo_out_on_an_unwritable_folder_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import metrics_suite.demo.training as training

    monkeypatch.setattr(training, "run_demo", lambda config: pytest.fail("trained without an output folder"))
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a folder under a file cannot be made, even by root
    assert main(["demo", "--out", str(blocker / "out"), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith(f"metrics-suite demo: cannot write to --out {blocker / 'out'}: ")


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
