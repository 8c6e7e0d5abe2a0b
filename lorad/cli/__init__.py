"""The `lorad` command: `cli.py` builds one argparse tree from one module per group of commands
(`reduce`: reduce and plan on files; `daemon`; `control`: the commands over the daemon's socket;
`report`; `db`). The top layer: it may import every other one.
"""
