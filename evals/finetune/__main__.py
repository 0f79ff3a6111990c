"""``python -m evals.finetune``: fine-tune one export (see :mod:`evals.finetune`)."""

import sys

import evals.finetune
from evals.cli import main

sys.exit(main("finetune", evals.finetune.__doc__))
