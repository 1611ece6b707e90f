"""YAML values and `section.key=value` overrides -> the typed `Config` of `config.schema`.

Every key and type is checked; a mistake raises `ConfigError` naming the file (or the command line) and the
key. Relative paths the config reads are resolved against the config file's folder (`train.output_dir`,
which it writes, stays relative to the working directory, like every --output). `dump_config` writes what is saved
with every adapter.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from chattune.config.checks import check_methods, check_output_dir, check_values
from chattune.config.schema import Config
from chattune.errors import ChattuneError, ConfigError

# -- reading YAML: values only, each key once, aliases bounded --------------------------------------------
# A config is a few hundred values. Anchors and aliases are fine, but ten levels of aliases to lists of ten
# aliases make a 400-byte file that stands for 10**10 values: loading it is cheap (PyYAML shares the objects),
# walking or printing it never ends. The expanded size is counted on the node graph before anything is built.
MAX_YAML_VALUES = 100_000
_INT_LIMIT = 2**63 - 1  # torch and the C++ below it take int64; a larger count is a typo, not a plan


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (values only, no tags that build objects) that refuses a key given twice in one
    mapping: plain PyYAML keeps the last one, so a second `train:` section silently replaces the first."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                line = key_node.start_mark.line + 1
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"key '{key_node.value[:60]}' is given twice (lines {seen[key_node.value]} and {line}); "
                        "keep one",
                        key_node.start_mark,
                    )
                seen[key_node.value] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node, memo: dict[int, int]) -> int:
    """How many values `node` stands for once every alias is expanded (an alias counts as its whole target)."""
    key = id(node)
    if key in memo:
        if memo[key] < 0:
            raise yaml.YAMLError("an alias refers to a value that contains it")
        return memo[key]
    memo[key] = -1
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    else:
        children = []
    total = 1
    for child in children:
        total += _expanded_size(child, memo)
        if total > MAX_YAML_VALUES:
            break
    memo[key] = total
    return total


def read_yaml(text: str) -> Any:
    """YAML text -> plain values. Raises yaml.YAMLError for invalid YAML, a key given twice in a mapping, or
    aliases that expand to more than MAX_YAML_VALUES values; RecursionError when nested too deeply."""
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise yaml.YAMLError(
                f"its aliases expand to more than {MAX_YAML_VALUES:,} values; a config needs a few hundred"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


# What an error message shows of a value: a few items and levels, never the whole of something huge.
_SHORT = reprlib.Repr()  # keyword arguments only from Python 3.12
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = (
    2,
    4,
    4,
    60,
    60,
    40,
)


def _show(value: Any) -> str:
    """repr(value), bounded: at most a few items and levels, 200 characters."""
    text = _SHORT.repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


# -- YAML -> dataclasses --------------------------------------------------------------------------------
def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"  # YAML's word for it (or leave the key out)
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, path: str | None) -> Any:
    """Check `value` against the annotation `tp`; return it (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key, path)
            except ConfigError as e:
                errors.append(e.reason)
        raise ConfigError(
            key,
            f"expected {' or '.join(_describe(a) for a in typing.get_args(tp))}, got {_show(value)}",
            path,
        )
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(key, f"expected null, got {_show(value)}", path)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(key, f"expected {_describe(tp)}, got {_show(value)}", path)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str) and item_tp is str:
            raise ConfigError(key, f"expected a list of strings, got {_show(value)}", path)
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {_show(value)}", path)
        if dataclasses.is_dataclass(item_tp):  # a list of sections, e.g. eval.benchmarks
            return [_build(item_tp, v, f"{key}[{i}]", path) for i, v in enumerate(value)]
        return [_coerce(v, item_tp, f"{key}[{i}]", path) for i, v in enumerate(value)]
    if tp is dict:  # a mapping passed on as given (data.template_kwargs); its section checks the values
        if isinstance(value, dict):
            return dict(value)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > _INT_LIMIT:
                raise ConfigError(
                    key, f"{_show(value)} is too large for a count (at most {_INT_LIMIT})", path
                )
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int beyond any float
                number = math.inf
        elif isinstance(value, str):  # PyYAML reads `1e-4` (no dot) as a string; it is the number meant
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                # `.nan` / `.inf` in YAML: AdamW would train on it after minutes of loading, or write NaN weights.
                raise ConfigError(key, f"must be a finite number, got {_show(value)}", path)
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a programming error, not user input
        raise TypeError(f"unsupported annotation {tp} for {key}")
    raise ConfigError(key, f"expected {_describe(tp)}, got {_show(value)}", path)


def _build(cls: type, values: Any, prefix: str, path: str | None) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(prefix, f"expected a mapping of keys, got {_show(values)}", path)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        key = getattr(cls, "KEY_ALIASES", {}).get(key, key)  # e.g. data.columns.instruction -> .prompt
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            known = ", ".join(sorted(names))
            raise ConfigError(full, f"unknown key{hint} (known keys here: {known})", path)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, full, path)
        else:
            kwargs[key] = _coerce(value, tp, full, path)
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a section's own cross-field check: add the file it came from
        # A list item's check names its key alone ("shots"): put the item's place in front.
        key = e.key if "." in e.key or not prefix else f"{prefix}.{e.key}"
        if (e.path is None and path is not None) or key != e.key:
            raise ConfigError(key, e.reason, e.path or path) from None
        raise


