"""Run a command from this small process and write its own peak RSS (KiB) to a file.

    python benchmarks/_spawn.py RSS_FILE CMD ARGS...

On Linux a process's ru_maxrss starts from the RSS of the process it was forked from and survives
exec: a command started straight from a benchmark that has grown to gigabytes (generating inputs,
checking outputs in float64) reports the benchmark's peak, not its own. Forked from this fresh
interpreter instead, the command starts from a few MB. The exit status is the command's.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    rss_file, cmd = sys.argv[1], sys.argv[2:]
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    with open(rss_file, "w") as f:
        f.write(f"{usage.ru_maxrss} {usage.ru_utime + usage.ru_stime}\n")
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
