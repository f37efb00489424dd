"""Phase files (``mappings/<phase>.yaml``) -> the dataclasses of ``mapping.py``, with ``file:line:column path``
errors that show the line.  No database access here: the loader only checks what can be checked from the file itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import MappingError
from .mapping import (
    CAST_TYPE,
    PHASE_NAME,
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
from .yamlfile import YamlFile

BASES = ("column", "value", "lookup", "sql")
MODIFIERS = ("map", "else", "default", "cast", "truncate", "round", "timezone")


def _column(ctx: YamlFile, target: str, node: Node, where: str) -> ColumnSpec:
    line = node.start_mark.line + 1
    if isinstance(node, ScalarNode):
        return ColumnSpec(target=target, kind="column", column=ctx.string(node, where, identifier=True), line=line)
    keys = ctx.mapping(node, where, BASES + MODIFIERS)
    bases = [b for b in BASES if b in keys]
    if len(bases) != 1:
        raise ctx.error(node, where, f"give exactly one of {', '.join(BASES)} (got {', '.join(bases) or 'none'})")
    kind = bases[0]
    spec: dict[str, Any] = {"target": target, "kind": kind, "line": line, kind: _base(ctx, kind, keys[kind][1], where)}
    return ColumnSpec(**spec, **_modifiers(ctx, keys, where))


def _base(ctx: YamlFile, kind: str, node: Node, where: str) -> Any:
    """What a column starts from: a source column, a constant (a list or mapping becomes JSON text), ``sql:``, or a
    lookup."""
    if kind == "column":
        return ctx.string(node, f"{where}.column", identifier=True)
    if kind == "value":
        return ctx.value(node)
    if kind == "sql":
        return ctx.string(node, f"{where}.sql")
    return _lookup(ctx, node, f"{where}.lookup")


def _lookup(ctx: YamlFile, node: Node, where: str) -> Lookup:
    lk = ctx.mapping(node, where, ("table", "on", "key", "column"))
    for required in ("table", "on", "key", "column"):
        if required not in lk:
            raise ctx.error(node, where, f"missing {required!r} (a lookup needs table, on, key and column)")
    on = ctx.names(lk["on"][1], f"{where}.on")
    key = ctx.names(lk["key"][1], f"{where}.key")
    if len(on) != len(key):
        raise ctx.error(node, where, f"'on' has {len(on)} columns but 'key' has {len(key)}")
    return Lookup(
        table=ctx.qualified(lk["table"][1], f"{where}.table"),
        on=on,
        key=key,
        column=ctx.string(lk["column"][1], f"{where}.column", identifier=True),
    )


def _modifiers(ctx: YamlFile, keys: dict[str, tuple[Node, Node]], where: str) -> dict[str, Any]:
    """A column's ``map``, ``else``, ``default``, ``cast``, ``truncate``, ``round`` and ``timezone``, as ColumnSpec
    fields."""
    out: dict[str, Any] = {}
    if "map" in keys:
        out["map"] = _map(ctx, keys["map"][1], f"{where}.map")
    if "else" in keys:
        out["has_else"], out["else_value"] = True, ctx.value(keys["else"][1])
        if "map" not in keys:
            raise ctx.error(keys["else"][0], f"{where}.else", "'else' only makes sense with 'map'")
    if "default" in keys:
        out["has_default"], out["default"] = True, ctx.value(keys["default"][1])
    if "cast" in keys:
        cast = ctx.string(keys["cast"][1], f"{where}.cast")
        if not CAST_TYPE.match(cast):
            raise ctx.error(keys["cast"][1], f"{where}.cast", f"{cast!r} is not a type name")
        out["cast"] = cast
    for flag in ("truncate", "round"):
        if flag in keys:
            out[flag] = ctx.boolean(keys[flag][1], f"{where}.{flag}")
    if "timezone" in keys:
        out["timezone"] = ctx.zone(keys["timezone"][1], f"{where}.timezone")
    return out


def _map(ctx: YamlFile, node: Node, where: str) -> tuple[tuple[str, Any], ...]:
    """``map:``, old value: new value, in the file's order (the new values as their text form)."""
    if not isinstance(node, MappingNode) or not node.value:
        raise ctx.error(node, where, "expected a non-empty mapping of old value: new value")
    pairs: list[tuple[str, Any]] = []
    seen: set[str] = set()
    for k, v in node.value:
        if not isinstance(k, ScalarNode) or not isinstance(v, ScalarNode):
            raise ctx.error(k, where, "keys and values must be scalars")
        if k.value in seen:
            raise ctx.error(k, f"{where}.{k.value}", "given twice")
        seen.add(k.value)
        pairs.append((k.value, text_form(ctx.value(v))))
    return tuple(pairs)


