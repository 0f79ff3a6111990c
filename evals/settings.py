"""Typed ``eval.*`` settings: each evaluation declares a frozen dataclass beside its ``run`` and this module turns
a run's raw values (:class:`repro.config.EvalValues`) into those dataclasses, strictly.

A field's name is its key (``eval.<field>``); a field two evaluations share (``train_subset`` for kNN and the
linear probe) takes one value for both. Fields marked :data:`UNKEYED` do not change an evaluation's numbers (the
batch size of a frozen forward pass) and stay out of its done-marker key. A field whose effect depends on the
machine (``feature_precision``: ``auto`` is bf16 on some CPUs, fp32 on others) names a function instead, which
turns the value and the device into what is keyed (or None: nothing).
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from repro.config import ConfigError, coerce

UNKEYED = {"keyed": False}
"""``field(metadata=UNKEYED)``: the value does not change the evaluation's numbers."""


def keyed(settings: Any, device: Any = None) -> dict[str, Any]:
    """The settings an evaluation's numbers depend on (they key its done-marker and are stored with its records).

    ``field(metadata={"keyed": rule})`` with a callable ``rule(value, device)`` keys what the value means on
    ``device`` (a ``torch.device``; None = CPU) and leaves the field out where ``rule`` returns None."""
    out = {}
    for f in fields(settings):
        rule = f.metadata.get("keyed", True)
        value = getattr(settings, f.name)
        if callable(rule):
            value = rule(value, device)
            if value is None:
                continue
        elif not rule:
            continue
        out[f.name] = value
    return out


def build(types: Mapping[str, type], values: Mapping[str, Any]) -> dict[str, Any]:
    """One settings object per evaluation from the raw ``eval.*`` values; an unknown key, a value of the wrong type
    or one its dataclass rejects is a :class:`ConfigError` naming the key."""
    hints = {name: typing.get_type_hints(tp) for name, tp in types.items()}
    known = sorted({f.name for tp in types.values() for f in fields(tp)})
    unknown = [k for k in values if k not in known]
    if unknown:
        raise ConfigError(f"unknown key 'eval.{unknown[0]}'; valid keys under eval: {', '.join(known)}")
    typed = {}
    for k, v in values.items():
        tp = next(h[k] for h in hints.values() if k in h)
        typed[k] = coerce(v, tp, f"eval.{k}")
    out = {}
    for name, tp in types.items():
        own = {f.name for f in fields(tp)}
        try:
            out[name] = tp(**{k: v for k, v in typed.items() if k in own})
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(f"eval ({name}): {e}") from None
    return out


def flat(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Every field of every settings object, by key: what a run's ``config.json`` records under ``eval``."""
    return {f.name: getattr(s, f.name) for s in settings.values() for f in fields(s)}