def _set_dotted(tree: dict, dotted: str, value: Any, path: str | None) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(dotted, f"'{part}' is not a section", path)
        node = child
    node[parts[-1]] = value


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error in one line: what, and where (its own message spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """`train.lr=2e-4` -> ("train.lr", 0.0002). Values are parsed as YAML scalars/lists."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(
                item, "an override must look like section.key=value (e.g. train.lr=2e-4)", "command line"
            )
        key, raw = item.split("=", 1)
        try:
            value = read_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(
                key, f"cannot parse value {raw[:80]!r}: {_yaml_problem(e)}", "command line"
            ) from None
        except RecursionError:
            raise ConfigError(key, "the value is nested too deeply", "command line") from None
        # YAML reads 2e-4 as a string (no dot); accept the number the user meant.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value.lower() for c in "e.") else value
            except ValueError:
                pass
        out.append((key.strip(), value))
    return out


def config_from_dict(tree: dict, path: str | None = None) -> Config:
    cfg = _build(Config, tree, "", path)
    bad = check_values(cfg) + check_methods(cfg)
    if bad:
        key, reason = bad[0]
        raise ConfigError(key, reason, path)
    return cfg


def _missing_file(p: Path) -> str:
    """`configs/x.yml: no such config file`, with the nearest file that does exist in that folder."""
    folder = p.parent if p.parent.is_dir() else None
    names = [c.name for c in folder.iterdir() if c.suffix in (".yaml", ".yml")] if folder else []
    near = difflib.get_close_matches(p.name, names, n=1, cutoff=0.5)
    hint = f"did you mean {folder / near[0]}?" if near else "give the path to a YAML config file"
    return f"{p}: no such config file; {hint}"


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, *, check_output: bool = True
) -> Config:
    """Read YAML at `path` (or start from defaults when None), apply overrides, validate.

    With `check_output` (training), `train.output_dir` must also be writable (`check_output_dir`);
    commands that only read (`chattune data ...`) pass False."""
    tree: dict = {}
    where = None
    if path is not None:
        where = str(path)
        p = Path(path)
        if not p.is_file():
            raise ChattuneError(_missing_file(p))
        try:
            tree = read_yaml(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError("(file)", f"not valid YAML: {_yaml_problem(e)}", where) from None
        except RecursionError:
            raise ConfigError("(file)", "nested too deeply to be a config", where) from None
        except UnicodeDecodeError as e:
            raise ConfigError(
                "(file)", f"not valid UTF-8 (byte {e.start}); save it as UTF-8", where
            ) from None
        if not isinstance(tree, dict):
            raise ConfigError("(file)", "the top level must be a mapping of sections", where)
        # Relative paths it reads are relative to the file, not the shell's cwd (train.output_dir is not).
        tree = _resolve_relative(tree, p.parent)
    given = {}  # key -> the override as typed, for messages about a value that came from the command line
    for typed, (key, value) in zip(overrides or [], parse_overrides(overrides or []), strict=True):
        _set_dotted(tree, key, value, "command line")
        given[key] = typed if len(typed) <= 80 else typed[:77] + "..."
    try:
        cfg = config_from_dict(tree, where)
        if check_output:
            check_output_dir(cfg.train, where)
    except ConfigError as e:
        # The override that set the key, or the section holding it (`lora={r: -1}` replaces the file's lora).
        typed = given.get(e.key) or next((given[k] for k in given if e.key.startswith(k + ".")), None)
        if typed is None:
            raise
        raise ConfigError(e.key, e.reason, f"command line ({typed})") from None
    return cfg


_PATH_KEYS = [
    ("data", "train_path"),
    ("data", "eval_path"),
    ("eval", "samples_path"),
    ("model", "chat_template"),
]


def _resolve_relative(tree: dict, base: Path) -> dict:
    tree = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tree.items()}

    def resolved(value):
        if isinstance(value, str) and value and not Path(value).is_absolute() and (base / value).exists():
            return str((base / value).resolve())
        return value

    for sec, key in _PATH_KEYS:
        section = tree.get(sec)
        if isinstance(section, dict) and key in section:
            value = section[key]
            section[key] = [resolved(v) for v in value] if isinstance(value, list) else resolved(value)
    model = tree.get("model")
    if isinstance(model, dict) and isinstance(model.get("name_or_path"), str):
        value = model["name_or_path"]
        if value.startswith((".", "/")) or (base / value).is_dir():
            if (base / value).exists():
                model["name_or_path"] = str((base / value).resolve())
    return tree


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), allow_unicode=True, sort_keys=False)


def flatten_keys(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config tree as dotted keys: {"lora": {"r": 8}} -> {"lora.r": 8} (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
