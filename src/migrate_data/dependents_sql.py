"""The catalog queries of ``dependents.py``: pure text, no I/O.

``$1`` is the oids of the tables (``oid[]``), except in ``MAY_REFERENCE_SQL`` (their names).
"""

from __future__ import annotations

from .sql import LEDGER_SCHEMA as OWN_SCHEMA

# Every object tied to the tables in ``$1``, through pg_depend, recursively through the views and
# functions that CASCADE would drop too.  A view is reached through its _RETURN rule; the tables' own indexes,
# constraints, defaults and sequences are part of them (and of their backup) and left out; so are extension members
# and migrate-data's own change capture.  ``rel`` is the table an object belongs to, ``depth`` its longest path.
WALK_SQL = (
    """
WITH RECURSIVE walk(classid, objid, objsubid, root, depth, path) AS (
    SELECT 'pg_class'::regclass::oid, c.oid, 0, c.oid, 0, ARRAY[c.oid] FROM pg_class c WHERE c.oid = ANY($1::oid[])
    UNION ALL
    SELECT 'pg_type'::regclass::oid, c.reltype, 0, c.oid, 0, ARRAY[c.reltype]
    FROM pg_class c WHERE c.oid = ANY($1::oid[]) AND c.reltype <> 0
    UNION ALL
    SELECT CASE WHEN rw.rulename = '_RETURN' THEN 'pg_class'::regclass::oid ELSE d.classid END,
           CASE WHEN rw.rulename = '_RETURN' THEN rw.ev_class ELSE d.objid END,
           CASE WHEN rw.rulename = '_RETURN' THEN 0 ELSE d.objsubid END,
           w.root, w.depth + 1, w.path || d.objid
    FROM walk w
    JOIN pg_depend d ON d.refclassid = w.classid AND d.refobjid = w.objid
    LEFT JOIN pg_rewrite rw ON d.classid = 'pg_rewrite'::regclass AND rw.oid = d.objid
    WHERE w.depth < 32 AND NOT d.objid = ANY(w.path)
      AND NOT coalesce(rw.rulename = '_RETURN' AND rw.ev_class = ANY(w.path), false)
      AND (w.depth = 0 OR (w.classid IN ('pg_class'::regclass, 'pg_proc'::regclass) AND w.objsubid = 0))
      AND (d.deptype = 'n' OR (d.deptype = 'a' AND d.classid IN ('pg_trigger'::regclass, 'pg_policy'::regclass,
           'pg_rewrite'::regclass, 'pg_publication_rel'::regclass))
           OR (d.deptype = 'a' AND w.depth > 0 AND d.classid = 'pg_class'::regclass))  -- a materialized view's indexes
), found AS (
    SELECT classid, objid, objsubid, min(root::regclass::text) AS root, max(depth) AS depth
    FROM walk WHERE depth > 0 GROUP BY 1, 2, 3
), described AS (
    SELECT f.*, o.type, o.schema, o.identity, a.type AS addr_type, a.object_names, a.object_args,
           CASE f.classid
               WHEN 'pg_class'::regclass THEN f.objid
               WHEN 'pg_trigger'::regclass THEN (SELECT tgrelid FROM pg_trigger WHERE oid = f.objid)
               WHEN 'pg_policy'::regclass THEN (SELECT polrelid FROM pg_policy WHERE oid = f.objid)
               WHEN 'pg_rewrite'::regclass THEN (SELECT ev_class FROM pg_rewrite WHERE oid = f.objid)
               WHEN 'pg_constraint'::regclass THEN (SELECT conrelid FROM pg_constraint WHERE oid = f.objid)
               WHEN 'pg_attrdef'::regclass THEN (SELECT adrelid FROM pg_attrdef WHERE oid = f.objid)
               WHEN 'pg_publication_rel'::regclass THEN (SELECT prrelid FROM pg_publication_rel WHERE oid = f.objid)
           END AS rel
    FROM found f
    CROSS JOIN LATERAL pg_identify_object(f.classid, f.objid, f.objsubid) AS o
    CROSS JOIN LATERAL pg_identify_object_as_address(f.classid, f.objid, f.objsubid) AS a
)
SELECT d.root, d.depth, d.type, d.identity, d.addr_type, d.object_names, d.object_args,
       d.rel = ANY($1::oid[]) AS attached,
       CASE
           WHEN d.classid = 'pg_class'::regclass AND d.objsubid = 0 AND c.relkind IN ('v', 'm') THEN
               format('CREATE %s %s%s AS %s', CASE c.relkind WHEN 'v' THEN 'VIEW' ELSE 'MATERIALIZED VIEW' END,
                      d.objid::regclass, ' WITH (' || array_to_string(c.reloptions, ', ') || ')',
                      rtrim(pg_get_viewdef(d.objid), '; ' || chr(10)))
               || format(';%sALTER %s %s OWNER TO %I', chr(10), CASE c.relkind WHEN 'v' THEN 'VIEW'
                      ELSE 'MATERIALIZED VIEW' END, d.objid::regclass, pg_get_userbyid(c.relowner))
               || coalesce((SELECT string_agg(format(';%sGRANT %s ON %s TO %s', chr(10), g.privilege_type,
                      d.objid::regclass, CASE WHEN g.grantee = 0 THEN 'PUBLIC'
                      ELSE quote_ident(pg_get_userbyid(g.grantee)) END), '')
                      FROM aclexplode(c.relacl) g WHERE g.grantee <> c.relowner), '')
           WHEN d.classid = 'pg_class'::regclass AND d.objsubid = 0 AND c.relkind = 'i' THEN pg_get_indexdef(d.objid)
           WHEN d.classid = 'pg_proc'::regclass AND p.prokind IN ('f', 'p') THEN
               rtrim(pg_get_functiondef(d.objid), '; ' || chr(10))
               || format(';%sALTER %s %s OWNER TO %I', chr(10), CASE p.prokind WHEN 'p' THEN 'PROCEDURE'
                      ELSE 'FUNCTION' END, d.identity, pg_get_userbyid(p.proowner))
           WHEN d.classid = 'pg_constraint'::regclass AND con.conrelid <> 0 THEN
               format('ALTER TABLE %s ADD CONSTRAINT %I %s', con.conrelid::regclass, con.conname,
                      pg_get_constraintdef(d.objid))
           WHEN d.classid = 'pg_rewrite'::regclass THEN rtrim(pg_get_ruledef(d.objid), '; ' || chr(10))
           WHEN d.classid = 'pg_trigger'::regclass THEN pg_get_triggerdef(d.objid)
           WHEN d.classid = 'pg_policy'::regclass THEN
               format('CREATE POLICY %I ON %s AS %s FOR %s TO %s', pol.polname, pol.polrelid::regclass,
                      CASE WHEN pol.polpermissive THEN 'PERMISSIVE' ELSE 'RESTRICTIVE' END,
                      CASE pol.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE'
                                      WHEN 'd' THEN 'DELETE' ELSE 'ALL' END,
                      (SELECT string_agg(CASE WHEN r = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(r)) END, ', ')
                       FROM unnest(pol.polroles) AS r))
               || coalesce(' USING (' || pg_get_expr(pol.polqual, pol.polrelid) || ')', '')
               || coalesce(' WITH CHECK (' || pg_get_expr(pol.polwithcheck, pol.polrelid) || ')', '')
           WHEN d.classid = 'pg_publication_rel'::regclass THEN
               format('ALTER PUBLICATION %I ADD TABLE %s', pub.pubname, pr.prrelid::regclass)
               || coalesce(' (' || (SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute
                           WHERE attrelid = pr.prrelid AND attnum = ANY(pr.prattrs)) || ')', '')
               || coalesce(' WHERE (' || pg_get_expr(pr.prqual, pr.prrelid) || ')', '')
           WHEN d.classid = 'pg_attrdef'::regclass THEN
               format('ALTER TABLE %s ALTER COLUMN %I SET DEFAULT %s', ad.adrelid::regclass,
                      (SELECT attname FROM pg_attribute WHERE attrelid = ad.adrelid AND attnum = ad.adnum),
                      pg_get_expr(ad.adbin, ad.adrelid))
       END AS create_sql,
       CASE
           WHEN d.classid = 'pg_class'::regclass AND d.objsubid = 0 AND c.relkind IN ('v', 'm') THEN
               format('DROP %s %s', CASE c.relkind WHEN 'v' THEN 'VIEW' ELSE 'MATERIALIZED VIEW' END, d.objid::regclass)
           WHEN d.classid = 'pg_proc'::regclass AND p.prokind IN ('f', 'p') THEN
               format('DROP %s %s', CASE p.prokind WHEN 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END, d.identity)
           WHEN d.classid = 'pg_constraint'::regclass AND con.conrelid <> 0 THEN
               format('ALTER TABLE %s DROP CONSTRAINT %I', con.conrelid::regclass, con.conname)
           WHEN d.classid = 'pg_rewrite'::regclass THEN format('DROP RULE %I ON %s', rw.rulename, rw.ev_class::regclass)
           WHEN d.classid = 'pg_trigger'::regclass THEN format('DROP TRIGGER %I ON %s', tg.tgname, tg.tgrelid::regclass)
           WHEN d.classid = 'pg_policy'::regclass THEN format('DROP POLICY %I ON %s', pol.polname, pol.polrelid::regclass)
           WHEN d.classid = 'pg_attrdef'::regclass THEN
               format('ALTER TABLE %s ALTER COLUMN %I DROP DEFAULT', ad.adrelid::regclass,
                      (SELECT attname FROM pg_attribute WHERE attrelid = ad.adrelid AND attnum = ad.adnum))
       END AS drop_sql
FROM described d
LEFT JOIN pg_class c ON d.classid = 'pg_class'::regclass AND c.oid = d.objid
LEFT JOIN pg_proc p ON d.classid = 'pg_proc'::regclass AND p.oid = d.objid
LEFT JOIN pg_constraint con ON d.classid = 'pg_constraint'::regclass AND con.oid = d.objid
LEFT JOIN pg_rewrite rw ON d.classid = 'pg_rewrite'::regclass AND rw.oid = d.objid
LEFT JOIN pg_trigger tg ON d.classid = 'pg_trigger'::regclass AND tg.oid = d.objid
LEFT JOIN pg_policy pol ON d.classid = 'pg_policy'::regclass AND pol.oid = d.objid
LEFT JOIN pg_publication_rel pr ON d.classid = 'pg_publication_rel'::regclass AND pr.oid = d.objid
LEFT JOIN pg_publication pub ON pub.oid = pr.prpubid
LEFT JOIN pg_attrdef ad ON d.classid = 'pg_attrdef'::regclass AND ad.oid = d.objid
WHERE NOT (d.classid IN ('pg_constraint'::regclass, 'pg_attrdef'::regclass) AND d.rel = ANY($1::oid[]))
  AND NOT (d.classid = 'pg_class'::regclass AND d.objid = ANY($1::oid[]))
  AND d.schema IS DISTINCT FROM '"""
    + OWN_SCHEMA
    + """'
  AND NOT coalesce(tg.tgfoid IN (SELECT p.oid FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                                 WHERE n.nspname = '"""
    + OWN_SCHEMA
    + """'),
                   false)
  AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = d.classid AND e.objid = d.objid AND e.deptype = 'e')
ORDER BY d.depth, d.root, d.type, d.identity
"""
)

