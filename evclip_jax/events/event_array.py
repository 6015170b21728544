"""The event array every reader returns, and how decoded columns become one.

Every format ends in one structured array of ``EVENT_DTYPE`` (x, y uint16; t int64 microseconds;
p int8 in {0, 1}), so the rest of the code never sees a format. Timestamps carry a unit: a file
that states one (a format defined in microseconds, an HDF5 ``unit`` attribute) is converted from
it; integers with no stated unit are microseconds, and floats with no stated unit are refused,
since seconds read as microseconds silently put a whole recording at t = 0.
"""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np

EVENT_DTYPE = np.dtype([("x", "<u2"), ("y", "<u2"), ("t", "<i8"), ("p", "i1")])

# Microseconds per unit.
TIME_UNITS = {"s": Fraction(10**6), "ms": Fraction(10**3), "us": Fraction(1),
              "ns": Fraction(1, 10**3)}
_UNIT_ALIASES = {"seconds": "s", "sec": "s", "milliseconds": "ms", "microseconds": "us",
                 "\u00b5s": "us", "\u03bcs": "us", "nanoseconds": "ns"}

PathLike = str | os.PathLike


class EventFileError(ValueError):
    """A file that cannot be read as events; the message starts with the path."""


def canonical_time_unit(unit: str | bytes, where: str) -> str:
    """Returns one of ``TIME_UNITS`` for a unit name or alias; ``where`` names its source."""
    if isinstance(unit, bytes):
        unit = unit.decode("utf-8", errors="replace")
    name = str(unit).strip()
    name = _UNIT_ALIASES.get(name.lower(), name.lower())
    if name not in TIME_UNITS:
        raise EventFileError(f"{where}: unknown time unit {unit!r}; expected one of "
                             f"{', '.join(TIME_UNITS)} (or seconds, milliseconds, "
                             "microseconds, nanoseconds)")
    return name


def timestamps_us(path: str, t: np.ndarray, unit: str | None) -> np.ndarray:
    """Field 't' of ``path`` as int64 microseconds, from ``unit`` (None: the file says none)."""
    t = np.asarray(t)
    if t.dtype.kind not in "iuf":
        raise EventFileError(f"{path}: field 't' has dtype {t.dtype}; expected numbers")
    if t.dtype.kind == "f":
        if unit is None:
            raise EventFileError(
                f"{path}: field 't' holds floating-point timestamps ({t.dtype}) and neither the "
                f"file nor time_unit= gives their unit; pass time_unit= one of "
                f"{', '.join(TIME_UNITS)} (integer timestamps are taken as microseconds)")
        if np.isnan(t).any():
            raise EventFileError(f"{path}: timestamps contain NaN at event "
                                 f"{int(np.flatnonzero(np.isnan(t))[0])}")
        if not np.all(np.isfinite(t)):
            raise EventFileError(f"{path}: timestamps contain infinite values")
        us = np.round(t.astype(np.float64) * float(TIME_UNITS[unit]))
        if us.size and np.abs(us).max() >= 2.0**63:
            raise EventFileError(f"{path}: timestamps in {unit} exceed the int64 microsecond "
                                 "range")
        return us.astype(np.int64)
    if t.dtype == np.uint64 and t.size and t.max() > np.iinfo(np.int64).max:
        raise EventFileError(f"{path}: timestamps exceed the int64 range")
    t = t.astype(np.int64, copy=False)
    scale = TIME_UNITS["us" if unit is None else unit]
    if scale == 1:
        return t
    if scale.denominator == 1:
        limit = np.iinfo(np.int64).max // scale.numerator
        if t.size and np.abs(t).max() > limit:
            raise EventFileError(f"{path}: timestamps in {unit} exceed the int64 microsecond "
                                 "range")
        return t * scale.numerator
    # Finer than a microsecond: round to the nearest microsecond, halves up.
    return (t + scale.denominator // 2) // scale.denominator


def _int_column(path: str, name: str, a: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Checks one coordinate column is integral and within [lo, hi]; returns it as int64."""
    a = np.asarray(a)
    if a.dtype.kind == "b":
        a = a.astype(np.int64)
    if a.dtype.kind not in "iuf":
        raise EventFileError(f"{path}: field '{name}' has dtype {a.dtype}; expected numbers")
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)):
            raise EventFileError(f"{path}: field '{name}' contains NaN or infinite values")
        if not np.array_equal(a, np.round(a)):
            raise EventFileError(f"{path}: field '{name}' holds non-integer values; expected "
                                 "integer pixel coordinates")
    if a.size:
        amin, amax = a.min(), a.max()
        if amin < lo or amax > hi:
            raise EventFileError(
                f"{path}: field '{name}' ranges over [{amin}, {amax}]; expected values in "
                f"[{lo}, {hi}]")
    return a.astype(np.int64, copy=False)


def _polarity(path: str, p: np.ndarray) -> np.ndarray:
    """Polarity in {0, 1} or {-1, 1} (no zeros) as int8 {0, 1}."""
    p = np.asarray(p)
    if p.dtype.kind == "b":
        return p.astype(np.int8)
    if p.dtype.kind not in "iuf":
        raise EventFileError(f"{path}: field 'p' has dtype {p.dtype}; expected numbers")
    if p.size:
        pmin, pmax = p.min(), p.max()
        zero_one = pmin >= 0 and pmax <= 1
        signed = pmin >= -1 and pmax <= 1 and not np.any(p == 0)
        integral = p.dtype.kind != "f" or np.array_equal(p, np.round(p))
        if not integral or not (zero_one or signed):
            raise EventFileError(
                f"{path}: polarity ranges over [{pmin}, {pmax}]; expected values in {{0, 1}} or "
                f"{{-1, 1}}")
    return (p > 0).astype(np.int8)


def event_array(path: str, x: np.ndarray, y: np.ndarray, t_us: np.ndarray,
                p: np.ndarray) -> np.ndarray:
    """Validates decoded columns (t already in microseconds) and packs them as ``EVENT_DTYPE``."""
    cols = {"x": np.asarray(x), "y": np.asarray(y), "t": np.asarray(t_us), "p": np.asarray(p)}
    for name, col in cols.items():
        if col.ndim != 1:
            raise EventFileError(f"{path}: field '{name}' has shape {col.shape}; expected 1-D")
    lengths = {name: len(col) for name, col in cols.items()}
    if len(set(lengths.values())) != 1:
        raise EventFileError(f"{path}: fields have different lengths {lengths}; expected equal")
    out = np.empty(lengths["x"], dtype=EVENT_DTYPE)
    out["x"] = _int_column(path, "x", cols["x"], 0, np.iinfo(np.uint16).max)
    out["y"] = _int_column(path, "y", cols["y"], 0, np.iinfo(np.uint16).max)
    out["t"] = cols["t"]
    out["p"] = _polarity(path, cols["p"])
    return out


def check_sensor(path: str, ev: np.ndarray, sensor_size: tuple[int, int]) -> None:
    """Raises unless every event of ``ev`` lies on a (H, W) sensor."""
    height, width = (int(s) for s in sensor_size)
    if len(ev) == 0:
        return
    xmax, ymax = int(ev["x"].max()), int(ev["y"].max())
    if xmax >= width or ymax >= height:
        raise EventFileError(
            f"{path}: coordinates outside the sensor: max x = {xmax}, max y = {ymax}; expected "
            f"x < {width} and y < {height} for sensor_size (H, W) = ({height}, {width})")
