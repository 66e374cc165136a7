"""The files users handle: YAML they write and edit, JSON that other programs parse.

`read_yaml` reads hardware profiles and `rules=` tables with one-line errors. Only PyYAML's safe loader is used: a `!!python/...` tag is refused, never executed. Every failure - a
missing file, bytes that are not UTF-8, a YAML syntax error, a tag, a value PyYAML cannot build (a
`2024-13-45` date) - becomes the caller's error type with one line that names the file, where in it,
and what the file should contain.

`finite_json` makes a document strict JSON: Python's `json` writes NaN and Infinity, which strict parsers
(jq, JavaScript, Go) reject, so non-finite floats become null and their paths are listed.
"""

from __future__ import annotations

import math
import os
from typing import Any

import yaml


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def read_yaml(path: str | os.PathLike, what: str, error: type[Exception], expected: str) -> Any:
    """The document in `path`, or `error("<what> '<path>': <problem>; <expected>")`."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise error(f"{what} {name!r} not found; {expected}") from None
    except OSError as e:
        raise error(f"cannot read {what} {name!r}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {name!r} is not UTF-8 text (bad byte at offset {e.start}); {expected}") from None
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as e:
        where = f" line {e.problem_mark.line + 1}" if e.problem_mark else ""
        tag = _one_line(e.problem).removeprefix("could not determine a constructor for the tag ")
        if "constructor for the tag" in _one_line(e.problem):
            raise error(
                f"{what} {name!r}{where}: the YAML tag {tag} is not allowed (codesign reads plain "
                f"YAML and never builds Python objects from a file); remove the tag"
            ) from None
        raise error(f"{what} {name!r}{where}: {_one_line(e.problem)}; {expected}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise error(
            f"{what} {name!r} is not valid YAML{where}: {_one_line(e.problem or e.context)}; {expected}"
        ) from None
    except yaml.YAMLError as e:
        raise error(f"{what} {name!r} is not valid YAML: {_one_line(e)}; {expected}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        # PyYAML's constructors raise plain Python errors for values such as a date with month 13.
        raise error(f"{what} {name!r} holds a value YAML cannot read ({_one_line(e)}); {expected}") from None


def finite_json(doc: Any, path: str = "") -> tuple[Any, list[str]]:
    """`doc` with every non-finite float replaced by None, and the paths (`candidates[2].mfu`) replaced.

    numpy scalars and arrays become plain numbers and lists; anything else JSON cannot hold becomes its str.
    """
    bad: list[str] = []

    def walk(x: Any, at: str) -> Any:
        if isinstance(x, bool) or x is None or isinstance(x, (str, int)):
            return x
        if isinstance(x, float):
            if math.isfinite(x):
                return x
            bad.append(at or "$")
            return None
        if isinstance(x, dict):
            return {str(k): walk(v, f"{at}.{k}" if at else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{at}[{i}]") for i, v in enumerate(x)]
        if hasattr(x, "tolist"):  # numpy scalar or array, without importing numpy here
            return walk(x.tolist(), at)
        return str(x)

    return walk(doc, path), bad
