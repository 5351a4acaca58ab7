"""
Typed INI configuration with embedded defaults.

Each daemon declares its keys once (L{Key}: section, name, type, default,
doc).  That declaration is the embedded default configuration, the parser's
validator, and the source the sample files under C{etc/} are checked against,
so a key cannot exist without being documented.
"""

from __future__ import annotations

import configparser
import os
from typing import Any, Callable, Iterable, Mapping

import attr


class ConfigError(Exception):
    """The configuration could not be read or a value is invalid."""


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _octal(text: str) -> int:
    return int(text.strip(), 8)


def _list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _positive_int(text: str) -> int:
    value = int(text.strip())
    if value <= 0:
        raise ValueError(f"must be > 0: {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text.strip())
    if value <= 0:
        raise ValueError(f"must be > 0: {value}")
    return value


def _port(text: str) -> int:
    value = int(text.strip())
    if not 0 <= value <= 65535:
        raise ValueError(f"not a TCP port: {value}")
    return value


def _log_level(text: str) -> str:
    value = text.strip().lower()
    if value not in ("debug", "info", "warn", "error", "critical"):
        raise ValueError(f"not a log level: {text!r}")
    return value


#: Parsers by type name, as written in the schema and the docs.
TYPES: Mapping[str, Callable[[str], Any]] = {
    "str": str.strip,
    "path": lambda text: os.path.normpath(text.strip()) if text.strip() else "",
    "int": lambda text: int(text.strip()),
    "positive-int": _positive_int,
    "positive-float": _positive_float,
    "port": _port,
    "bool": _bool,
    "octal": _octal,
    "list": _list,
    "log-level": _log_level,
}


@attr.frozen
class Key:
    """One configuration key: where it lives, how it parses, why it exists."""

    section: str
    name: str
    type: str
    default: str
    doc: str
    #: When set, the only values accepted.
    choices: tuple[str, ...] = ()

    def parse(self, text: str) -> Any:
        try:
            value = TYPES[self.type](text)
            if self.choices and value not in self.choices:
                raise ValueError(f"must be one of {', '.join(self.choices)}")
            return value
        except (ValueError, KeyError) as e:
            raise ConfigError(f"[{self.section}] {self.name} = {text!r}: {e}") from None


@attr.frozen
class Config:
    """Parsed configuration: C{config["section", "name"]} gives a typed value."""

    values: Mapping[tuple[str, str], Any]
    source: str

    def __getitem__(self, key: tuple[str, str]) -> Any:
        return self.values[key]

    def section(self, name: str) -> dict[str, Any]:
        return {k: v for (s, k), v in self.values.items() if s == name}


@attr.frozen
class Schema:
    """The declared keys of one daemon's configuration."""

    keys: tuple[Key, ...]

    def defaults(self) -> Config:
        return self.parse_text("", source="<embedded defaults>")

    def load(self, path: str | None) -> Config:
        """Read C{path}, or use the embedded defaults when C{path} is None."""
        if path is None:
            return self.defaults()
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from None
        return self.parse_text(text, source=path)

    def parse_text(self, text: str, source: str = "<string>") -> Config:
        parser = configparser.ConfigParser(interpolation=None, strict=True)
        parser.optionxform = str  # keep key case
        try:
            parser.read_string(text, source=source)
        except configparser.Error as e:
            raise ConfigError(f"{source}: {e}") from None
        known = {(k.section, k.name): k for k in self.keys}
        for section in parser.sections():
            for name in parser[section]:
                if (section, name) not in known:
                    raise ConfigError(f"{source}: unknown key [{section}] {name}")
        values = {}
        for key in self.keys:
            text_value = parser.get(key.section, key.name, fallback=key.default)
            values[(key.section, key.name)] = key.parse(text_value)
        return Config(values=values, source=source)

    def documented_in(self, sample_text: str) -> list[str]:
        """Keys of this schema missing from a sample file (for the tests)."""
        parser = configparser.ConfigParser(interpolation=None)
        parser.optionxform = str
        # The sample documents keys as commented assignments: "# name = default".
        uncommented = "\n".join(
            line[2:] if line.startswith("# ") and "=" in line and not line.startswith("#  ") else line
            for line in sample_text.splitlines()
        )
        parser.read_string(uncommented)
        return [
            f"[{k.section}] {k.name}"
            for k in self.keys
            if not parser.has_option(k.section, k.name)
        ]

    def render_sample(self, header: str) -> str:
        """A documented sample file: every key, commented, at its default."""
        out = [header.rstrip(), ""]
        section = None
        for key in self.keys:
            if key.section != section:
                section = key.section
                out.append(f"[{section}]")
                out.append("")
            for line in key.doc.split("\n"):
                out.append(f"## {line}".rstrip())
            out.append(f"## type: {key.type}" + (f" ({' | '.join(key.choices)})" if key.choices else ""))
            out.append(f"# {key.name} = {key.default}")
            out.append("")
        return "\n".join(out).rstrip() + "\n"


def schema(keys: Iterable[Key]) -> Schema:
    keys = tuple(keys)
    seen = set()
    for key in keys:
        if (key.section, key.name) in seen:
            raise ValueError(f"duplicate key [{key.section}] {key.name}")
        seen.add((key.section, key.name))
        key.parse(key.default)  # defaults must parse
    return Schema(keys=keys)
