"""Phase files (``mappings/<phase>.yaml``) -> the dataclasses of ``mapping.py``, with ``file:line:column path``
errors that show the line.  No database access here: the loader only checks what can be checked from the file itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import MappingError
from .mapping import (
    CAST_TYPE,
    MAX_IDENTIFIER,
    PHASE_NAME,
    TIME_ZONE,
    ColumnSpec,
    Lookup,
    Phase,
    Phases,
    QualifiedName,
    TableMapping,
    display_path,
    natural_key,
    phase_order,
    text_form,
)  # fmt: skip

# ---------------------------------------------------------------------------------------------
# Node walking with positions


class _Ctx:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.constructor = yaml.constructor.SafeConstructor()
        self.lines: list[str] = []

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
        value = self.constructor.construct_object(node, deep=True)
        return value

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


BASES = ("column", "value", "lookup", "sql")
MODIFIERS = ("map", "else", "default", "cast", "truncate", "round", "timezone")


def _column(ctx: _Ctx, target: str, node: Node, where: str) -> ColumnSpec:
    line = node.start_mark.line + 1
    if isinstance(node, ScalarNode):
        return ColumnSpec(target=target, kind="column", column=ctx.string(node, where, identifier=True), line=line)
    keys = ctx.mapping(node, where, BASES + MODIFIERS)
    bases = [b for b in BASES if b in keys]
    if len(bases) != 1:
        raise ctx.error(node, where, f"give exactly one of {', '.join(BASES)} (got {', '.join(bases) or 'none'})")
    kind = bases[0]
    vnode = keys[kind][1]
    spec: dict[str, Any] = {"target": target, "kind": kind, "line": line}
    if kind == "column":
        spec["column"] = ctx.string(vnode, f"{where}.column", identifier=True)
    elif kind == "value":
        if not isinstance(vnode, ScalarNode):
            spec["value"] = ctx.value(vnode)  # a list or mapping becomes JSON text
        else:
            spec["value"] = ctx.value(vnode)
    elif kind == "sql":
        spec["sql"] = ctx.string(vnode, f"{where}.sql")
    else:
        lk = ctx.mapping(vnode, f"{where}.lookup", ("table", "on", "key", "column"))
        for required in ("table", "on", "key", "column"):
            if required not in lk:
                raise ctx.error(
                    vnode, f"{where}.lookup", f"missing {required!r} (a lookup needs table, on, key and column)"
                )
        on = ctx.names(lk["on"][1], f"{where}.lookup.on")
        key = ctx.names(lk["key"][1], f"{where}.lookup.key")
        if len(on) != len(key):
            raise ctx.error(vnode, f"{where}.lookup", f"'on' has {len(on)} columns but 'key' has {len(key)}")
        spec["lookup"] = Lookup(
            table=ctx.qualified(lk["table"][1], f"{where}.lookup.table"),
            on=on,
            key=key,
            column=ctx.string(lk["column"][1], f"{where}.lookup.column", identifier=True),
        )
    if "map" in keys:
        mnode = keys["map"][1]
        if not isinstance(mnode, MappingNode) or not mnode.value:
            raise ctx.error(mnode, f"{where}.map", "expected a non-empty mapping of old value: new value")
        pairs: list[tuple[str, Any]] = []
        seen: set[str] = set()
        for k, v in mnode.value:
            if not isinstance(k, ScalarNode) or not isinstance(v, ScalarNode):
                raise ctx.error(k, f"{where}.map", "keys and values must be scalars")
            if k.value in seen:
                raise ctx.error(k, f"{where}.map.{k.value}", "given twice")
            seen.add(k.value)
            pairs.append((k.value, text_form(ctx.value(v))))
        spec["map"] = tuple(pairs)
    if "else" in keys:
        spec["has_else"], spec["else_value"] = True, ctx.value(keys["else"][1])
        if "map" not in keys:
            raise ctx.error(keys["else"][0], f"{where}.else", "'else' only makes sense with 'map'")
    if "default" in keys:
        spec["has_default"], spec["default"] = True, ctx.value(keys["default"][1])
    if "cast" in keys:
        cast = ctx.string(keys["cast"][1], f"{where}.cast")
        if not CAST_TYPE.match(cast):
            raise ctx.error(keys["cast"][1], f"{where}.cast", f"{cast!r} is not a type name")
        spec["cast"] = cast
    for flag in ("truncate", "round"):
        if flag in keys:
            spec[flag] = ctx.boolean(keys[flag][1], f"{where}.{flag}")
    if "timezone" in keys:
        spec["timezone"] = ctx.zone(keys["timezone"][1], f"{where}.timezone")
    return ColumnSpec(**spec)


TRIGGER_MODES = ("fire", "skip")


def _trigger_mode(ctx: _Ctx, node: Node, where: str) -> str:
    mode = ctx.string(node, where)
    if mode not in TRIGGER_MODES:
        raise ctx.error(node, where, f"{mode!r}: expected fire or skip")
    return mode


def _table(
    ctx: _Ctx, node: Node, where: str, timezone: str | None = None, target_triggers: str | None = None
) -> TableMapping:
    keys = ctx.mapping(
        node,
        where,
        ("source", "target", "where", "key", "batch_by", "on_conflict", "target_triggers", "columns"),
    )
    for required in ("source", "target", "columns"):
        if required not in keys:
            raise ctx.error(node, where, f"missing {required!r}")
    cnode = keys["columns"][1]
    cols = ctx.mapping(cnode, f"{where}.columns", ())
    if not cols:
        raise ctx.error(cnode, f"{where}.columns", "no columns: map at least one target column")
    columns = tuple(
        _column(ctx, ctx.string(k, f"{where}.columns", identifier=True), v, f"{where}.columns.{name}")
        for name, (k, v) in cols.items()
    )
    on_conflict = "nothing"
    if "on_conflict" in keys:
        on_conflict = ctx.string(keys["on_conflict"][1], f"{where}.on_conflict")
        if on_conflict not in ("nothing", "update"):
            raise ctx.error(
                keys["on_conflict"][1], f"{where}.on_conflict", f"{on_conflict!r}: expected nothing or update"
            )
    if "batch_by" in keys:
        batch_by = ctx.names(keys["batch_by"][1], f"{where}.batch_by")
        if "ctid" in batch_by and len(batch_by) > 1:
            raise ctx.error(
                keys["batch_by"][1], f"{where}.batch_by", "ctid pages by physical blocks on its own: give it alone"
            )
    return TableMapping(
        source=ctx.qualified(keys["source"][1], f"{where}.source"),
        target=ctx.qualified(keys["target"][1], f"{where}.target"),
        columns=columns,
        line=node.start_mark.line + 1,
        where=ctx.string(keys["where"][1], f"{where}.where") if "where" in keys else None,
        key=ctx.names(keys["key"][1], f"{where}.key") if "key" in keys else None,
        batch_by=ctx.names(keys["batch_by"][1], f"{where}.batch_by") if "batch_by" in keys else None,
        on_conflict=on_conflict,
        timezone=timezone,
        target_triggers=(
            _trigger_mode(ctx, keys["target_triggers"][1], f"{where}.target_triggers")
            if "target_triggers" in keys
            else target_triggers
        ),
    )


DEPENDENT_DECISIONS = ("keep", "drop")


def _dependents(ctx: _Ctx, entry: tuple[Node, Node], backup: tuple[QualifiedName, ...]) -> tuple[tuple[str, str], ...]:
    """``dependents: drop`` (every dropped table) or ``dependents: {table: keep|drop}``."""
    key, node = entry
    if not backup:
        raise ctx.error(key, "dependents", "only a phase that drops tables (`backup:`) has dependents to decide on")
    dropped = [str(t) for t in backup]

    def one(n: Node, where: str) -> str:
        text = ctx.string(n, where)
        if text not in DEPENDENT_DECISIONS:
            raise ctx.error(n, where, f"{text!r}: expected keep or drop")
        return text

    if isinstance(node, ScalarNode):
        how = one(node, "dependents")
        return tuple((t, how) for t in dropped)
    if not isinstance(node, MappingNode) or not node.value:
        raise ctx.error(node, "dependents", "expected keep, drop, or a mapping of dropped table: keep|drop")
    out = []
    for name, (k, v) in ctx.mapping(node, "dependents", ()).items():
        if name not in dropped:
            raise ctx.error(k, f"dependents.{name}", f"{name!r} is not one of the tables the phase drops (`backup:`)")
        out.append((name, one(v, f"dependents.{name}")))
    return tuple(out)


def _backup_tables(ctx: _Ctx, node: Node) -> tuple[QualifiedName, ...]:
    ctx.names(node, "backup")  # a name or a non-empty list, none twice
    nodes = [node] if isinstance(node, ScalarNode) else list(node.value)
    return tuple(ctx.qualified(n, f"backup[{i}]") for i, n in enumerate(nodes))


def load_phase(path: str | Path) -> Phase:
    """Load one phase file; raise MappingError naming file, line and path on any problem."""
    path = Path(path)
    ctx = _Ctx(path)
    name = path.stem
    if not PHASE_NAME.match(name):
        raise ctx.error(None, "", f"phase name {name!r} must start with a letter and use letters, digits, - and _")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise MappingError(f"{ctx.display()}: cannot read: {why}") from e
    ctx.lines = text.splitlines()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = getattr(e, "problem", None) or str(e)
        raise MappingError(
            f"{ctx.display()}:{line}:{column}: invalid YAML: {problem}", detail=source_excerpt(ctx.lines, line, column)
        ) from e
    if root is None:
        raise ctx.error(None, "", "the file is empty")
    top = ctx.mapping(
        root,
        "",
        ("description", "requires", "revision", "backup", "dependents", "timezone", "target_triggers", "tables"),
    )
    timezone = ctx.zone(top["timezone"][1], "timezone") if "timezone" in top else None
    triggers = _trigger_mode(ctx, top["target_triggers"][1], "target_triggers") if "target_triggers" in top else None
    tables: tuple[TableMapping, ...] = ()
    if "tables" in top:
        tnode = top["tables"][1]
        if isinstance(tnode, ScalarNode) and tnode.tag == "tag:yaml.org,2002:null":
            tnode = SequenceNode("tag:yaml.org,2002:seq", [])
        if not isinstance(tnode, SequenceNode):
            raise ctx.error(tnode, "tables", "expected a list of table mappings")
        tables = tuple(_table(ctx, n, f"tables[{i}]", timezone, triggers) for i, n in enumerate(tnode.value))
        seen: dict[str, int] = {}
        for i, t in enumerate(tables):
            if str(t.target) in seen:
                raise ctx.error(
                    tnode.value[i],
                    f"tables[{i}].target",
                    f"{t.target} is already the target of tables[{seen[str(t.target)]}]",
                )
            seen[str(t.target)] = i
    backup = _backup_tables(ctx, top["backup"][1]) if "backup" in top else ()
    return Phase(
        name=name,
        path=path,
        description=ctx.string(top["description"][1], "description") if "description" in top else "",
        requires=ctx.names(top["requires"][1], "requires") if "requires" in top else (),
        revision=ctx.string(top["revision"][1], "revision", identifier=True) if "revision" in top else None,
        backup=backup,
        dependents=_dependents(ctx, top["dependents"], backup) if "dependents" in top else (),
        tables=tables,
        timezone=timezone,
        target_triggers=triggers,
    )


def load_phases(mappings_dir: str | Path, *, strict: bool = False) -> Phases:
    """Load every ``*.yaml`` of ``mappings_dir`` in ``requires`` order.

    A file with an error, a phase that requires an unknown or broken phase, and phases that require each other in a
    cycle go to ``.broken`` (``strict``: the first such error is raised instead)."""
    d = Path(mappings_dir)
    if not d.is_dir():
        raise MappingError(f"{d}: no mappings directory", hint="run inside a project or pass --project DIR")
    phases: dict[str, Phase] = {}
    broken: dict[str, MappingError] = {}
    for f in sorted(d.glob("*.yaml")):
        try:
            phases[f.stem] = load_phase(f)
        except MappingError as e:
            broken[f.stem] = e
    changed = True
    while changed:  # a phase that requires a missing or broken phase is broken too
        changed = False
        for p in list(phases.values()):
            bad = next((r for r in p.requires if r not in phases), None)
            if bad is None:
                continue
            if bad in broken:
                broken[p.name] = MappingError(
                    f"{display_path(p.path)}: {p.name} requires {bad}, whose phase file has an error",
                    detail=broken[bad].message,
                    hint=f"fix {bad} first",
                )
            else:
                broken[p.name] = MappingError(
                    f"{display_path(p.path)}: requires unknown phase {bad!r}",
                    hint=f"phases here: {', '.join(sorted({*phases, *broken}, key=natural_key))}",
                )
            del phases[p.name]
            changed = True
    try:
        order = phase_order(phases)
    except MappingError as e:  # a cycle: every phase of it is broken
        cycle = set(e.message.rpartition(": ")[2].split(" -> "))
        broken.update({n: e for n in cycle if n in phases})
        phases = {n: p for n, p in phases.items() if n not in cycle}
        order = phase_order(phases)
    if strict and broken:
        raise next(iter(broken.values()))
    return Phases(
        {name: phases[name] for name in order}, dict(sorted(broken.items(), key=lambda kv: natural_key(kv[0])))
    )
