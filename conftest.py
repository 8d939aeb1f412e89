"""pytest hooks for the notebooks under nbval (loaded for every test run from this folder).

Trained figures differ between CPUs in their last digits (each kernel set rounds its own
way), so nbval compares a cell tagged ``trained-figures`` by its text only: every number in
its outputs, stored and new, is replaced by ``#`` (runs of spaces by one, and a verdict
drawn from those numbers, such as "no clear effect", by ``VERDICT``) before the
comparison. Every other cell is compared exactly. The numbers themselves are guarded by
``tests/test_metric_bands.py``, which compares each chapter's metrics JSON, written by the
same nbval run, with the reference values within measured bands (``companion/bands.py``).
"""

from __future__ import annotations

import re
import time

TRAINED_TAG = "trained-figures"
# integers, decimals, thousands separators, exponents, signs (ASCII and the minus sign)
_NUMBER = re.compile(r"[-+−]?(?:\d+(?:[.,]\d+)*|\.\d+)(?:[eE][-+]?\d+)?")
_SPACES = re.compile(r"[ \t]+")


_VERDICT = None  # built on first use: the verdict phrases the companion can print


def _verdict_pattern() -> re.Pattern:
    """Every verdict the companion prints on a measured effect (``evaluate.VERDICTS``,
    ``rlhf.RLHF_VERDICTS``), numbers masked, longest first so that a phrase wins over a
    word inside it."""
    global _VERDICT
    if _VERDICT is None:
        from companion.evaluate import VERDICTS
        from companion.rlhf import RLHF_VERDICTS

        phrases = {_NUMBER.sub("#", p.format(max_accuracy_loss=0))
                   for p in (*VERDICTS, *RLHF_VERDICTS)}
        alternatives = "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))
        _VERDICT = re.compile(rf"(?<![A-Za-z])(?:{alternatives})(?![A-Za-z])")
    return _VERDICT


def mask_numbers(text: str) -> str:
    """The text of a trained-figures output as nbval compares it: numbers become ``#``, and
    a verdict on a measured effect ("helped", "no clear effect", ...) becomes ``VERDICT``:
    both come out of training, and another CPU or seed can move a number across the verdict's
    two-standard-error line. Every other word is compared."""
    return _verdict_pattern().sub("VERDICT", _SPACES.sub(" ", _NUMBER.sub("#", text)))


def _masked(sanitize):
    def sanitize_and_mask(value):
        value = sanitize(value)
        return mask_numbers(value) if isinstance(value, str) else value
    return sanitize_and_mask


def _is_nbval_cell(item) -> bool:
    return hasattr(item, "cell") and hasattr(item, "sanitize")


def pytest_configure(config):
    # read by tests/test_metric_bands.py: which notebooks nbval ran in this session, and when
    # the session started (a metrics file older than that was not written by this run)
    config.companion_session_start = time.time()
    config.companion_nbval_notebooks = set()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_nbval_cell(item) and TRAINED_TAG in item.cell.metadata.get("tags", []):
            item.sanitize = _masked(item.sanitize)


def pytest_runtest_setup(item):
    if _is_nbval_cell(item):
        item.config.companion_nbval_notebooks.add(item.path.name)
