"""Run one dense evaluation on one export and record its numbers: ``python -m evals.dense TASK --export DIR --data
ROOT [...]`` (``python -m evals.dense TASK --help`` lists the options). Every task in ``evals.dense.tasks.TASKS``
runs this way; ADE20K and COCO also as ``python -m evals.segmentation`` and ``python -m evals.detection``.
"""

import sys

from evals.dense.launch import main
from evals.dense.tasks import TASKS

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in TASKS:
        print(f"usage: python -m evals.dense {{{','.join(TASKS)}}} --export DIR --data ROOT [...]\n"
              "evals.dense: error: the first argument names the task", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], __doc__, sys.argv[2:]))
