"""`python -m runtime`: see runtime/frontends/cli.py."""

import faulthandler
import os
import signal
import sys

from runtime.frontends.cli import EXIT_INTERRUPTED, main

faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID` prints every thread's stack, goes on
code = main()
if code == EXIT_INTERRUPTED:
    # Leave without interpreter shutdown: after an interrupt that landed inside a native call, shutdown sometimes
    # ended by SIGINT (exit -2) instead of 130 (1 run in 10-40 under load). Nothing is half-written by then: outputs
    # go to a temp file and are renamed only when complete.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
