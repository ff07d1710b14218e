"""What a person reads while a federation runs: the ServerApp's lines, not the libraries'.

A client under the Ray simulation writes into the run's log (every line prefixed with its
actor), so its processes stay quiet: no progress bars (``fl_lota.training.train`` draws one only on a
terminal), and transformers, datasets and the hub say nothing below ERROR. The server logs,
per client and round, one line per phase with its seconds and loss (``server/book.py``). The
run-config key ``verbose`` (``fl-lota run --verbose``) leaves the libraries as they are.
"""

from __future__ import annotations

import os

__all__ = ["quiet_libraries"]


def quiet_libraries(verbose: bool = False) -> None:
    """Silence the progress bars and INFO/WARNING chatter of transformers, datasets and the
    hub in this process (``verbose``: leave them as they are)."""
    if verbose:
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()
    except ImportError:
        pass
