"""``python -m repro.report``."""

import sys

from repro.report import main

sys.exit(main())
