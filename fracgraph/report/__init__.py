"""`fracgraph report`: runs -> one self-contained HTML page plus PNG figures (matplotlib, Agg)."""

from .page import Section, write_report
from .rundata import ChoiceCounts, RunData, load_run, load_runs

__all__ = ["ChoiceCounts", "RunData", "Section", "load_run", "load_runs", "write_report"]
