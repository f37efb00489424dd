"""YAML read as nodes, with the file, line and column of each: what the loader reads a phase file with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import MappingError
from .mapping import MAX_IDENTIFIER, TIME_ZONE, QualifiedName, display_path

LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser where PyYAML has it: about 10× faster


class YamlFile:
    """A YAML file read as nodes, which keep their line and column: typed values, names and mappings, each refused
    with a MappingError that names ``file:line:column`` and the path of keys (``where``), and shows the line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.constructor = yaml.constructor.SafeConstructor()
        self.lines: list[str] = []

    def compose(self) -> Node:
        """The file's YAML as nodes (None: an empty file is refused); its lines kept for the errors' excerpts."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise MappingError(f"{self.display()}: cannot read: {why}") from e
        self.lines = text.splitlines()
        try:
            root = yaml.compose(text, Loader=LOADER)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
            problem = getattr(e, "problem", None) or str(e)
            raise MappingError(
                f"{self.display()}:{line}:{column}: invalid YAML: {problem}",
                detail=source_excerpt(self.lines, line, column),
            ) from e
        if root is None:
            raise self.error(None, "", "the file is empty")
        return root

    def display(self) -> str:
        return display_path(self.path)

    def error(self, node: Node | None, where: str, message: str) -> MappingError:
        if node is None:
            return MappingError(f"{self.display()}: {where + ': ' if where else ''}{message}")
        line, column = node.start_mark.line + 1, node.start_mark.column + 1
        prefix = f"{self.display()}:{line}:{column}"
        return MappingError(
            f"{prefix} {where}: {message}" if where else f"{prefix}: {message}",
            detail=source_excerpt(self.lines, line, column),
        )

    def value(self, node: Node) -> Any:
        return self.constructor.construct_object(node, deep=True)

    def mapping(self, node: Node, where: str, allowed: tuple[str, ...]) -> dict[str, tuple[Node, Node]]:
        if not isinstance(node, MappingNode):
            raise self.error(node, where, f"expected a mapping with keys {', '.join(allowed)}")
        out: dict[str, tuple[Node, Node]] = {}
        for k, v in node.value:
            if not isinstance(k, ScalarNode):
                raise self.error(k, where, "keys must be plain names")
            name = k.value
            if name in out:
                raise self.error(k, f"{where}.{name}" if where else name, "given twice")
            if allowed and name not in allowed:
                raise self.error(k, where or name, f"unknown key {name!r} (expected one of: {', '.join(allowed)})")
            out[name] = (k, v)
        return out

    def string(self, node: Node, where: str, *, identifier: bool = False) -> str:
        if not isinstance(node, ScalarNode) or node.tag == "tag:yaml.org,2002:null":
            raise self.error(node, where, "expected a string")
        text = str(node.value) if identifier else str(self.value(node))
        if not text.strip():
            raise self.error(node, where, "must not be empty")
        if identifier:
            for part in text.split("."):
                if len(part) > MAX_IDENTIFIER:
                    raise self.error(node, where, f"identifier {part!r} is longer than {MAX_IDENTIFIER} characters")
        return text

    def qualified(self, node: Node, where: str) -> QualifiedName:
        """A ``[schema.]table`` (see QualifiedName.parse), with the file's line on an error."""
        text = self.string(node, where, identifier=True)
        try:
            name = QualifiedName.parse(text)
        except ValueError as e:
            raise self.error(
                node, where, f"{e}; write schema.table, with double quotes around a part that has a ."
            ) from e
        for part in (name.schema, name.name):
            if part is not None and len(part) > MAX_IDENTIFIER:
                raise self.error(node, where, f"identifier {part!r} is longer than {MAX_IDENTIFIER} characters")
        return name

    def boolean(self, node: Node, where: str) -> bool:
        value = self.value(node) if isinstance(node, ScalarNode) else None
        if not isinstance(value, bool):
            raise self.error(node, where, "expected true or false")
        return value

    def zone(self, node: Node, where: str) -> str:
        text = self.string(node, where)
        if not TIME_ZONE.match(text):
            raise self.error(node, where, f"{text!r} is not a time zone name (e.g. UTC, America/Guayaquil)")
        return text

    def one_of(self, node: Node, where: str, choices: tuple[str, ...]) -> str:
        text = self.string(node, where)
        if text not in choices:
            raise self.error(node, where, f"{text!r}: expected {' or '.join(choices)}")
        return text

    def names(self, node: Node, where: str) -> tuple[str, ...]:
        if isinstance(node, ScalarNode):
            return (self.string(node, where, identifier=True),)
        if isinstance(node, SequenceNode) and node.value:
            out = tuple(self.string(n, f"{where}[{i}]", identifier=True) for i, n in enumerate(node.value))
            if len(set(out)) != len(out):
                raise self.error(node, where, "a name is listed twice")
            return out
        raise self.error(node, where, "expected a name or a non-empty list of names")


def source_excerpt(lines: list[str], line: int, column: int) -> str | None:
    """The offending line and a caret under its column, as psql shows a statement's error position."""
    if not 1 <= line <= len(lines):
        return None
    label = f"line {line}: "
    text = lines[line - 1].rstrip("\n").expandtabs(1)
    return f"{label}{text}\n{' ' * (len(label) + column - 1)}^"
