"""The postmortem notebook runs top to bottom from a clean clone and reaches its answers."""
import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def kernel_count(scenario: str, state: str) -> int:
    """Server sockets in `state` that the lab's `ss` saw at the end of a scenario."""
    truth = json.loads((NOTEBOOKS.parent / "sample_pcaps" / scenario / "truth.json").read_text())
    return sum(s["state"] == state for s in truth["ss"]["server"])


def test_postmortem_notebook_executes_and_reports_the_time_wait_count():
    nb = nbformat.read(NOTEBOOKS / "postmortem.ipynb", as_version=4)
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                            resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/markdown", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    tw, cw = (kernel_count("postmortem", state) for state in ("TIME_WAIT", "CLOSE_WAIT"))
    assert f"server 10.0.2.2: at most {tw} TIME_WAIT at once" in text
    assert f"; {cw} CLOSE_WAIT at capture end" in text
    assert "ports did not run out" in text
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs)
    assert images == 4  # states, two ladders, backoff
