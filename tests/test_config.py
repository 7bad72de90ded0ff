"""Typed configs: YAML + dotted overrides, unknown keys suggest the nearest valid one."""

import pytest

from mule.config import UnlearnConfig, load_config
from mule.errors import MuleError


def test_defaults_match_method_spec():
    c = UnlearnConfig()
    assert (c.method.k, c.method.alpha, c.method.beta) == (10, 1.0, 1.0)
    assert (c.train.lr, c.train.weight_decay, c.train.max_grad_norm, c.train.seed) == (1e-5, 0.01, 1.0, 42)
    assert c.lora.enabled and c.lora.target_modules == "all-linear"


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# mule unlearn --config c.yaml\nmethod:\n  name: duet\ntrain:\n  lr: 1e-4\n")
    c = load_config(path, ["train.batch_size=4", "method.alpha=2", "teacher.prompts={1: 'forget {NAME}'}"])
    assert c.method.name == "duet" and c.train.lr == 1e-4 and c.train.batch_size == 4
    assert c.method.alpha == 2.0 and isinstance(c.method.alpha, float)
    assert c.teacher.prompts == {1: "forget {NAME}"}


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown option config.train.lrr. Did you mean 'lr'?"),
    ("trian.lr=1", "unknown option config.trian. Did you mean 'train'?"),
    ("train.batch_size=big", "config.train.batch_size must be int"),
    ("train.lr", "must look like key.sub=value"),
])
def test_bad_options(override, message):
    with pytest.raises(MuleError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(MuleError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(MuleError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_a_section_given_in_part_keeps_its_parents_default():
    from mule.prepare import PrepareConfig

    config = load_config(None, ["train.max_steps=3", "model.name=tiny"], PrepareConfig)
    # PrepareConfig's own defaults for `train` and `model`, not TrainConfig's / ModelConfig's
    assert (config.train.lr, config.train.warmup_steps, config.train.group_by_length) == (1e-3, 20, True)
    assert (config.train.max_steps, config.model.name, config.model.dtype) == (3, "tiny", "float32")
    assert load_config(None, ["train.max_steps=3"]).train.lr == 1e-5  # UnlearnConfig's section default
