"""The HTML report: `docs.py` assembles a report's document from the library (read only), `html.py`
renders it as one self-contained page (inline SVG, no scripts fetched).

Imports the library, the engine and the base modules only: the daemon returns the documents, the
CLI renders and writes them.
"""
