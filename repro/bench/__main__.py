"""``python -m repro.bench`` (see :mod:`repro.bench`)."""

import sys

from repro.bench.cli import main

sys.exit(main())
