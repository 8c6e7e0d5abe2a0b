"""The daemon: `daemon.py` is the composition root (the face: `Daemon`, `run`); `watch.py` turns
folder events and scans into settled candidates, `queue.py` holds durable leased jobs, `worker.py`
runs each in a reduction process (`_reduce_child.py`), `scheduler.py` fires timers, `control/` is the
Unix-socket protocol, and `config.py` the configuration it runs under.

Imports the library, the report documents, the engine and the base modules, never the CLI. This file
imports nothing, so the CLI's clients load only the control client and the config.
"""
