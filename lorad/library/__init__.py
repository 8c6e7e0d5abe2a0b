"""The library: what lorad keeps (the content-addressed store and the records in `db/`) and the
user's files it owns (watched files and adapter folders, mirrors, reconcile, verify and gc).

`library.py` is the face (`Library`). Imports the engine and the base modules only; this file
imports nothing, so a process needing one module (the reduction child: the store) loads only that.
"""
