"""From a folder of raw footage to a captioned, reviewed clip dataset the trainer reads.

    from data_prep import prepare, PrepOptions
    summary = prepare("footage/", "dataset/", PrepOptions(family="wan", frames=81, fps=16, size="832x480", trigger="mystyle"))
    print(summary.text())

Steps (each a module of small functions): probe, split, cut, filter, caption, manifest, report.
Command line: ``python -m data_prep --help``.
"""

from data_prep.options import OptionsError, PrepOptions
from data_prep.pipeline import Summary, on_dataset, prepare

__all__ = ["OptionsError", "PrepOptions", "Summary", "on_dataset", "prepare"]
