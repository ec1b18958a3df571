"""
The generated picture of docs/architecture.md is current: docs/imports.dot
is what docs/imports.py makes of lbws/*.py now, and every module has its
part.
"""

import importlib.util

from tests.support import ROOT


def importsScript():
    spec = importlib.util.spec_from_file_location("imports", ROOT / "docs" / "imports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_import_graph_is_current():
    script = importsScript()
    assert (ROOT / "docs" / "imports.dot").read_text() == script.dot(), (
        "docs/imports.dot is stale: run .venv/bin/python docs/imports.py"
    )
    svg = (ROOT / "docs" / "imports.svg").read_text()
    assert all(f">{name}</text>" in svg for name in script.modules()), (
        "docs/imports.svg is stale: run .venv/bin/python docs/imports.py"
    )


def test_every_module_has_its_part():
    script = importsScript()
    placed = {name for names in script.PARTS.values() for name in names}
    assert set(script.modules()) <= placed, "give new modules their part in docs/imports.py"


def test_every_module_is_in_the_readme_layout():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    missing = [name for name in importsScript().modules() if f"`lbws/{name}.py`" not in layout]
    assert not missing, missing
