"""
``python -m bench.chainlib.guard PARENT_PID COMMAND...``: exec COMMAND so that it is killed when the harness dies.

Linux's parent-death signal survives ``exec``, so even a ``kill -9`` of the harness cannot leave an upstream, proxy,
relay, redis-server or wrk running behind it.
"""

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def main(argv):
    parent, command = int(argv[0]), argv[1:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    # The parent may have died before prctl took effect; then nobody would ever stop us.
    if os.getppid() != parent:
        sys.exit(1)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
