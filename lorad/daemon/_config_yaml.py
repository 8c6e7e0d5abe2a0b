"""The config file as located data: YAML read with the line of every mapping and key, where a value
sits (`_At`: file, dotted key, line), and the one error every check raises (`ConfigError`).

Every other config module checks values through `_At.error`, so each message names the file, the line
and the dotted key the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from lorad.errors import LoradError


class ConfigError(LoradError):
    """The configuration cannot be used as written."""


# ---------------------------------------------------------------------------------------------
# YAML with line numbers


class _Located(dict):  # type: ignore[type-arg]
    """A YAML mapping that remembers its own line and the line of each key (1-based)."""

    line: int = 0
    key_lines: dict[Any, int]


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode):  # type: ignore[no-untyped-def]
    data = _Located()
    data.line = node.start_mark.line + 1
    data.key_lines = {}
    yield data
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            raise ConfigError(f"{loader.name}: line {line}: keys must be strings, not {key!r}")
        if key in data:
            raise ConfigError(f"{loader.name}: line {line}: duplicate key {key!r}")
        data.key_lines[key] = line
        data[key] = loader.construct_object(value_node, deep=True)


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(text: str, source: str) -> Any:
    loader = _LineLoader(text)
    loader.name = source
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}" if mark else "somewhere"
        raise ConfigError(f"{source}: {where}: not valid YAML: {e.problem}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from e
    finally:
        loader.dispose()


# ---------------------------------------------------------------------------------------------
# Where a value sits, and the mapping check every section starts with


@dataclass(frozen=True)
class _At:
    """Where a value sits: the file, the dotted key and its line."""

    source: str
    key: str
    line: int

    def child(self, mapping: _Located, key: str) -> _At:
        dotted = f"{self.key}.{key}" if self.key else key
        return _At(self.source, dotted, mapping.key_lines.get(key, mapping.line))

    def item(self, index: int, value: Any) -> _At:
        return _At(self.source, f"{self.key}[{index}]", getattr(value, "line", self.line))

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: line {self.line}: {self.key}: {message}")


def _mapping(value: Any, at: _At, allowed: Sequence[str] | None = None) -> _Located:
    if not isinstance(value, _Located):
        raise at.error(f"expected a mapping, got {_kind(value)}")
    if allowed is not None:
        for key in value:
            if key not in allowed:
                line = value.key_lines.get(key, value.line)
                dotted = f"{at.key}.{key}" if at.key else key
                raise ConfigError(
                    f"{at.source}: line {line}: unknown key {dotted!r} (allowed: {', '.join(allowed)})"
                )
    return value


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__.replace("_Located", "mapping")
