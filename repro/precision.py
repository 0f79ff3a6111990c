"""Numeric precision of a forward pass: ``fp32`` or ``bf16`` (autocast), and what ``auto`` means on this machine.

``auto`` is bf16 on CUDA (as the trainer always did) and, once :data:`CPU_AUTO_BF16` is on, on CPUs whose cores
compute bf16 natively (AVX512_BF16 or AMX: Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later);
fp32 on every other CPU, where bf16 autocast would emulate the type and run slower than fp32. Losses keep computing
their logits in fp32 under autocast (``repro.losses``); golden and parity tests pin fp32.

``REPRO_CPU_BF16=0`` (or ``1``) overrides the detection: the tests force the capability off with it, so the fallback
of ``auto`` is checked on a CPU that has bf16 too.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")
"""Values of ``train.precision`` (and of the evaluations' feature precision)."""

_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")

CPU_AUTO_BF16 = False
"""Whether ``auto`` picks bf16 on a CPU with native bf16. Off until the 3-seed evidence (bf16 vs fp32 accuracy at
equal budget on ``cifar10-cpu``) is in: the speed is measured (``python -m repro.bench --roofline``), the effect of
the extra steps on the tables is not yet. Off, every CPU run resolves ``auto`` to fp32 and keeps its config hash."""


@functools.cache
def _detected_cpu_bf16() -> bool:
    try:
        if bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            flags = _cpuinfo_flags()
            # oneDNN also reports bf16 where it only emulates it (AVX512 without BF16); require a native unit when
            # /proc/cpuinfo can tell
            return flags is None or any(f in flags for f in _CPU_BF16_FLAGS)
        return False
    except (AttributeError, RuntimeError):
        flags = _cpuinfo_flags()
        return flags is not None and any(f in flags for f in _CPU_BF16_FLAGS)


def _cpuinfo_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def cpu_has_native_bf16() -> bool:
    """True where this CPU computes bf16 natively (``REPRO_CPU_BF16=0|1`` overrides the detection)."""
    forced = os.environ.get("REPRO_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    return _detected_cpu_bf16()


def resolve_precision(setting: str, device: torch.device) -> str:
    """``auto | fp32 | bf16`` -> ``fp32`` or ``bf16`` on ``device`` (``auto``: bf16 on CUDA, and on CPUs with native
    bf16 while :data:`CPU_AUTO_BF16` is on). An explicit ``bf16`` is honoured everywhere (slow where the CPU emulates
    it)."""
    if setting not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {setting!r}")
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16"
    if device.type == "cpu":
        return "bf16" if CPU_AUTO_BF16 and cpu_has_native_bf16() else "fp32"
    return "fp32"


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """bf16 autocast on ``device`` when ``precision`` (already resolved) is ``bf16``; a no-op for ``fp32``."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        yield
