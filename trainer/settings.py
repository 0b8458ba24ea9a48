"""How a setting is declared, converted and range-checked: the one helper every config in trainer/ uses.

A setting is a field of a frozen dataclass declared with `setting(...)`: its flat JSON key (SimpleTuner's
name), default and range live on the field, its type in the annotation and its documentation in the
docstring under it. `check_fields(obj)` (called from each dataclass's __post_init__) converts and checks
every such field, so direct construction and JSON loading apply the same rules and the same messages.
`convert(...)` also serves settings read outside a dataclass (databackend entries).

Imports only the standard library: ComfyUI imports the config at start-up for its combo lists.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import itertools
import math
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal

__all__ = ["PATHS", "Setting", "as_paths", "check_fields", "check_file", "check_range", "closest", "convert", "field_docs",
           "literal_choices", "setting"]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Setting:
    """What a field's metadata says about it: its JSON key and the range its value must lie in."""

    key: str
    """The flat JSON key (SimpleTuner's name), used in every error message."""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    fix: str | None = None
    """Advice appended to a range error ("use null to keep every checkpoint")."""
    empty_means_null: bool = False
    """SimpleTuner writes "" for "none" in this key: a blank string from JSON reads as null."""
    number_as_text: bool = False
    """A text setting SimpleTuner also accepts as a bare number ("validation_resolution": 1024)."""


def setting(key: str, default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, fix: str | None = None,
            empty_means_null: bool = False, number_as_text: bool = False) -> Any:
    """A dataclass field read from the flat JSON key `key`, checked to lie in the given bounds."""
    meta = {"setting": Setting(key=key, ge=ge, gt=gt, le=le, lt=lt, fix=fix, empty_means_null=empty_means_null,
                               number_as_text=number_as_text)}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_setting(field: dataclasses.Field) -> Setting | None:
    return field.metadata.get("setting")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under the field in cls's source, whitespace collapsed (the settings'
    user documentation, read where it is written: node tooltips quote it)."""
    [node] = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
    docs: dict[str, str] = {}
    body = node.body if isinstance(node, ast.ClassDef) else []
    for stmt, nxt in itertools.pairwise(body):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def check_fields(obj: Any) -> None:
    """Convert (strictly: no JSON string spellings) and range-check every `setting` field of a dataclass."""
    hints = typing.get_type_hints(type(obj))
    for field in dataclasses.fields(obj):
        spec = field_setting(field)
        if spec is None:
            continue
        value = convert(spec.key, getattr(obj, field.name), hints[field.name], from_json=False,
                        default=field.default)
        object.__setattr__(obj, field.name, value)
        if value is not None and not isinstance(value, bool) and isinstance(value, (int, float)):
            check_range(spec.key, value, ge=spec.ge, gt=spec.gt, le=spec.le, lt=spec.lt, fix=spec.fix)


def check_range(key: str, value: float, *, ge: float | None = None, gt: float | None = None,
                le: float | None = None, lt: float | None = None, fix: str | None = None) -> None:
    """Raise ValueError naming `key` when value is outside the bounds; [0, 1) style for unit intervals."""
    tail = f"; {fix}." if fix else "."
    if ge == 0 and (lt == 1 or le == 1):
        if not (0 <= value and (value < 1 if lt == 1 else value <= 1)):
            raise ValueError(f"{key} must be in {'[0, 1)' if lt == 1 else '[0, 1]'}, got {value!r}.")
        return
    if ge is not None and value < ge:
        raise ValueError(f"{key} must be >= {ge}, got {value!r}{tail}")
    if gt is not None and not value > gt:
        raise ValueError(f"{key} must be > {gt}, got {value!r}{tail}")
    if le is not None and value > le:
        raise ValueError(f"{key} must be <= {le}, got {value!r}.")
    if lt is not None and not value < lt:
        raise ValueError(f"{key} must be < {lt}, got {value!r}.")


def closest(key: str, candidates: list[str]) -> str:
    """"; did you mean 'x'?" for the nearest candidate, or "" when there is none."""
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.0)
    return f"; did you mean {match[0]!r}?" if match else ""


def literal_choices(hint: Any) -> tuple[str, ...] | None:
    if typing.get_origin(hint) is Literal:
        return tuple(typing.get_args(hint))
    return None


def split_optional(hint: Any) -> tuple[Any, bool]:
    """(T, True) for `T | None`, else (hint, False)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False


def expected(hint: Any) -> str:
    """How an error names the type a key wants."""
    base, _ = split_optional(hint)
    choices = literal_choices(base)
    if choices is not None:
        return f"one of {list(choices)}"
    if hasattr(base, "from_dict"):
        return 'an object like {"routes": [...]}'
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
            Path: "a path"}.get(base, str(base))


