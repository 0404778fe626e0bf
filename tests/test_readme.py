"""README.md's configuration table says what the code and the shipped config really do.

For every key `config/dicom-node.toml` sets, the table's "shipped" column states that
value; for every key it gives a literal default, the config model has that default.
So the table cannot drift from either again (it once said the default architecture was
retinanet_r101_fpn without saying that the shipped file runs retinanet_r18_fpn).
"""

from __future__ import annotations

import re
import tomllib
from datetime import timedelta
from pathlib import Path

import pytest

from dicom_node.config import Config, parse_duration

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHIPPED = ROOT / "config" / "dicom-node.toml"
_LITERAL = re.compile(r"true|false|-?\d+(\.\d+)?")


def split_top_level(cell: str) -> list[str]:
    """Split a cell on commas outside backticks and parentheses."""
    parts, current, quoted, depth = [], "", False, 0
    for char in cell:
        if char == "`":
            quoted = not quoted
        elif not quoted and char in "()":
            depth += 1 if char == "(" else -1
        elif char == "," and not quoted and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        current += char
    return [*parts, current.strip()]


def literal(part: str) -> str | None:
    """The value a cell part states (`x` or a bare number/bool), or None for prose and "-"."""
    quoted = re.match(r"`([^`]*)`", part)
    if quoted:
        return quoted.group(1)
    return part if _LITERAL.fullmatch(part) else None


def table() -> dict[str, tuple[str | None, str | None, str]]:
    """{dotted key: (default literal, shipped literal, shipped cell)} of the Configuration table."""
    section = README.read_text().split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        key_cell, default_cell, shipped_cell, _meaning = [c.strip() for c in line.strip().strip("|").split(" | ")]
        keys, prefix = [], None
        for name in re.findall(r"`([^`]+)`", key_cell):
            if "." in name:
                prefix = name.rsplit(".", 1)[0]
                keys.append(name)
            else:
                keys.append(f"{prefix}.{name}" if prefix else name)
        defaults, shipped = split_top_level(default_cell), split_top_level(shipped_cell)
        for values in (defaults, shipped):
            if len(values) == 1:
                values *= len(keys)
            assert len(values) == len(keys), f"README row {line!r}: {len(keys)} keys, values {values}"
        for key, default, ship in zip(keys, defaults, shipped, strict=True):
            rows[key] = (literal(default), literal(ship), ship)
    return rows


def flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def same(value, text: str) -> bool:
    if isinstance(value, bool):
        return text == str(value).lower()
    if isinstance(value, (int, float)):
        return _LITERAL.fullmatch(text) is not None and float(text) == value
    if isinstance(value, list):
        return text == "[]" and value == []
    if isinstance(value, timedelta):  # a duration key: README writes it as the config does
        try:
            return parse_duration(text) == value
        except ValueError:
            return False
    return str(value) == text


SHIPPED_KEYS = sorted(flatten({k: v for k, v in tomllib.loads(SHIPPED.read_text()).items() if k != "destinations"}))


@pytest.mark.parametrize("key", SHIPPED_KEYS)
def test_the_table_states_what_the_shipped_config_sets(key):
    rows = table()
    assert key in rows, f"README's configuration table has no row for {key} (set by {SHIPPED.name})"
    value = flatten(tomllib.loads(SHIPPED.read_text()))[key]
    _, shipped, cell = rows[key]
    assert shipped is not None and same(value, shipped), f"{key}: README says {cell!r}, {SHIPPED.name} sets {value!r}"


def test_the_table_names_the_shipped_destinations():
    [row] = [line for line in README.read_text().splitlines() if line.startswith("| `[[destinations]]`")]
    shipped_cell = row.strip().strip("|").split(" | ")[2]
    for destination in tomllib.loads(SHIPPED.read_text())["destinations"]:
        for field in ("name", "ae_title", "host", "port"):
            assert f"`{destination[field]}`" in shipped_cell, (field, shipped_cell)


def test_keys_the_shipped_config_leaves_out_say_so():
    rows = table()
    for key, (_, shipped, cell) in rows.items():
        if key not in SHIPPED_KEYS and "*" not in key and not key.startswith("[["):
            assert cell == "-", f"{key}: not set in {SHIPPED.name}, but README's shipped column says {cell!r}"


def test_the_literal_defaults_are_the_config_model_defaults():
    defaults = Config()
    checked = 0
    for key, (default, _, _) in table().items():
        if default is None or "*" in key or key.startswith("[["):
            continue
        section, name = key.split(".", 1)
        value = getattr(getattr(defaults, section), name)
        assert same(value, default), f"{key}: README says default {default!r}, the config model has {value!r}"
        checked += 1
    assert checked >= 30  # the table was read, not skipped
