"""The tool's own state, schema ``migrate_data`` in the target: runs, phases, checkpoints, rejects, write marks, the
change capture registry and log (in the source), and the run lock.  Nothing else writes these tables.

``schema.py`` owns the DDL (versioned), ``records.py`` the reads and writes, ``lock.py`` the lock and the
transactions that commit only under it.  Every function takes a connection or pool, so a checkpoint still commits
inside its batch's transaction.
"""

from .lock import *  # noqa: F403
from .lock import __all__ as _lock
from .records import *  # noqa: F403
from .records import __all__ as _records
from .schema import *  # noqa: F403
from .schema import __all__ as _schema

__all__ = [*_schema, *_lock, *_records]