TRIGGER_MODES = ("fire", "skip")


def _table(
    ctx: YamlFile, node: Node, where: str, timezone: str | None = None, target_triggers: str | None = None
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
        on_conflict = ctx.one_of(keys["on_conflict"][1], f"{where}.on_conflict", ("nothing", "update"))
    batch_by = None
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
        batch_by=batch_by,
        on_conflict=on_conflict,
        timezone=timezone,
        target_triggers=(
            ctx.one_of(keys["target_triggers"][1], f"{where}.target_triggers", TRIGGER_MODES)
            if "target_triggers" in keys
            else target_triggers
        ),
    )


DEPENDENT_DECISIONS = ("keep", "drop")


def _dependents(
    ctx: YamlFile, entry: tuple[Node, Node], backup: tuple[QualifiedName, ...]
) -> tuple[tuple[str, str], ...]:
    """``dependents: drop`` (every dropped table) or ``dependents: {table: keep|drop}``."""
    key, node = entry
    if not backup:
        raise ctx.error(key, "dependents", "only a phase that drops tables (`backup:`) has dependents to decide on")
    dropped = [str(t) for t in backup]
    if isinstance(node, ScalarNode):
        how = ctx.one_of(node, "dependents", DEPENDENT_DECISIONS)
        return tuple((t, how) for t in dropped)
    if not isinstance(node, MappingNode) or not node.value:
        raise ctx.error(node, "dependents", "expected keep, drop, or a mapping of dropped table: keep|drop")
    out = []
    for name, (k, v) in ctx.mapping(node, "dependents", ()).items():
        if name not in dropped:
            raise ctx.error(k, f"dependents.{name}", f"{name!r} is not one of the tables the phase drops (`backup:`)")
        out.append((name, ctx.one_of(v, f"dependents.{name}", DEPENDENT_DECISIONS)))
    return tuple(out)


def _backup_tables(ctx: YamlFile, node: Node) -> tuple[QualifiedName, ...]:
    ctx.names(node, "backup")  # a name or a non-empty list, none twice
    nodes = [node] if isinstance(node, ScalarNode) else list(node.value)
    return tuple(ctx.qualified(n, f"backup[{i}]") for i, n in enumerate(nodes))


def load_phase(path: str | Path) -> Phase:
    """Load one phase file; raise MappingError naming file, line and path on any problem."""
    path = Path(path)
    ctx = YamlFile(path)
    name = path.stem
    if not PHASE_NAME.match(name):
        raise ctx.error(None, "", f"phase name {name!r} must start with a letter and use letters, digits, - and _")
    top = ctx.mapping(
        ctx.compose(),
        "",
        ("description", "requires", "revision", "backup", "dependents", "timezone", "target_triggers", "tables"),
    )
    timezone = ctx.zone(top["timezone"][1], "timezone") if "timezone" in top else None
    triggers = (
        ctx.one_of(top["target_triggers"][1], "target_triggers", TRIGGER_MODES) if "target_triggers" in top else None
    )
    tables = _tables(ctx, top["tables"][1], timezone, triggers) if "tables" in top else ()
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


def _tables(ctx: YamlFile, node: Node, timezone: str | None, target_triggers: str | None) -> tuple[TableMapping, ...]:
    """``tables:``, each with a target of its own (an empty ``tables:`` is no table)."""
    if isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:null":
        return ()
    if not isinstance(node, SequenceNode):
        raise ctx.error(node, "tables", "expected a list of table mappings")
    tables = tuple(_table(ctx, n, f"tables[{i}]", timezone, target_triggers) for i, n in enumerate(node.value))
    seen: dict[str, int] = {}
    for i, t in enumerate(tables):
        if str(t.target) in seen:
            raise ctx.error(
                node.value[i],
                f"tables[{i}].target",
                f"{t.target} is already the target of tables[{seen[str(t.target)]}]",
            )
        seen[str(t.target)] = i
    return tables


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
