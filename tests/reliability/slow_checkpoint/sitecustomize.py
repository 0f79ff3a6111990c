"""Test-only: with REPRO_TEST_SLOW_CKPT=<seconds>, every Python process started with this folder on PYTHONPATH (a
run, a torchrun agent and its workers) holds each ``checkpoint.pt`` temp file that long before its rename, so a
kill can land inside a checkpoint write. ``tests/reliability/conftest.subprocess_env`` puts it there; production
code has no hook."""

import os
import time

_DELAY = float(os.environ.get("REPRO_TEST_SLOW_CKPT") or 0)
if _DELAY > 0:
    _replace = os.replace

    def _slow_replace(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(dst)) == "checkpoint.pt":
            time.sleep(_DELAY)
        return _replace(src, dst, *args, **kwargs)

    os.replace = _slow_replace
