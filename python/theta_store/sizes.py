"""Byte counts as people read them: `human_size(4096)` is "4.10 kB" (decimal units, as git prints).

Free of imports: the filter process and the pre-push hook print sizes too.
"""

from __future__ import annotations

_UNITS = ("kB", "MB", "GB", "TB", "PB")


def human_size(n: int | float | None) -> str:
    """Three significant digits in the largest unit that keeps the number at 1 or more.

    Example:
        >>> [human_size(n) for n in (0, 999, 4096, 12_345_678, 1_500_000_000, None)]
        ['0 B', '999 B', '4.10 kB', '12.3 MB', '1.50 GB', '-']
    """
    if n is None:
        return "-"
    if abs(n) < 1000:
        return f"{int(n)} B"
    value = float(n)
    for unit in _UNITS:
        value /= 1000
        # the unit is chosen after rounding: 999,999 bytes read "1.00 MB", not "1000 kB"
        if abs(value) < 999.5 or unit == _UNITS[-1]:
            if abs(value) < 9.995:
                return f"{value:.2f} {unit}"
            if abs(value) < 99.95:
                return f"{value:.1f} {unit}"
            return f"{value:.0f} {unit}"
    raise AssertionError("unreachable")


def human_progress(n: float, total: float | None = None) -> str:
    """For a progress line: one decimal, "1.2 GB", or with a total "1.2/4.1 GB" (both in its unit)."""
    unit, size = next(((u, z) for u, z in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if (n if total is None else total) >= z), ("B", 1.0))
    digits = 0 if unit == "B" else 1
    if total is None:
        return f"{n / size:.{digits}f} {unit}"
    return f"{n / size:.{digits}f}/{total / size:.{digits}f} {unit}"
