"""GoatConfig: defaults, validation errors that name field, value and what is allowed, JSON round trip."""

from __future__ import annotations

import json

import pytest

from goat_lora import GoatConfig, InitMode, ScalingMode


def test_defaults_are_the_papers():
    config = GoatConfig()
    assert (config.r, config.num_experts, config.top_k) == (8, 8, 2)
    assert (config.routing, config.top_p) == ("top_k", 0.25)
    assert (config.init, config.scaling) == ("goat", "goat")
    assert (config.lora_alpha, config.eta, config.rho, config.dropout) == (16.0, 1.0, 10.0, 0.05)
    assert config.init_cof is None and config.residual_coef == pytest.approx(1 / 8)
    assert config.aux_loss_coef == 1e-3 and config.aux_loss_form == "public"
    assert config.target_modules == "all-linear"
    assert config.expert_rank == 1


def test_init_cof_overrides_residual_coef():
    assert GoatConfig(init_cof=1.0).residual_coef == 1.0
    assert GoatConfig(r=8, num_experts=4, top_k=2).residual_coef == 0.25


@pytest.mark.parametrize(
    "kwargs, coefs",
    [
        (dict(num_experts=4), [0.25] * 4),
        (dict(num_experts=4, routing="top_p"), [0.25] * 4),
        (dict(num_experts=4, routing="shared"), [1.0, 1 / 3, 1 / 3, 1 / 3]),
        (dict(num_experts=4, routing="shared", init_cof=0.5), [1.0, 0.5, 0.5, 0.5]),  # init_cof: the routed experts'
        (dict(num_experts=4, init_cof=1.0), [1.0] * 4),
    ],
)
def test_residual_coefs_per_routing_mode(kwargs, coefs):
    """c_j = E[w_j] by default (functional.expected_expert_weights); init_cof replaces the routed experts' c."""
    from goat_lora import functional as F

    config = GoatConfig(r=8, top_k=2, **kwargs)
    assert config.residual_coefs == pytest.approx(coefs)
    if config.init_cof is None:
        assert config.residual_coefs == pytest.approx(F.expected_expert_weights(config.routing, 4).tolist())
    assert config.num_routed_experts == (3 if config.routing == "shared" else 4)


def test_enum_members_are_accepted_and_stored_as_strings():
    config = GoatConfig(init=InitMode.MINOR, scaling=ScalingMode.RSLORA)
    assert config.init == "minor" and config.scaling == "rslora"
    assert json.loads(config.to_json())["init"] == "minor"


# (kwargs, words the message must contain: the field, the value, what is allowed)
BAD_CONFIGS = [
    (dict(r=6, num_experts=4), ["r=6", "num_experts=4", "divisible"]),
    (dict(top_k=0), ["top_k=0", "between 1 and num_experts=8"]),
    (dict(top_k=9), ["top_k=9", "between 1 and num_experts=8"]),
    (dict(rho=0.0), ["rho=0.0", "> 0"]),
    (dict(rho=-1.0), ["rho=-1.0", "> 0"]),
    (dict(eta=0), ["eta=0", "> 0"]),
    (dict(eta=-0.5), ["eta=-0.5", "> 0"]),
    (dict(eta=float("nan")), ["eta=nan", "finite"]),
    (dict(lora_alpha=0), ["lora_alpha=0", "> 0"]),
    (dict(init="pissa"), ["init='pissa'", "'goat'", "'goat_mini'", "'principal'", "'minor'", "'random'", "'zero'"]),
    (dict(scaling="sqrt"), ["scaling='sqrt'", "'goat'", "'alpha'", "'rslora'"]),
    (dict(aux_loss_form="mixtral"), ["aux_loss_form='mixtral'", "'public'", "'paper'"]),
    (dict(svd_method="qr"), ["svd_method='qr'", "'exact'", "'gram'"]),
    (dict(r=0), ["r=0", ">= 1"]),
    (dict(r=2.0), ["r=2.0", "integer"]),
    (dict(num_experts=0), ["num_experts=0", ">= 1"]),
    (dict(dropout=1.0), ["dropout=1.0", "[0, 1)"]),
    (dict(dropout=-0.1), ["dropout=-0.1", "[0, 1)"]),
    (dict(aux_loss_coef=-1e-3), ["aux_loss_coef=-0.001", ">= 0"]),
    (dict(init_cof=float("inf")), ["init_cof=inf", "finite"]),
    (dict(target_modules=""), ["target_modules=''", "all-linear"]),
    (dict(target_modules=[]), ["target_modules=[]", "list of module names"]),
    (dict(modules_to_save="classifier"), ["modules_to_save='classifier'", "list"]),
    (dict(per_expert_scaling=True, init="zero"), ["per_expert_scaling", "init='zero'"]),
    (dict(routing="top-p"), ["routing='top-p'", "'top_k'", "'top_p'", "'shared'"]),
    (dict(routing="top_p", top_p=0.0), ["top_p=0.0", "(0, 1]"]),
    (dict(top_p=1.5), ["top_p=1.5", "(0, 1]"]),
    (dict(top_p=float("nan")), ["top_p=nan", "(0, 1]"]),
    (dict(top_p="0.25"), ["top_p='0.25'", "(0, 1]"]),
    (dict(routing="shared", num_experts=1, r=1, top_k=1), ["routing='shared'", "num_experts >= 2", "num_experts=1"]),
    (dict(routing="shared", num_experts=8, top_k=8), ["top_k=8", "routing='shared'", "num_experts - 1=7"]),
]


