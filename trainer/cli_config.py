"""How `python -m trainer train` reads its config, the SimpleTuner way, so a SimpleTuner folder runs as it is.

- Which file: `--config PATH`; without it config/config.json under the working directory (SimpleTuner's
  train.py default), then ./config.json.
- Overrides: `--key=value`, `--key value` and a bare `--flag` (true) after the known options set config keys and
  win over the file; each is checked exactly like a file key (SimpleTuner's own train.py ignores command-line
  keys once it has read config.json, so nothing SimpleTuner runs is changed by this).
- data_backend_config: when neither it nor dataset_manifest is set, multidatabackend.json beside config.json, as
  SimpleTuner defaults to config/multidatabackend.json.
- Relative paths in config.json are read against the working directory, as SimpleTuner reads them; one that
  exists only beside config.json is read there; one that exists in both places as different files is refused,
  naming both. Every path that exists (and output_dir) is then made absolute: torchrun's processes start in the
  pack's folder and must name the same files. (Paths inside multidatabackend.json: trainer/databackend.py.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import PATH_KEYS, TrainConfig
from .simpletuner_keys import ALIASES

DEFAULT_LOCATIONS = (Path("config") / "config.json", Path("config.json"))


def find_config(path: str | None, *, cwd: Path) -> Path:
    """The config file to read: `path`, or the first of DEFAULT_LOCATIONS under cwd."""
    if path is not None:
        return Path(path).expanduser()
    for candidate in DEFAULT_LOCATIONS:
        if (cwd / candidate).is_file():
            return cwd / candidate
    raise ValueError(f"no --config given and neither {' nor '.join(str(cwd / c) for c in DEFAULT_LOCATIONS)} exists; "
                     "give --config path/to/config.json or run from the folder that holds config/config.json.")


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """Command-line `--key=value`, `--key value` and `--flag` as {key: value} (values as strings; a value that is
    a JSON object or list, such as tread_config, is read as JSON)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise ValueError(f"unexpected argument {token!r}: give config keys as --key=value or --key value.")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                value, i = tokens[i + 1], i + 1
            else:
                value = "true"
        if value.lstrip().startswith(("{", "[")):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--{key}: {value!r} is not valid JSON ({exc.msg}).") from None
        if key in out:
            raise ValueError(f"--{key} is given twice on the command line; keep one.")
        out[key] = value
        i += 1
    return out


def _canonical(raw_key: str) -> str:
    key = raw_key[2:] if raw_key.startswith("--") else raw_key
    return ALIASES.get(key, key)


def _resolve(key: str, value: str, *, cwd: Path, beside: Path, where: str) -> str:
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    here, there = cwd / path, beside / path
    if here.exists() and there.exists() and here.resolve() != there.resolve():
        raise ValueError(f"{where}: {key} {value!r} names both {here} (from the working directory, as SimpleTuner "
                         f"reads it) and {there} (beside the config file); give an absolute path.")
    if here.exists() or key == "output_dir":
        return str(here.resolve())
    if there.exists():
        return str(there.resolve())
    return value  # missing: the config's own check names it as written


def load_cli_config(path: str | None, *, overrides: list[str], cwd: Path | None = None) -> TrainConfig:
    """The TrainConfig of `python -m trainer train` (see the module doc)."""
    cwd = (cwd or Path.cwd()).resolve()
    file = find_config(path, cwd=cwd)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read config file {file}: {exc.strerror or exc}.") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"config file {file} is not valid UTF-8 JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {file} must hold a JSON object of keys.")
    given = parse_overrides(overrides)
    replaced = {_canonical(k) for k in given}
    merged = {k: v for k, v in data.items() if _canonical(k) not in replaced} | given
    keys = {_canonical(k) for k in merged}
    beside = file.resolve().parent
    if not keys & {"dataset_manifest", "data_backend_config"} and (beside / "multidatabackend.json").is_file():
        merged["data_backend_config"] = str(beside / "multidatabackend.json")
    where = f"config file {file}"
    for raw_key, value in merged.items():
        key = _canonical(raw_key)
        if key in PATH_KEYS and isinstance(value, str) and value.strip():
            merged[raw_key] = _resolve(key, value, cwd=cwd, beside=beside, where=where)
        elif key in PATH_KEYS and isinstance(value, list):
            merged[raw_key] = [_resolve(key, v, cwd=cwd, beside=beside, where=where) if isinstance(v, str) else v
                               for v in value]
    try:
        return TrainConfig.from_dict(merged)
    except ValueError as exc:
        raise ValueError(f"{where}" + (f" with {' '.join(overrides)}" if overrides else "") + f": {exc}") from exc
