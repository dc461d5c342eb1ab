"""The registry: suites, overrides, building collections from configs."""

from __future__ import annotations

import json
import re

import pytest

import metrics_suite as ms
from metrics_suite.reconstruction import ReconstructionScore


def test_registry_lists_the_four_suites() -> None:
    suites = ms.available()
    assert list(suites) == ["reconstruction", "utility", "noise", "credit"]
    assert "reconstruction_score" in suites["reconstruction"]


def test_unknown_suite_or_metric_lists_what_exists() -> None:
    with pytest.raises(ValueError, match=r"unknown suite\(s\) `recon`; valid: reconstruction, utility"):
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
    with pytest.raises(ValueError, match=r"`suites.0` got 'nope'.*; accepted: reconstruction, utility"):
        ms.build({"suites": ["nope"]})
    with pytest.raises(
        ValueError, match="unknown field `suite` \\(did you mean `suites`\\?\\); valid: suites, metrics"
    ):
        ms.build({"suite": ["utility"]})
    (tmp_path / "c.yaml").write_text("")
    with pytest.raises(ValueError, match=r"\.json or \.toml"):
        ms.build(tmp_path / "c.yaml")


def test_overrides_must_be_a_mapping_or_a_bool() -> None:
    for setting in (None, 0, 768, "no"):
        with pytest.raises(TypeError, match=rf"`next_token` must be a dict.*got {setting!r}"):
            ms.suite("utility", next_token=setting)  # type: ignore[arg-type]
        with pytest.raises(
            ValueError, match=rf"`metrics.next_token` got {re.escape(repr(setting))}; accepted: a dict"
        ):
            ms.build({"suites": ["utility"], "metrics": {"next_token": setting}})
    with pytest.raises(ValueError, match="`suites` got \\[\\]"):
        ms.build({"suites": []})
    assert "utility/next_token" not in ms.suite("utility", next_token=False)


def test_unknown_names_suggest_the_closest_and_list_the_valid_ones() -> None:
    with pytest.raises(
        ValueError, match=r"`utilty` \(did you mean `utility`\?\); valid: reconstruction, utility"
    ):
        ms.suite("utilty")
    with pytest.raises(ValueError, match=r"`next_tokn` \(did you mean `next_token`\?\); valid: next_token, "):
        ms.suite("utility", next_tokn={})
    with pytest.raises(ValueError, match=r"`num_layer` \(did you mean `num_layers`\?\); valid: num_layers, "):
        ms.CreditCosine(num_layer=2)
    with pytest.raises(
        ValueError, match=r"utility/next_token: .*`num_logit` \(did you mean `num_logits`\?\)"
    ):
        ms.suite("utility", next_token={"num_logit": 8})


def test_constructor_errors_are_one_line_naming_metric_argument_value_and_accepted() -> None:
    with pytest.raises(ValueError) as info:
        ms.suite("reconstruction", activations={})
    message = str(info.value)
    assert message == (
        "cannot build reconstruction/activations: ActivationReconstruction: missing required argument "
        "`num_features` (accepted: a positive int)"
    )
    assert "\n" not in message and "pydantic" not in message and "ArgsKwargs" not in message
    with pytest.raises(
        ValueError,
        match=r"^PerturbationCorrelation: `difference` got 'fwd'; accepted: 'forward' or 'central'$",
    ):
        ms.PerturbationCorrelation(difference="fwd")
    # positional arguments are named too (self is index 0 of the signature)
    with pytest.raises(
        ValueError, match=r"^PerturbationCorrelation: `num_directions` got 'x'; accepted: a positive int"
    ):
        ms.PerturbationCorrelation(1, 0.1, "x")


def test_config_files_name_the_file_on_syntax_schema_and_argument_errors(tmp_path) -> None:
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"suites": ["utility",]}')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bad_json))}: invalid JSON: "):
        ms.build(bad_json)
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("suites = [utility]\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bad_toml))}: invalid TOML: "):
        ms.build(bad_toml)
    schema = tmp_path / "schema.toml"
    schema.write_text('suites = ["utilty"]\n')
    with pytest.raises(
        ValueError, match=rf"^{re.escape(str(schema))}: `suites.0` got 'utilty' \(did you mean `utility`\?\)"
    ):
        ms.build(schema)
    argument = tmp_path / "argument.json"
    argument.write_text(json.dumps({"suites": ["utility"], "metrics": {"next_token": {"num_logits": True}}}))
    with pytest.raises(
        ValueError,
        match=rf"^{re.escape(str(argument))}: cannot build utility/next_token: .*`num_logits` got True",
    ):
        ms.build(argument)
