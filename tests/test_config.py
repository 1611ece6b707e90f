"""Config: typed sections, overrides, errors that name the key and the file; every example config loads."""

from pathlib import Path

import pytest

from chattune.config import Config, config_from_dict, dump_config, load_config
from chattune.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_defaults_and_overrides(tmp_path):
    p = write(tmp_path, "train:\n  lr: 1.0e-4\n  epochs: 2\nlora:\n  r: 8\n")
    cfg = load_config(p, ["train.lr=2e-4", "lora.target_modules=[q_proj,v_proj]", "data.system_prompt=你好"])
    assert isinstance(cfg, Config)
    assert cfg.train.lr == pytest.approx(2e-4)
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.system_prompt == "你好"
    # The resolved config round-trips through YAML.
    import yaml

    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


@pytest.mark.parametrize(
    "text, key",
    [
        ("train:\n  lr: 1e-4\n  lrr: 3\n", "train.lrr"),
        ("trian:\n  lr: 0.1\n", "trian"),
        ("train:\n  micro_batch_size: four\n", "train.micro_batch_size"),
        ("train:\n  micro_batch_size: 0\n", "train.micro_batch_size"),
        ("lora:\n  dropout: 1.5\n", "lora.dropout"),
        ("data:\n  truncation: middle\n", "data.truncation"),
        ("train:\n  packing: 'yes'\n", "train.packing"),
    ],
)
def test_bad_config_names_key_and_file(tmp_path, text, key):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.key == key
    assert str(p) in str(e.value) and key in str(e.value)


def test_bad_override_names_key(tmp_path):
    with pytest.raises(ConfigError, match="train.nope"):
        load_config(write(tmp_path, ""), ["train.nope=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(write(tmp_path, ""), ["train.lr"])


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [\n"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_configs_load(path):
    cfg = load_config(path)
    assert Path(cfg.data.train_path).is_file(), "example configs point at the bundled data"
    assert cfg.lora.target_modules
