"""SimpleTuner's user_prompt_library: a JSON file of {name: prompt} rendered at each validation."""

from __future__ import annotations

import json
import re
from pathlib import Path


def read_prompt_library(path: Path) -> dict[str, str]:
    """user_prompt_library: {name: prompt}, checked (ValueError naming the file and the entry)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"user_prompt_library {path} is not valid JSON: {exc.msg} at line {exc.lineno}.") from exc
    except OSError as exc:
        raise ValueError(f"user_prompt_library {path} cannot be read: {exc.strerror or exc}.") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"user_prompt_library {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8 JSON.") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"user_prompt_library {path} must be a non-empty JSON object of {{name: prompt}}.")
    for name, prompt in data.items():
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"user_prompt_library {path}: entry {name!r} must be a non-empty prompt string, got {prompt!r}.")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError(f"user_prompt_library {path}: name {name!r} may hold only letters, digits, ., - and _ "
                             "(it names the image files).")
    return dict(data)
