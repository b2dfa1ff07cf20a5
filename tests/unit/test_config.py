"""Run configuration: precedence, type coercion, validation that lists every problem."""

from __future__ import annotations

import pytest

from geokd import GeokdError
from geokd.config import RunConfig, parse_override, read_config, resolve_config, save_config


def test_precedence_defaults_file_set_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("alpha: 0.2\nloss: gram\nbatch-size: 8\ntemperature: 3\n")
    config = resolve_config(
        "distill",
        file=recipe,
        overrides=["alpha=0.7", "lr=1e-4", "max_steps=10"],
        flags={"loss": "cka", "temperature": None, "teacher": "t", "student": "s", "task": "rte"},
    )
    assert config.alpha == 0.7  # --set beats the file
    assert config.loss == "cka"  # a given flag beats both
    assert config.temperature == 3.0 and isinstance(config.temperature, float)  # None flag = not given
    assert config.batch_size == 8 and config.lr == 1e-4 and config.max_steps == 10
    assert config.gamma == RunConfig().gamma  # untouched default
    config.validate()


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(GeokdError, match=r"--set: unknown key 'alpah'; did you mean 'alpha'\?"):
        resolve_config("distill", overrides=["alpah=0.5"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lerning_rate: 1\n")
    with pytest.raises(GeokdError, match=r"unknown key 'lerning_rate'"):
        resolve_config("distill", file=recipe)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("batch_size=abc", "batch_size expects int, got 'abc'"),
        ("alpha=yes", "alpha expects float"),
        ("max_steps=2.5", "max_steps expects int"),
        ("finetune_teacher=maybe", "finetune_teacher expects bool"),
    ],
)
def test_type_errors_name_the_key_and_value(override, fragment):
    with pytest.raises(GeokdError, match=fragment.replace("(", r"\(")):
        resolve_config("distill", overrides=[override])


def test_validation_reports_every_problem_at_once():
    config = resolve_config(
        "distill",
        overrides=[
            "alpha=1.5",
            "loss=ckaa",
            "temperature=0",
            "layers=2-4",
            "features=pooled",
            "batch_size=0",
            "device=gpu",
            "resume=/no/such/ckpt",
        ],
    )
    with pytest.raises(GeokdError) as info:
        config.validate()
    message = str(info.value)
    for fragment in (
        "student: no model given; pass --student",
        "teacher: no teacher given",
        "task: no task given",
        "loss: unknown loss 'ckaa' (did you mean 'cka'?)",
        "alpha: the feature weight must be in [0, 1], got 1.5",
        "temperature: must be > 0, got 0.0",
        "layers: expected 'uniform', 'last', 'copied' (a truncate: student's source blocks) or student:teacher pairs such as '2:4,4:8', got '2-4'",
        "features: must be one of cls, mean, tokens, last, spans, got 'pooled'",
        "batch_size: must be at least 1, got 0",
        "device: expected auto, cpu, cuda, cuda:N or mps, got 'gpu'",
        "resume: checkpoint '/no/such/ckpt' does not exist",
    ):
        assert fragment in message, fragment
    assert "\n" not in message


def test_finetune_needs_no_teacher_and_names_model_flag():
    config = resolve_config("finetune", flags={"task": "rte"})
    with pytest.raises(GeokdError) as info:
        config.validate()
    assert "pass --model" in str(info.value) and "teacher" not in str(info.value)


@pytest.mark.parametrize("layers", ["uniform", "last", "2:4", "1:2, 2:4,3:6"])
def test_layer_specs_accepted(layers):
    resolve_config(
        "distill", flags={"teacher": "t", "student": "s", "task": "rte", "layers": layers}
    ).validate()


def test_override_parsing():
    assert parse_override("alpha=0.25") == ("alpha", 0.25)
    assert parse_override("layers=2:4,4:8") == ("layers", "2:4,4:8")
    assert parse_override("max-steps=5") == ("max_steps", 5)
    with pytest.raises(GeokdError, match="expected key=value, got 'alpha'"):
        parse_override("alpha")


def test_save_and_read_back_round_trip(tmp_path):
    config = resolve_config(
        "distill", flags={"teacher": "t", "student": "s", "task": "rte", "alpha": 0.3, "max_steps": 7}
    )
    save_config(config, tmp_path / "config.yaml")
    assert read_config(tmp_path / "config.yaml") == config


def test_bad_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("alpha: [0.5\n")
    with pytest.raises(GeokdError, match="is not valid YAML at line"):
        resolve_config("distill", file=bad)
    with pytest.raises(GeokdError, match="does not exist"):
        resolve_config("distill", file=tmp_path / "missing.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(GeokdError, match="must hold a mapping"):
        resolve_config("distill", file=listing)
