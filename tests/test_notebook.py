"""launch/colab_tpu_demo.ipynb runs top to bottom on CPU in its test setting (a tiny random model,
16 prompts, no install step), shows real and generated responses side by side, and draws the
margins figure (an image/png output and a saved PNG)."""

import base64
import os
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "launch", "colab_tpu_demo.ipynb")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_notebook_has_a_parameters_cell_and_skips_install_in_tests():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "IN_TEST" in params[0].source and "TINY" in params[0].source
    install = [c for c in nb.cells if c.cell_type == "code" and "pip install" in c.source]
    assert len(install) == 1 and install[0].source.startswith("if not IN_TEST:")
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # stored without outputs


def test_notebook_runs_one_tiny_iteration_and_plots_the_margins(tmp_path, monkeypatch):
    monkeypatch.setenv("SPIN_DEMO_TEST", "1")  # the kernel inherits this process's environment
    monkeypatch.setenv("SPIN_DEMO_WORK_DIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": ROOT}})
    t0 = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - t0
    assert elapsed < 180, f"the test setting took {elapsed:.0f}s"

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "8 devices" in text  # the test process's 8 CPU devices, all in the mesh
    assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in text
    assert text.count("REAL (human)") == 4 and text.count("GENERATED (opponent)") == 4
    pngs = [base64.b64decode(o.data["image/png"]) for o in outputs
            if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})]
    assert len(pngs) == 1 and pngs[0].startswith(PNG_MAGIC)
    saved = tmp_path / "runs" / "colab_demo" / "iter0" / "margins.png"
    assert saved.read_bytes().startswith(PNG_MAGIC)
    assert (tmp_path / "runs" / "colab_demo" / "iter0" / "model" / "config.json").exists()