@pytest.mark.parametrize(
    "kwargs, words", BAD_CONFIGS, ids=[next(iter(k)) + "=" + repr(list(k.values())[-1]) for k, _ in BAD_CONFIGS]
)
def test_bad_config_raises_value_error_naming_field_value_and_allowed(kwargs, words):
    with pytest.raises(ValueError) as info:
        GoatConfig(**kwargs)
    message = str(info.value)
    assert "GoatConfig." in message
    for word in words:
        assert word in message, f"{word!r} missing from {message!r}"


@pytest.mark.parametrize(
    "config",
    [
        GoatConfig(),
        GoatConfig(
            r=16,
            num_experts=4,
            top_k=3,
            init="random",
            scaling="alpha",
            lora_alpha=32,
            eta=0.1,
            rho=1.0,
            init_cof=1.0,
            per_expert_scaling=True,
            routing="shared",
            top_p=0.5,
            dropout=0.0,
            target_modules=["q_proj", "v_proj"],
            exclude_modules=r".*\.0\..*",
            modules_to_save=["classifier"],
            aux_loss_coef=0.0,
            aux_loss_form="paper",
            aux_loss_ignore_padding=True,
            svd_method="gram",
            seed=7,
            base_model_name_or_path="minilm",
        ),
        GoatConfig(target_modules=r".*(query|value)$", init="zero"),
    ],
    ids=["defaults", "every-field", "regex-zero"],
)
def test_json_round_trip(config, tmp_path):
    assert GoatConfig.from_json(config.to_json()) == config
    path = tmp_path / "adapter_config.json"
    config.save(path, extra={"peft_type": "GOAT", "layers": {"fc1": [32, 24]}})
    assert json.loads(path.read_text())["peft_type"] == "GOAT"
    assert GoatConfig.load(path) == config


def test_unknown_field_is_refused_and_lists_the_allowed_ones():
    data = GoatConfig().to_dict() | {"num_expert": 4}
    with pytest.raises(
        ValueError, match=r"unknown GoatConfig field\(s\) \['num_expert'\].*allowed fields.*num_experts"
    ):
        GoatConfig.from_dict(data)


def test_invalid_values_in_json_are_validated():
    data = GoatConfig().to_dict() | {"top_k": 12}
    with pytest.raises(ValueError, match="top_k=12"):
        GoatConfig.from_json(json.dumps(data))


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_bad_json_text(text):
    with pytest.raises(ValueError):
        GoatConfig.from_json(text)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GoatConfig.load(tmp_path / "nope.json")
