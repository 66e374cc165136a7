"""The notebooks run top to bottom with `SMALL = True` (nbclient, a fresh kernel each), and are committed clean.

Each notebook has one `SMALL = ...` line in a cell tagged `parameters`; the test sets it to True whatever
was committed. The kernels share one compile cache (`CODESIGN_CACHE_DIR`) in a temporary directory, so a
later notebook may reuse an earlier one's compiles but never a stale cache from outside the test.
"""

import os
import re

import pytest

NOTEBOOKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "notebooks")
NAMES = sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb"))
SMALL_LINE = re.compile(r"^SMALL = .*$", re.MULTILINE)


def _read(name: str):
    import nbformat

    return nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)


def test_the_four_notebooks_exist():
    assert NAMES == [
        "01_quickstart.ipynb",
        "02_plan_for_a_tpu_pod.ipynb",
        "03_codesign_deepseek.ipynb",
        "04_train_a_plan.ipynb",
    ]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_without_outputs(name):
    nb = _read(name)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{name}: cells {dirty} have outputs or execution counts; clear them before committing"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_has_install_cell_and_small_switch(name):
    nb = _read(name)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert 'if "google.colab" in sys.modules:' in code[0].source and "REPO_URL = " in code[0].source
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and len(SMALL_LINE.findall(params[0].source)) == 1


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("compile-cache"))
    old = os.environ.get("CODESIGN_CACHE_DIR")
    os.environ["CODESIGN_CACHE_DIR"] = path
    yield path
    if old is None:
        os.environ.pop("CODESIGN_CACHE_DIR", None)
    else:
        os.environ["CODESIGN_CACHE_DIR"] = old


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
# CI runs the quickstart and the TPU-pod notebooks; the DeepSeek and training ones (1.5-2 min each) are slow.
@pytest.mark.parametrize("name", [n if n < "03" else pytest.param(n, marks=pytest.mark.slow) for n in NAMES])
def test_notebook_executes_small(name, tmp_path, shared_cache):
    from nbclient import NotebookClient

    nb = _read(name)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source = SMALL_LINE.sub("SMALL = True", params.source)
    # The kernel inherits this process's environment: 8 emulated CPU devices (tests/conftest.py) and the cache.
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name}: {errors[0].ename}: {errors[0].evalue}"
    figures = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})
    ]
    assert figures, f"{name} showed no figure inline"
