"""matplotlib for every plot the package writes: one set-up, one rule for when it is missing.

A plot the user asked for (`--plot FILE`) needs matplotlib: `check_plotting()` refuses before any work.
A plot that comes with other results (a fine-tune's curve, a compress report) is skipped with a note:
`pyplot(optional=True)` returns None, so the results are still saved.
"""

from __future__ import annotations

import sys
from typing import Any

from .errors import UserError

INSTALL_HINT = "pip install 'truedepth[plot]' (or pip install matplotlib)"


def check_plotting() -> None:
    """Raise a UserError when matplotlib is missing (call it before expensive work)."""
    pyplot()


def pyplot(optional: bool = False) -> Any:
    """matplotlib.pyplot on the Agg backend (files only: no display needed, none opened)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if optional:
            print(f"matplotlib is not installed: no plot ({INSTALL_HINT}).", file=sys.stderr)
            return None
        raise UserError(f"plots need matplotlib: {INSTALL_HINT}.") from None
    return plt


def save_figure(fig: Any, path: Any, dpi: int = 110) -> None:
    """Write `fig` to `path` and free it (pyplot keeps every open figure otherwise)."""
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
