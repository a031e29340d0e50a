"""`python -m runtime`: see runtime/cli.py."""

import sys

from runtime.cli import main

sys.exit(main())
