"""ForwardCapture: tensors of a module's forward pass reach a metric without touching the training step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import metrics_suite as ms
from metrics_suite.capture import ForwardCapture, record


class NoiseLayer(nn.Module):
    """input + learned mean + σ·ε, reporting its parts with :func:`record`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.linspace(-1.0, 1.0, dim))
        self.log_sigma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        mean = self.mu.expand_as(x)
        noise = scale * self.log_sigma.exp() * torch.randn_like(x)
        record(self, "mean", mean)
        record(self, "noise", noise)
        self.last_noise = noise
        return x + mean + noise


def numpy_noise_means(x: np.ndarray, mean: np.ndarray, noise: np.ndarray) -> dict[str, float]:
    """The ten noise statistics averaged over positions (last axis = features), straight from the formulas."""
    shifted = mean + noise
    x_n, mu_n, eps_n, s_n = (np.linalg.norm(a, axis=-1) for a in (x, mean, noise, shifted))
    per_position = {
        "input_norm": x_n,
        "mean_norm": mu_n,
        "unshifted_noise_norm": eps_n,
        "mean_shifted_noise_norm": s_n,
        "mean_domination_percent": mu_n / (mu_n + eps_n),
        "mean_domination_ratio": mu_n / eps_n,
        "mean_cosine_similarity": (x * mean).sum(-1) / (x_n * mu_n),
        "noise_domination_percent": s_n / (x_n + s_n),
        "noise_domination_ratio": s_n / x_n,
        "noise_cosine_similarity": (x * shifted).sum(-1) / (x_n * s_n),
    }
    return {name: float(values.mean()) for name, values in per_position.items()}


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.noise_layer = NoiseLayer(4)
        self.head = nn.Linear(4, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.noise_layer(self.embed(ids)))


def test_capture_feeds_noise_metric_in_a_training_step() -> None:
    torch.manual_seed(0)
    model = Model()
    col = ms.suite("noise")
    capture = ForwardCapture(model.noise_layer, inputs={"input": "x"}, names=("input", "mean", "noise"))
    ids = torch.randint(0, 10, (3, 5))
    with capture:
        loss = model(ids).logsumexp(-1).mean()
        loss.backward()  # the training step is untouched; captured tensors are detached
        tensors = capture.pop()
    col.update(**tensors)
    out = col.compute()
    embeddings = model.embed(ids).detach()
    assert torch.equal(tensors["input"], embeddings)
    assert torch.equal(tensors["mean"], model.noise_layer.mu.detach().expand(3, 5, 4))
    assert torch.equal(tensors["noise"], model.noise_layer.last_noise.detach())
    assert not any(t.requires_grad for t in tensors.values())
    want = numpy_noise_means(
        embeddings.double().numpy(),
        model.noise_layer.mu.detach().double().numpy(),
        model.noise_layer.last_noise.detach().double().numpy(),
    )
    assert len(want) == 10
    for name, value in want.items():
        assert out[f"noise/noise/{name}"].item() == pytest.approx(value, rel=1e-5)
    # hooks are gone after the block: nothing is captured any more
    model(ids)
    with pytest.raises(LookupError, match="nothing captured"):
        _ = capture.tensors


def test_inputs_by_position_keyword_and_default() -> None:
    layer = NoiseLayer(3)
    x = torch.randn(2, 3)
    capture = ForwardCapture(layer, inputs={"input": 0, "scale": "scale"})
    with capture:
        layer(x)
        assert torch.equal(capture.tensors["input"], x)
        assert capture.tensors["scale"] == 1.0  # a default value: any object can be captured
    with capture:
        layer(x=x * 2, scale=torch.tensor(0.0))  # passed by keyword
    assert torch.equal(capture.tensors["input"], x * 2)
    assert torch.equal(capture.tensors["noise"], torch.zeros(2, 3))
    with pytest.raises(ValueError, match="no parameter 'y'"):
        ForwardCapture(layer, inputs={"input": "y"})
    with pytest.raises(ValueError, match="no parameter 5"):
        ForwardCapture(layer, inputs={"input": 5})


