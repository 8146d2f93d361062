"""Chapter 04's stored outputs: fully executed, with the verdict table, the floor and the figures.

The default run itself is executed by nbval (``--nbval-lax notebooks``), where the notebook's own
``assert`` cells check its claims; its bad parameters are refused in ``tests/test_notebooks.py``.
"""
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
VISION = ROOT / "notebooks" / "04_vision_mux.ipynb"


def stored():
    return nbformat.read(str(VISION), as_version=4)


def test_the_stored_notebook_is_fully_executed_without_errors():
    nb = stored()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "every code cell has run (refresh the notebook)"
    assert not any(o.get("output_type") == "error" for c in code for o in c.outputs)


def test_the_stored_notebook_shows_curves_a_verdict_table_and_the_floor():
    text = "\n".join(str(o.get("data", {}).get("text/markdown", "")) + o.get("text", "")
                     for c in stored().cells if c.cell_type == "code" for o in c.outputs)
    assert "| A | B | gap (A - B) | 95% interval | seeds | items | verdict |" in text
    assert "logistic regression on pixels" in text and "ConcatPlexer, last block: share of CLS attention" in text
    images = sum("image/png" in o.get("data", {}) for c in stored().cells if c.cell_type == "code" for o in c.outputs)
    assert images >= 5  # codes, layouts, learning curves, attention, accuracy against cost


def test_cells_stay_short():
    nb = stored()
    lengths = sorted(len(c.source.splitlines()) for c in nb.cells
                     if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", []))
    assert lengths[-1] <= 25 and lengths[len(lengths) // 2] <= 12, lengths
