"""Typed access to Flower records.

A ``RecordDict`` holds ``ArrayRecord | MetricRecord | ConfigRecord`` and a record's values are
unions too; these helpers check at runtime what fedslm's messages always carry and return the
precise type (a clear ``TypeError`` otherwise, instead of an attribute error further on).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, MetricRecordValues, RecordDict

from .protocol import ARRAYS, METRICS

R = TypeVar("R", ArrayRecord, MetricRecord, ConfigRecord)


def _record(content: RecordDict, key: str, kind: type[R]) -> R:
    record = content[key]
    if not isinstance(record, kind):
        raise TypeError(f"record {key!r}: expected {kind.__name__}, got {type(record).__name__}")
    return record


def arrays_of(content: RecordDict, key: str = ARRAYS) -> ArrayRecord:
    """The ``ArrayRecord`` under ``key`` (``KeyError`` if absent, ``TypeError`` if of another kind)."""
    return _record(content, key, ArrayRecord)


def metrics_of(content: RecordDict, key: str = METRICS) -> MetricRecord:
    """The ``MetricRecord`` under ``key`` (``KeyError`` if absent, ``TypeError`` if of another kind)."""
    return _record(content, key, MetricRecord)


def make_metrics(values: Mapping[str, MetricRecordValues]) -> MetricRecord:
    """A ``MetricRecord`` of any mapping of metric values (Flower's constructor wants exactly a
    ``dict[str, MetricRecordValues]``, which e.g. a ``dict[str, float]`` is not: dict is invariant)."""
    return MetricRecord(dict(values))


def _number(value: object, name: str) -> int | float:
    if isinstance(value, int | float):  # a bool is an int
        return value
    raise TypeError(f"{name} is a {type(value).__name__}, expected a number")


def as_int(value: object, name: str = "record value") -> int:
    """``int(value)`` of a numeric record value; ``TypeError`` for lists, arrays, strings, bytes."""
    return int(_number(value, name))


def as_float(value: object, name: str = "record value") -> float:
    """``float(value)`` of a numeric record value; ``TypeError`` for lists, arrays, strings, bytes."""
    return float(_number(value, name))
