"""Config: YAML + dotted overrides into validated dataclasses; every error names the key."""
from pathlib import Path

import pytest

from config import Config, ConfigError, load_config, to_yaml

REPO = Path(__file__).resolve().parents[1]


def test_every_config_file_loads_and_validates():
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert files
    for path in files:
        first = path.read_text().splitlines()[0]
        assert first.startswith("#"), f"{path.name} must start with a comment giving its command"
        if path.name.startswith("sweep_"):
            continue  # sweep files are validated by the sweep launcher's own tests
        assert isinstance(load_config(path), Config)


def test_overrides_replace_yaml_values_with_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# test\nloss:\n  beta: 0.1\ntrain:\n  lr: 1.0e-6\n")
    cfg = load_config(path, ["loss.beta=0.05", "train.lr=5e-7", "train.max_steps=3",
                             "lora.target_modules=[q_proj,v_proj]", "data.columns={prompt: q}", "output_dir=123"])
    assert cfg.loss.beta == 0.05 and cfg.train.lr == 5e-7 and cfg.train.max_steps == 3
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.data.columns == {"prompt": "q"}
    assert cfg.output_dir == "123"
    assert load_config(None, []) == Config()


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["loss.beta=0.3", "lora.r=8"])
    path = tmp_path / "resolved.yaml"
    path.write_text("# resolved\n" + to_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("override, key", [
    ("train.lrr=1", "train.lrr"),
    ("nope.x=1", "nope.x"),
    ("loss.beta.x=1", "loss.beta.x"),
])
def test_unknown_key_is_an_error_naming_it(override, key):
    with pytest.raises(ConfigError, match=rf"{key}: unknown config key"):
        load_config(None, [override])


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'train.lr'"):
        load_config(None, ["train.lrr=1"])


@pytest.mark.parametrize("override, key", [
    ("loss.beta=-1", "loss.beta"),
    ("loss.beta=abc", "loss.beta"),
    ("loss.name=ppo", "loss.name"),
    ("loss.type=kto", "loss.type"),
    ("loss.label_smoothing=0.5", "loss.label_smoothing"),
    ("train.max_steps=1.5", "train.max_steps"),
    ("train.batch_size=0", "train.batch_size"),
    ("data.format=xml", "data.format"),
    ("data.eval_fraction=1.0", "data.eval_fraction"),
    ("data.on_bad_record=ignore", "data.on_bad_record"),
    ("data.columns.answer=x", "data.columns.answer"),
    ("tokenize.max_prompt_length=9999", "tokenize.max_prompt_length"),
    ("model.dtype=int8", "model.dtype"),
    ("lora.r=-1", "lora.r"),
    ("train.max_steps=true", "train.max_steps"),
])
def test_bad_value_is_an_error_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"{key}"):
        load_config(None, [override])


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("# x\nloss:\n  beta: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("# x\ntrain:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml: train.lr: expected a number"):
        load_config(wrong)
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(None, ["loss.beta"])


def test_string_fields_take_override_text_as_typed_and_yaml_booleans_are_explained(tmp_path):
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("# x\ntrain:\n  mixed_precision: no\n")
    with pytest.raises(ConfigError, match=r"train.mixed_precision: expected a string; got False \(YAML reads no/yes"):
        load_config(path)


@pytest.mark.parametrize("overrides, keys", [
    (["loss.type=bco_pair", "loss.f_divergence=js_divergence"], ("loss.f_divergence", "loss.type has bco_pair")),
    (["loss.type=[sigmoid,simpo]", "loss.f_divergence=forward_kl"], ("loss.f_divergence", "loss.type has simpo")),
    (["loss.type=aot", "loss.wpo=true"], ("loss.wpo", "loss.type aot")),
    (["loss.type=exo_pair"], ("loss.label_smoothing", "loss.type exo_pair")),
    (["loss.type=[sigmoid,sft]", "loss.weights=[1.0]"], ("loss.weights", "loss.type")),
    (["loss.type=[sigmoid,sft]", "loss.rpo_alpha=0.5"], ("loss.rpo_alpha", "loss.type")),
    (["loss.type=simpo", "loss.sync_ref_every=4"], ("loss.sync_ref_every", "loss.type")),
    (["loss.sync_ref_every=4", "lora.r=8"], ("loss.sync_ref_every", "lora.r=8")),
    (["loss.type=[sigmoid,sigmoid]"], ("loss.type", "twice")),
    (["loss.type=[sigmoid,kto]"], ("loss.type[1]", "kto")),
    (["loss.f_divergence=tv"], ("loss.f_divergence", "tv")),
    (["loss.ld_alpha=1.5"], ("loss.ld_alpha", "[0, 1]")),
    (["loss.sync_ref_alpha=0"], ("loss.sync_ref_alpha", "(0, 1]")),
])
def test_refused_objective_combinations_name_both_keys(overrides, keys):
    """What TRL refuses (f-divergence on a loss without the margin, WPO on a sorting loss, EXO without ε, TR-DPO with
    PEFT) and what would be ambiguous here: one line naming the keys involved."""
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value) and all(k in str(e.value) for k in keys), str(e.value)


def test_loss_type_takes_one_name_a_list_or_a_comma_list_and_rpo_alpha_adds_sft():
    assert load_config(None, []).loss.types == ["sigmoid"]
    mpo = load_config(None, ["loss.type=[sigmoid,bco_pair,sft]", "loss.weights=[0.8,0.2,1.0]"]).loss
    assert (mpo.types, mpo.term_weights) == (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])
    assert load_config(None, ["loss.type=sigmoid,sft"]).loss.types == ["sigmoid", "sft"]
    rpo = load_config(None, ["loss.rpo_alpha=0.5"]).loss
    assert (rpo.type, rpo.types, rpo.term_weights) == ("sigmoid", ["sigmoid", "sft"], [1.0, 0.5])
