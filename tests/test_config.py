"""Config: typed sections, overrides, errors that name the key and the file; every example config loads."""

from pathlib import Path

import pytest

from chattune.config.load import config_from_dict, dump_config, load_config
from chattune.config.schema import Config
from chattune.errors import ChattuneError, ConfigError

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
    with pytest.raises(ChattuneError, match="missing.yaml: no such config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [\n"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_configs_load(path):
    cfg = load_config(path)
    assert Path(cfg.data.train_path).is_file(), "example configs point at the bundled data"
    assert cfg.lora.target_modules


@pytest.mark.parametrize(
    "text, key",
    [
        ("train:\n  lr: .nan\n", "train.lr"),
        ("train:\n  lr: .inf\n", "train.lr"),
        ("train:\n  epochs: .inf\n", "train.epochs"),
        ("train:\n  max_grad_norm: .nan\n", "train.max_grad_norm"),
        ("train:\n  max_grad_norm: 0\n", "train.max_grad_norm"),
        ("train:\n  weight_decay: -0.1\n", "train.weight_decay"),
        ("train:\n  warmup_ratio: -.inf\n", "train.warmup_ratio"),
        ("lora:\n  dropout: .nan\n", "lora.dropout"),
        ("data:\n  eval_ratio: .NaN\n", "data.eval_ratio"),
        ("eval:\n  max_eval_examples: 0\n", "eval.max_eval_examples"),
        ("train:\n  seed: -1\n", "train.seed"),
        ("train:\n  seed: 18446744073709551616\n", "train.seed"),
        ("train:\n  lr: 1e400\n", "train.lr"),
    ],
)
def test_non_finite_and_meaningless_numbers_are_refused_at_load(tmp_path, text, key):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.key == key and str(p) in str(e.value)


@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-inf", "1e999"])
def test_non_finite_overrides_are_refused(tmp_path, value):
    with pytest.raises(ConfigError, match="finite") as e:
        load_config(write(tmp_path, ""), [f"train.lr={value}"])
    assert e.value.key == "train.lr"


def test_output_dir_must_be_a_writable_directory(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="is a file") as e:
        load_config(write(tmp_path, f"train:\n  output_dir: {tmp_path / 'a-file'}\n"))
    assert e.value.key == "train.output_dir"
    with pytest.raises(ConfigError, match="is a file"):
        load_config(write(tmp_path, f"train:\n  output_dir: {tmp_path / 'a-file' / 'run'}\n"))
    # Unwritable: the probe file cannot be created (as root, permissions would not stop it, so the
    # refusal of the file system is simulated).
    import tempfile

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(ConfigError, match="cannot write in .*Permission denied"):
        load_config(write(tmp_path, f"train:\n  output_dir: {tmp_path / 'new' / 'run'}\n"))
    monkeypatch.undo()
    cfg = load_config(write(tmp_path, f"train:\n  output_dir: {tmp_path / 'new' / 'run'}\n"))
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".chattune-probe-*"))  # nothing left
    # Data commands write no run: they do not check it.
    load_config(write(tmp_path, f"train:\n  output_dir: {tmp_path / 'a-file'}\n"), check_output=False)
    assert cfg.train.output_dir.endswith("run")


def test_unwritable_output_dir_for_real(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(ConfigError, match="cannot write"):
        load_config(write(tmp_path, f"train:\n  output_dir: {locked / 'run'}\n"))


def test_deeply_nested_yaml_is_a_config_error(tmp_path):
    p = write(tmp_path, "train: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply|not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="nested too deeply|cannot parse"):
        load_config(None, ["train.lr=" + "[" * 100_000 + "]" * 100_000])


@pytest.mark.parametrize(
    "text, key",
    [
        ("track:\n  backend: swanlab\n  project: 法律问答微调\n", "track.project"),
        ("track:\n  backend: swanlab\n  project: my project\n", "track.project"),
        ("track:\n  backend: swanlab\n  project: ''\n", "track.project"),
        ("track:\n  backend: swanlab\n  project: " + "p" * 101 + "\n", "track.project"),
        ("track:\n  backend: swanlab\n  experiment: ''\n", "track.experiment"),
        ("track:\n  backend: swanlab\n  description: " + "d" * 1025 + "\n", "track.description"),
        ("track:\n  backend: swanlab\n  tags: [" + "t" * 513 + "]\n", "track.tags[0]"),
    ],
)
def test_swanlab_names_are_checked_at_load(tmp_path, text, key):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert e.value.key == key


def test_swanlab_name_rule_is_swanlabs_own():
    """Our copy of the rule agrees with the installed swanlab's (pydantic) constraint."""
    from pydantic import TypeAdapter, ValidationError
    from swanlab.sdk.internal.pkg.constraints import ProjectName

    from chattune.config.checks import _SWANLAB_PROJECT

    adapter = TypeAdapter(ProjectName)
    for name in [
        "chattune",
        "a.b+c-d_e",
        "法律问答微调",
        "my project",
        "",
        "x" * 100,
        "x" * 101,
        "a/b",
        "ok\n",
    ]:
        try:
            adapter.validate_python(name)
            theirs = True
        except ValidationError:
            theirs = False
        assert bool(_SWANLAB_PROJECT.fullmatch(name)) == theirs, name


def test_a_bad_value_from_the_command_line_is_named_there_not_in_the_file(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1.0e-4\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["train.epochs=2", "lora.r=-1"])
    assert str(e.value).startswith("command line (lora.r=-1): config key 'lora.r'")
    assert str(path) not in str(e.value)
    with pytest.raises(ConfigError) as e:  # a bad value in the file is still named by the file
        load_config(write(tmp_path, "lora:\n  r: -1\n"), ["train.epochs=2"])
    assert str(e.value).startswith(str(tmp_path)) and "'lora.r'" in str(e.value)


def test_every_bad_override_is_named_on_the_command_line(tmp_path):
    path = write(tmp_path, "lora:\n  r: 8\n")
    with pytest.raises(ConfigError) as e:  # a value YAML cannot read
        load_config(path, ["train.lr=["])
    assert str(e.value).startswith("command line") and "'train.lr'" in str(e.value)
    with pytest.raises(ConfigError) as e:  # no '='
        load_config(path, ["train.lr"])
    assert str(e.value).startswith("command line")
    with pytest.raises(ConfigError) as e:  # a whole section given on the command line replaces the file's
        load_config(path, ['lora={"r": -1}'])
    assert str(e.value).startswith("command line (lora={\"r\": -1}): config key 'lora.r'")
