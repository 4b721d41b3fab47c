"""Report sections about how each number was measured: the best test accuracy over evaluations beside the final
one (IRE Table 1's metric), and each cell's data source.

Built from the best-trial rows of ``regtune.report.best_trials`` (columns of
``trials.parquet``): ``final/test/accuracy_max`` (the running maximum of the
test accuracy over the reports, ``regtune.loop``), ``final/test/accuracy``,
``final/test/accuracy_best`` (the test accuracy of the best-validation
checkpoint) and ``data_source`` (``studies.engine.provenance``).
"""

from __future__ import annotations

import math

import pandas as pd


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def accuracy_over_evals_table(best: pd.DataFrame) -> str:
    """Best test accuracy over evaluations beside the final one, per cell ("" when no cell has the maximum)."""
    col = "final/test/accuracy_max"
    if col not in best or not best[col].notna().any():
        return ""
    head = ["cell", "test accuracy: best over evaluations", "final", "at the best-validation checkpoint",
            "published (metric)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in best.iterrows():
        metric = r.get("published/metric")
        pub = r.get("published/value")
        pub_text = "-" if pub is None or (isinstance(pub, float) and math.isnan(pub)) else f"{pub:g} ({metric})"
        lines.append(f"| {r['cell']} | {_pct(r.get(col))} | {_pct(r.get('final/test/accuracy'))} | "
                     f"{_pct(r.get('final/test/accuracy_best'))} | {pub_text} |")
    return "\n".join(["## Test accuracy: best over evaluations and final", "",
                      "Accuracies in percent, of each cell's best trial. 'best over evaluations' is the maximum test "
                      "accuracy over the reports (test/accuracy_max: the IRE paper's Table 1 metric); 'final' is the "
                      "last report's.", "", *lines, ""])


def data_source_lines(best: pd.DataFrame) -> str:
    """One line per cell naming the data its best trial read ("" when the rows predate the column)."""
    if "data_source" not in best:
        return ""
    lines = [f"- {r['cell']}: {r['data_source'] if isinstance(r.get('data_source'), str) else 'unknown'}"
             for _, r in best.iterrows()]
    return "\n".join(["## Data source per cell", "", *lines, ""])


def protocol_sections(best: pd.DataFrame) -> list[str]:
    """The non-empty sections, ready to append to the report's parts."""
    return [s for s in (accuracy_over_evals_table(best), data_source_lines(best)) if s]
