"""Reading ``.jsonl`` inputs: one JSON object per line, blank lines skipped, a bad line is a one-line error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from meshwright.errors import ConfigError


def iter_jsonl(path: Path, errors: str = "strict") -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for every non-blank line of ``path``."""
    with path.open(encoding="utf-8", errors=errors) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"{path}:{lineno} is not valid JSON; valid: one JSON object per line") from None
