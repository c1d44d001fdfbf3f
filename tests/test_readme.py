"""README.md's Python quickstart runs as written: its one ```python block is executed, unchanged, in an empty
folder (it trains a tiny ensemble there, loads it, and loads a member in SAELens)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def test_the_readmes_python_example_runs_and_does_what_its_comments_say(tmp_path, monkeypatch):
    blocks = FENCE.findall(README.read_text())
    assert len(blocks) == 1, "README.md should hold exactly one ```python block, the quickstart"
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__readme__"}
    exec(compile(blocks[0], "README.md (python block)", "exec"), namespace)

    # what its comments claim
    saes, x, x_hat, sae = namespace["saes"], namespace["x"], namespace["x_hat"], namespace["sae"]
    n, h, d = saes.W_enc.shape
    assert (n, d) == (3, 32) and x_hat.shape == (n, len(x), d)
    acts, idx = namespace["acts"], namespace["idx"]
    assert acts.shape == idx.shape == (n, len(x), 4)
    assert type(sae).__name__ == "TopKSAE"
    torch.testing.assert_close(sae(x), x_hat[0], atol=1e-5, rtol=1e-5)
    results = namespace["results"]
    assert all(0 < m["fvu"] < 1 and 0 < m["gt_mcc"] <= 1 for m in results["members"])
    assert (tmp_path / "runs" / "py" / "results.json").is_file()