def test_output_and_attributes() -> None:
    class Split(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            self.cache = x * 3
            return x + 1, {"double": x * 2}

    module = Split()
    x = torch.arange(4.0)
    with ForwardCapture(module, output={"plus": 0}, attributes={"tripled": "cache"}) as by_index:
        module(x)
    assert torch.equal(by_index.tensors["plus"], x + 1)
    assert torch.equal(by_index.tensors["tripled"], x * 3)

    single = nn.Identity()
    with ForwardCapture(single, output="target") as whole:
        single(x)
    assert list(whole.tensors) == ["target"] and torch.equal(whole.tensors["target"], x)


def test_names_missing_detach_and_record_without_capture() -> None:
    layer = NoiseLayer(2)
    x = torch.randn(1, 2, requires_grad=True)
    capture = ForwardCapture(layer, inputs=["x"], names=("x", "mean"))
    with pytest.raises(LookupError, match=r"\['x', 'mean'\]"):
        _ = capture.tensors  # the module has not run
    layer(x)  # not attached: record() is a no-op
    with pytest.raises(LookupError):
        _ = capture.tensors
    keep_graph = ForwardCapture(layer, inputs=["x"], detach=False)
    with capture, keep_graph:
        layer(x)
    assert list(capture.tensors) == ["x", "mean"]  # only the requested names, in their order
    assert not capture.tensors["x"].requires_grad
    assert set(keep_graph.tensors) == {"x", "mean", "noise"}
    kept = keep_graph.tensors
    assert kept["x"] is x and kept["mean"].requires_grad


def test_attach_remove_and_latest_forward_wins() -> None:
    layer = NoiseLayer(2)
    capture = ForwardCapture(layer, inputs={"input": "x"}).attach()
    capture.attach()  # idempotent: one hook only
    assert len(layer._forward_hooks) == len(layer._forward_pre_hooks) == 1
    first, second = torch.zeros(1, 2), torch.ones(1, 2)
    layer(first)
    layer(second)
    assert torch.equal(capture.tensors["input"], second)
    capture.remove()
    assert len(layer._forward_hooks) == len(layer._forward_pre_hooks) == 0
    capture.clear()
    layer(first)
    assert capture.tensors == {}
    with pytest.raises(TypeError, match=r"nn\.Module"):
        ForwardCapture(lambda x: x)  # type: ignore[arg-type]


def test_each_forward_drops_values_it_does_not_produce() -> None:
    class TrainOnlyNoise(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                noise = torch.randn_like(x)
                record(self, "noise", noise)
                return x + noise
            return x

    layer = TrainOnlyNoise()
    with ForwardCapture(layer, inputs={"input": "x"}) as capture:
        layer(torch.zeros(2, 3))
        layer.eval()
        layer(torch.ones(5, 3))
    assert list(capture.tensors) == ["input"]  # no (2, 3) noise left over from the training call
    assert torch.equal(capture.tensors["input"], torch.ones(5, 3))
    strict = ForwardCapture(layer, inputs={"input": "x"}, names=("input", "noise"))
    with strict:
        layer.train()(torch.zeros(2, 3))
        layer.eval()(torch.ones(5, 3))
    with pytest.raises(LookupError, match=r"nothing captured for \['noise'\]"):
        _ = strict.tensors


def test_forward_that_raises_leaves_no_values() -> None:
    class Failing(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            record(self, "mean", x * 2)
            if x.sum() < 0:
                raise RuntimeError("boom")
            return x

    module = Failing()
    with ForwardCapture(module, inputs={"input": "x"}) as capture:
        module(torch.ones(2))
        with pytest.raises(RuntimeError, match="boom"):
            module(-torch.ones(2))
    assert capture.tensors == {}  # neither the earlier forward's values nor the failed one's


def test_in_place_forward_raises_or_is_copied_when_asked() -> None:
    module = nn.ReLU(inplace=True)
    x = torch.tensor([-1.0, 2.0])
    with ForwardCapture(module, inputs={"target": 0}) as capture, pytest.raises(RuntimeError) as info:
        module(x)
    assert "['target'] in place" in str(info.value) and "copy_inputs=True" in str(info.value)
    assert capture.tensors == {}  # no value that silently differs from the forward's input
    x = torch.tensor([-1.0, 2.0])
    with ForwardCapture(module, inputs={"target": 0}, copy_inputs=True) as capture:
        module(x)
    assert torch.equal(x, torch.tensor([0.0, 2.0]))  # the forward did change its argument
    assert torch.equal(capture.tensors["target"], torch.tensor([-1.0, 2.0]))
    with ForwardCapture(nn.ReLU(), inputs={"target": 0}) as capture:  # out of place: no copy made
        capture.module(x)
    assert capture.tensors["target"].data_ptr() == x.data_ptr()


def test_misconfigured_output_or_attribute_names_the_capture() -> None:
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    class Named(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"a": x}

    x = torch.ones(1)
    with ForwardCapture(Pair(), output={"third": 2}) as capture, pytest.raises(ValueError) as info:
        capture.module(x)
    assert "output['third']" in str(info.value) and "no item 2" in str(info.value)
    assert "tuple of length 2" in str(info.value)
    with ForwardCapture(Named(), output={"b": "b"}) as capture, pytest.raises(ValueError) as info:
        capture.module(x)
    assert "output['b']" in str(info.value) and "dict with keys ['a']" in str(info.value)
    with (
        ForwardCapture(Pair(), attributes={"a": "missing"}) as capture,
        pytest.raises(AttributeError) as info,
    ):
        capture.module(x)
    assert "attributes['a']" in str(info.value) and "'missing'" in str(info.value)
    assert "Pair" in str(info.value)


def test_detach_reaches_tensors_inside_containers() -> None:
    class Nested(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
            record(self, "parts", [x * 4, 7])
            return x * 2, {"more": [x * 3]}

    module = Nested()
    x = torch.ones(2, requires_grad=True)
    with (
        ForwardCapture(module, output="all") as detached,
        ForwardCapture(module, output="all", detach=False) as kept,
    ):
        module(x)
    pair, parts = detached.tensors["all"], detached.tensors["parts"]
    assert torch.equal(pair[0], x * 2) and torch.equal(pair[1]["more"][0], x * 3)
    assert not pair[0].requires_grad and not pair[1]["more"][0].requires_grad
    assert torch.equal(parts[0], x * 4) and not parts[0].requires_grad and parts[1] == 7
    assert kept.tensors["all"][1]["more"][0].requires_grad


def test_inputs_under_inference_mode_are_captured() -> None:
    """Lightning evaluates under inference mode: inference tensors have no version counter."""
    layer = NoiseLayer(3)
    with ForwardCapture(layer, inputs={"input": "x"}) as capture, torch.inference_mode():
        x = torch.randn(2, 3)
        layer(x)
    assert torch.equal(capture.tensors["input"], x)
