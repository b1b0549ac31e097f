"""Numbers in log lines as Caffe's C++ streams print them (default precision 6, ``%g``-like)."""
from __future__ import annotations

import math


def g(x) -> str:
    """``std::ostream << x`` with default flags: 6 significant digits, no trailing zeros (``0.09375``,
    ``2.33841``, ``1e-05``); ``inf``/``nan`` as glibc prints them."""
    x = float(x)
    if math.isnan(x):
        return "-nan" if math.copysign(1.0, x) < 0 else "nan"
    return "%g" % x
