"""The registry: suites, overrides, building collections from configs."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

import metrics_suite as ms
from metrics_suite.reconstruction import ReconstructionScore


def test_registry_lists_the_four_suites() -> None:
    suites = ms.available()
    assert list(suites) == ["reconstruction", "utility", "noise", "credit"]
    assert "reconstruction_score" in suites["reconstruction"]


def test_unknown_suite_or_metric_lists_what_exists() -> None:
    with pytest.raises(ValueError, match="available suites"):
        ms.suite("recon")
    with pytest.raises(ValueError, match="reconstruction_score"):
        ms.suite("reconstruction", reconstructon_score={})


def test_overrides_configure_exclude_and_validate() -> None:
    col = ms.suite("reconstruction", reconstruction_score={"num_components": 3, "reduction": "itemwise_mean"})
    metric = col["reconstruction/reconstruction_score"]
    assert (metric.num_components, metric.reduction) == (3, "itemwise_mean")
    assert "reconstruction/reconstruction_score" not in ms.suite("reconstruction", reconstruction_score=False)
    with pytest.raises(ValueError, match=r"(?s)reconstruction/reconstruction_score.*num_components"):
        ms.suite("reconstruction", reconstruction_score={"num_components": 0})
    with pytest.raises(ValueError, match="reduction"):
        ReconstructionScore(reduction="mean")


def test_build_from_dict_json_and_toml(tmp_path) -> None:
    cfg = {"suites": ["reconstruction"], "metrics": {"reconstruction_score": {"num_components": 2}}}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    (tmp_path / "c.toml").write_text(
        'suites = ["reconstruction"]\n[metrics.reconstruction_score]\nnum_components = 2\n'
    )
    for source in (cfg, ms.SuiteConfig(**cfg), tmp_path / "c.json", str(tmp_path / "c.toml")):
        col = ms.build(source)
        assert col["reconstruction/reconstruction_score"].num_components == 2
    with pytest.raises(ValidationError, match="suites"):
        ms.build({"suites": ["nope"]})
    with pytest.raises(ValidationError, match="extra"):
        ms.build({"suite": ["utility"]})
    (tmp_path / "c.yaml").write_text("")
    with pytest.raises(ValueError, match=r"\.json or \.toml"):
        ms.build(tmp_path / "c.yaml")


def test_overrides_must_be_a_mapping_or_a_bool() -> None:
    for setting in (None, 0, 768, "no"):
        with pytest.raises(TypeError, match=rf"`next_token` must be a dict.*got {setting!r}"):
            ms.suite("utility", next_token=setting)  # type: ignore[arg-type]
        with pytest.raises(ValidationError, match="next_token"):
            ms.build({"suites": ["utility"], "metrics": {"next_token": setting}})
    with pytest.raises(ValidationError, match="suites"):
        ms.build({"suites": []})
    assert "utility/next_token" not in ms.suite("utility", next_token=False)
