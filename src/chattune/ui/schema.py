"""The run form, generated from the config dataclasses: every section and key, its type, choices,
default and the docstring written under it in the config's source (the one place a key is explained).

form values {"section.key": text or bool} --to_tree--> a config tree --config_from_dict--> Config
A key added to the config appears in the form with no UI code; validation is the config's own.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from functools import cache
from typing import Any, Literal

import yaml

from chattune.config.schema import Config
from chattune.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Field:
    """One config key as the form shows it. `kind`: bool (a checkbox), choice (a select of `choices`),
    int / float / str (a text box), yaml (a YAML value: lists, unions). `nullable`: empty means null."""

    key: str  # dotted, e.g. "data.columns.prompt"
    kind: str
    default: Any
    nullable: bool
    choices: list[str]
    doc: str
    type: str  # the annotation as written in the config, e.g. "int | None"


def _docstrings(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal right under a field), by field name."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source shipped: the form still has every key, without help
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        is_doc = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and is_doc:
            if isinstance(after.value.value, str):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _annotation_text(cls: type, name: str) -> str:
    raw = {f.name: f.type for f in dataclasses.fields(cls)}[name]
    return raw if isinstance(raw, str) else getattr(raw, "__name__", str(raw))


def _kind(tp: Any) -> tuple[str, bool, list[str]]:
    args = typing.get_args(tp)
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    nullable = union and type(None) in args
    inner = [a for a in args if a is not type(None)] if union else [tp]
    if len(inner) == 1:
        (one,) = inner
        if one is bool:
            return "bool", nullable, []
        if typing.get_origin(one) is Literal:
            return "choice", nullable, [str(a) for a in typing.get_args(one)]
        if one in (int, float, str):
            return one.__name__, nullable, []
    return "yaml", nullable, []


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


@cache
def form_fields() -> tuple[tuple[str, str, tuple[Field, ...]], ...]:
    """Every config key, grouped by section: ((section, section doc, fields), ...), in the config's order.
    A nested section (data.columns) contributes its keys to its parent section."""
    out = []
    for sec in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[sec.name]
        out.append(
            (
                sec.name,
                inspect.cleandoc(cls.__doc__ or "") if _own_doc(cls) else "",
                tuple(_walk(cls, sec.name)),
            )
        )
    return tuple(out)


def _own_doc(cls: type) -> bool:
    # dataclasses give a class without a docstring one made from its signature: not help text.
    return bool(cls.__doc__) and not cls.__doc__.startswith(cls.__name__ + "(")


def _walk(cls: type, prefix: str) -> list[Field]:
    hints, docs, fields = typing.get_type_hints(cls), _docstrings(cls), []
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(tp):
            fields += _walk(tp, key)
            continue
        kind, nullable, choices = _kind(tp)
        fields.append(
            Field(
                key, kind, _default(f), nullable, choices, docs.get(f.name, ""), _annotation_text(cls, f.name)
            )
        )
    return fields


def all_keys() -> list[str]:
    """Every dotted config key the form has."""
    return [f.key for _, _, fields in form_fields() for f in fields]


def form_schema() -> list[dict]:
    """The form as JSON for the page: sections with their fields; a default as the text its box shows."""
    return [
        {
            "section": name,
            "doc": doc,
            "fields": [{**dataclasses.asdict(f), "text": to_text(f, f.default)} for f in fields],
        }
        for name, doc, fields in form_fields()
    ]


def to_text(f: Field, value: Any) -> Any:
    """A value as the form shows it: a bool for a checkbox, "" for null, YAML flow text for lists."""
    if f.kind == "bool":
        return bool(value)
    if value is None:
        return ""
    if f.kind == "yaml" and isinstance(value, str) and value and yaml.safe_load(value) == value:
        return value  # a plain path or name reads as itself
    if f.kind == "yaml":
        return (
            yaml.safe_dump(value, default_flow_style=True, allow_unicode=True)
            .strip()
            .removesuffix("...")
            .strip()
        )
    return str(value)


def values_from_tree(tree: dict) -> dict[str, Any]:
    """A config tree (a run's config.yaml, an uploaded YAML) as form values, by dotted key; keys the
    form does not have are left to `config_from_dict` to name."""
    by_key = {f.key: f for _, _, fields in form_fields() for f in fields}
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if key in by_key:
                out[key] = to_text(by_key[key], v)
            elif isinstance(v, dict):
                walk(v, key)

    if isinstance(tree, dict):
        walk(tree, "")
    return out


def to_tree(values: Any) -> dict:
    """Form values {"section.key": text or bool} -> a config tree holding the keys that differ from the
    defaults. Raises ConfigError naming the key for an unknown key or a value that is not one."""
    if not isinstance(values, dict):
        raise ConfigError("(form)", "expected an object of config keys, e.g. {'train.lr': '2e-4'}")
    by_key = {f.key: f for _, _, fields in form_fields() for f in fields}
    tree: dict = {}
    for key, given in values.items():
        f = by_key.get(key)
        if f is None:
            raise ConfigError(str(key)[:200], "no such config key")
        value = _parse_value(f, given)
        if value == f.default:
            continue
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _parse_value(f: Field, given: Any) -> Any:
    if f.kind == "bool":
        if not isinstance(given, bool):
            raise ConfigError(f.key, f"expected true or false, got {given!r}"[:300])
        return given
    if not isinstance(given, str):
        raise ConfigError(f.key, f"expected the field's text, got {type(given).__name__}")
    text = given.strip()
    if text == "" and (f.nullable or f.default is None):
        return None
    if text == "" and f.default == "":
        return ""
    if f.kind == "str":
        return given
    if f.kind == "choice":
        return text
    try:  # int / float / yaml: YAML's reading of the text; the config checks the type and names the key
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or "unreadable"
        raise ConfigError(f.key, f"not a YAML value ({problem}): {text[:80]!r}") from None