# Functions whose body is text only (no prosqlbody) and contains a table's name: candidates, checked word by word in
# Python (``mentions``).  $1: the tables' own names (no schema).
MAY_REFERENCE_SQL = (
    """
SELECT p.oid, p.prosrc, (pg_identify_object('pg_proc'::regclass, p.oid, 0)).identity, a.type AS addr_type,
       a.object_names, a.object_args, l.lanname, pg_get_functiondef(p.oid) AS create_sql, t.name
FROM unnest($1::text[]) AS t(name)
JOIN pg_proc p ON strpos(lower(p.prosrc), lower(t.name)) > 0
JOIN pg_language l ON l.oid = p.prolang
CROSS JOIN LATERAL pg_identify_object_as_address('pg_proc'::regclass, p.oid, 0) AS a
WHERE l.lanname NOT IN ('internal', 'c') AND p.prosqlbody IS NULL AND p.prokind IN ('f', 'p')
  AND p.pronamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
  AND p.pronamespace::regnamespace::text <> '"""
    + OWN_SCHEMA
    + """'
  AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = 'pg_proc'::regclass AND e.objid = p.oid
                  AND e.deptype = 'e')
ORDER BY 3
"""
)

# Publications that carry every table, or every table of a table's schema: they outlive the table.
PUBLISHES_SQL = """
SELECT t.oid::regclass::text AS root, p.pubname,
       CASE WHEN p.puballtables THEN 'FOR ALL TABLES' ELSE 'FOR TABLES IN SCHEMA ' || quote_ident(n.nspname) END AS how
FROM pg_class t
JOIN pg_namespace n ON n.oid = t.relnamespace
JOIN pg_publication p ON p.puballtables
     OR EXISTS (SELECT 1 FROM pg_publication_namespace pn WHERE pn.pnpubid = p.oid AND pn.pnnspid = t.relnamespace)
WHERE t.oid = ANY($1::oid[])
ORDER BY 1, 2
"""

EXISTS_SQL = "SELECT pg_get_object_address($1, $2::text[], $3::text[])"
