"""ForwardCapture: tensors of a module's forward pass reach a metric without touching the training step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import metrics_suite as ms
from metrics_suite.capture import ForwardCapture, record
from metrics_suite.functional import noise_statistics


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
    want = noise_statistics(embeddings, tensors["mean"], tensors["noise"])
    for name, values in want.items():
        assert out[f"noise/noise/{name}"].item() == pytest.approx(values.double().mean().item(), rel=1e-6)
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
    assert keep_graph.tensors["x"] is x and keep_graph.tensors["mean"].requires_grad
    assert set(keep_graph.tensors) == {"x", "mean", "noise"}


def test_attach_remove_and_latest_forward_wins() -> None:
    layer = NoiseLayer(2)
    capture = ForwardCapture(layer, inputs={"input": "x"}).attach()
    capture.attach()  # idempotent: one hook only
    assert len(layer._forward_hooks) == 1
    first, second = torch.zeros(1, 2), torch.ones(1, 2)
    layer(first)
    layer(second)
    assert torch.equal(capture.tensors["input"], second)
    capture.remove()
    assert len(layer._forward_hooks) == 0
    capture.clear()
    layer(first)
    assert capture.tensors == {}
    with pytest.raises(TypeError, match=r"nn\.Module"):
        ForwardCapture(lambda x: x)  # type: ignore[arg-type]