PATHS = str | tuple[str, ...] | None
"""One path or several, kept as the user wrote them (a string, or a list read as a tuple): the file round-trips."""


def as_paths(value: str | tuple[str, ...] | None) -> tuple[Path, ...]:
    """A PATHS setting as paths (~ expanded); () for none."""
    if value is None:
        return ()
    return tuple(Path(v).expanduser() for v in ((value,) if isinstance(value, str) else value))


def convert(key: str, value: Any, hint: Any, *, from_json: bool, default: Any = dataclasses.MISSING,
            why_refused: typing.Callable[[str, str], str | None] | None = None, empty_means_null: bool = False,
            number_as_text: bool = False) -> Any:
    """The value as the annotated type, or ValueError naming `key`.

    from_json also accepts SimpleTuner's string spellings ("1e-4", "true") and reads a nested object
    (`hint.from_dict`). Paths are expanded (~). why_refused(key, value): why a choice is refused, if known.
    """
    if hint == PATHS:
        return None if value is None else _convert_paths(key, value)
    base, optional = split_optional(hint)
    if value is None:
        if optional:
            return None
        fix = f"; remove the key to use the default {default!r}" if default is not dataclasses.MISSING else ""
        raise ValueError(f"{key} must be {expected(base)}, got null{fix}.")
    choices = literal_choices(base)
    if choices is not None:
        if not isinstance(value, str) or value not in choices:
            reason = why_refused(key, value) if why_refused is not None and isinstance(value, str) else None
            raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}" + (f" ({reason})." if reason else "."))
        return value
    if base is Path:
        if isinstance(value, Path):
            return value.expanduser()
        if isinstance(value, str):
            if value.strip():
                return Path(value).expanduser()
            if from_json and optional and empty_means_null:
                return None  # SimpleTuner writes "" for "none" in these keys
            raise ValueError(f"{key} is empty; give a path" + (", or null for none." if optional else "."))
        raise ValueError(f"{key} must be a path (a string), got {value!r}.")
    if hasattr(base, "from_dict"):  # a nested settings object written as JSON (tread_config)
        if isinstance(value, base):
            return value
        if from_json:
            return base.from_dict(value)
        raise ValueError(f"{key} must be a {base.__name__} (use TrainConfig.from_dict for JSON), got {value!r}.")
    if base is bool:
        if isinstance(value, bool):
            return value
        if from_json and isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ValueError(f"{key} must be true or false, got {value!r}.")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_json and isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            return int(value)
        raise ValueError(f"{key} must be a whole number, got {value!r}.")
    if base is float:
        return _convert_float(key, value, from_json=from_json)
    if base is str:
        if isinstance(value, str):
            if from_json and optional and empty_means_null and not value.strip():
                return None  # SimpleTuner writes "" for "none" in these keys
            return value
        if from_json and number_as_text and isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{key} must be a string, got {value!r}.")
    raise AssertionError(f"setting {key} has an unhandled type {hint!r}")


def _convert_float(key: str, value: Any, *, from_json: bool) -> float:
    number: Any = value
    if from_json and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{key} must be a number, got {value!r}.") from None
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ValueError(f"{key} must be a number, got {value!r}.")
    if not math.isfinite(number):
        raise ValueError(f"{key} must be a finite number, got {value!r}.")
    return float(number)


def _convert_paths(key: str, value: Any) -> str | tuple[str, ...]:
    """One path (a string) or several (a JSON list of strings, kept as a tuple)."""
    if isinstance(value, str) and not value.strip():
        raise ValueError(f"{key} holds a blank path; give a path (or a list of them), or null for none.")
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v.strip() for v in value):
        if len(set(value)) != len(value):
            fix = "give each dataset once (repeats weights it)" if key == "dataset_manifest" else "give each file once"
            raise ValueError(f"{key} lists a path twice ({list(value)}); {fix}.")
        return tuple(value)
    raise ValueError(f"{key} must be a path or a non-empty list of paths, got {value!r}.")


def to_json_value(value: Any) -> Any:
    """A setting's value as plain JSON: paths as strings, tuples as lists, nested objects via to_dict()."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value


def check_file(key: str, value: Path | None, *, what: str, suffix: str | None = None) -> None:
    """Refuse a path setting that is not an existing file (of the given suffix); None passes."""
    if value is None:
        return
    if not value.is_file():
        state = "is a folder" if value.is_dir() else "does not exist"
        raise ValueError(f"{key} {str(value)!r} {state}; give {what}.")
    if suffix is not None and value.suffix.lower() != suffix:
        raise ValueError(f"{key} {str(value)!r} is not a {suffix} file; give {what}.")
