"""Job configs (``segassist.models.runtime.configs``): round trip, refusal of bad keys and values, one home."""

from __future__ import annotations

import json
from typing import Any

import pydantic
import pytest

from segassist.models.runtime.configs import (
    IGNORE_INDEX,
    METHODS,
    OBJECTIVES,
    FewShotConfig,
    PretrainConfig,
)


def _through_json(data: dict[str, Any]) -> dict[str, Any]:
    """What a job row or a checkpoint gives back."""
    loaded: dict[str, Any] = json.loads(json.dumps(data))
    return loaded


def test_pretrain_config_round_trips_through_json() -> None:
    config = PretrainConfig(
        objective="iic_boundary",
        modality="CT",
        steps=7,
        lr=3e-4,
        axis=0,
        channels=(4, 8, 16),
        objective_overrides={"temperature": 0.3},
        device="cuda",
    )
    data = config.to_dict()
    assert data["channels"] == [4, 8, 16]
    back = PretrainConfig.from_dict(_through_json(data))
    assert back == config
    assert back.channels == (4, 8, 16)


def test_fewshot_config_round_trips_through_json() -> None:
    config = FewShotConfig(axis=1, head="mlp", multiscale=False, steps=12, ema_decay=0.9)
    assert FewShotConfig.from_dict(_through_json(config.to_dict())) == config
    assert FewShotConfig.from_dict({}) == FewShotConfig()


def test_to_dict_holds_every_field_with_json_types() -> None:
    """The worker logs it, lineage and checkpoints store it, the benchmark hashes it."""
    data = PretrainConfig().to_dict()
    assert set(data) == set(PretrainConfig.model_fields)
    assert data["channels"] == [16, 32, 64, 128] and data["objective_overrides"] == {}
    assert _through_json(data) == data
    assert set(FewShotConfig().to_dict()) == set(FewShotConfig.model_fields)


@pytest.mark.parametrize(
    ("config", "what"),
    [(PretrainConfig, "pretraining"), (FewShotConfig, "few-shot")],
)
def test_unknown_keys_are_refused_by_name(
    config: type[PretrainConfig] | type[FewShotConfig], what: str
) -> None:
    with pytest.raises(ValueError, match=rf"unknown {what} config keys \['bogus_key', 'stepz'\]"):
        config.from_dict({"bogus_key": 1, "stepz": 3, "seed": 1})


@pytest.mark.parametrize(
    ("config", "data", "field"),
    [
        (PretrainConfig, {"steps": "many"}, "steps"),
        (PretrainConfig, {"steps": 0}, "steps"),
        (PretrainConfig, {"lr": 0}, "lr"),
        (PretrainConfig, {"axis": 3}, "axis"),
        (PretrainConfig, {"objective": "simclr"}, "objective"),
        (PretrainConfig, {"channels": [4]}, "channels"),
        (PretrainConfig, {"channels": [4, 1]}, "channels.1"),
        (PretrainConfig, {"channels": [4, "wide"]}, "channels.1"),
        (FewShotConfig, {"axis": -1}, "axis"),
        (FewShotConfig, {"head": "transformer"}, "head"),
        (FewShotConfig, {"batch_size": 0}, "batch_size"),
        (FewShotConfig, {"holdout_fraction": 1.0}, "holdout_fraction"),
        (FewShotConfig, {"ema_decay": 1.5}, "ema_decay"),
        (FewShotConfig, {"augment": "sometimes"}, "augment"),
    ],
)
def test_bad_values_are_refused_naming_the_field(
    config: type[PretrainConfig] | type[FewShotConfig], data: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValueError) as raised:
        config.from_dict(data)
    assert isinstance(raised.value, pydantic.ValidationError)
    locations = [".".join(str(p) for p in e["loc"]) for e in raised.value.errors()]
    assert locations == [field]
    with pytest.raises(ValueError):
        config(**data)


def test_numeric_strings_and_lists_are_coerced() -> None:
    config = PretrainConfig.from_dict({"steps": "5", "lr": "0.01", "channels": [4, 8]})
    assert (config.steps, config.lr, config.channels) == (5, 0.01, (4, 8))


def test_for_scratch_sets_the_scratch_defaults_under_the_overrides() -> None:
    scratch = FewShotConfig.for_scratch(steps=60, seed=3)
    assert (scratch.steps, scratch.seed) == (60, 3)
    assert (scratch.encoder_lr, scratch.head_lr, scratch.patience) == (1e-3, 1e-3, 10)
    assert (scratch.aug_prob, scratch.rotate_degrees) == (1.0, 30.0)
    assert FewShotConfig.for_scratch().steps == 1500
    with pytest.raises(ValueError, match="bogus_key"):
        FewShotConfig.for_scratch(bogus_key=1)
    with pytest.raises(ValueError, match="patience"):
        FewShotConfig.for_scratch(patience=0)


def test_configs_are_frozen() -> None:
    config = PretrainConfig()
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        config.steps = 5  # type: ignore[misc]


def test_the_vocabulary_has_one_definition() -> None:
    """The ML core, the API and the benchmarks read the same names and ignore value."""
    from segassist.bench.service import IGNORE_INDEX as bench_ignore
    from segassist.client.segment import METHODS as client_methods
    from segassist.models.fewshot import METHODS as fewshot_methods
    from segassist.models.fewshot import FewShotConfig as FewShotFromCore
    from segassist.models.objectives import OBJECTIVES as core_objectives
    from segassist.models.pretrain import PretrainConfig as PretrainFromCore
    from segassist.models.volumes import IGNORE_INDEX as volumes_ignore
    from segassist.server.schemas import METHODS as api_methods
    from segassist.server.schemas import OBJECTIVES as api_objectives

    assert OBJECTIVES == ("pix2rep", "pix2rep_barlow", "iic_boundary")
    assert METHODS == ("linear", "finetune", "mean_teacher", "auto")
    assert client_methods == METHODS  # the CLI's choices (the client imports no server code)
    assert core_objectives is OBJECTIVES and api_objectives is OBJECTIVES
    assert fewshot_methods is METHODS and api_methods is METHODS
    assert PretrainFromCore is PretrainConfig and FewShotFromCore is FewShotConfig
    assert volumes_ignore == bench_ignore == IGNORE_INDEX == 255
