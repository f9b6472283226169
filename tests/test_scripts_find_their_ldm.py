"""Every script imports the `ldm` of its own clone: run without `pip install -e .`, or where
another package named ldm comes first on the path (PyPI's `ldm` is an unrelated module), it
still starts. "No module named 'ldm'" / "'ldm' is not a package" is the most reported first
error in upstream's issue trackers."""
import os
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPTS = sorted(p.name for p in (REPO / "scripts").glob("*.py")
                 if "from ldm" in p.read_text() or "import ldm" in p.read_text())


@pytest.fixture(scope="module")
def foreign_ldm(tmp_path_factory):
    """A folder holding an unrelated top-level module `ldm`, to go first on PYTHONPATH."""
    folder = tmp_path_factory.mktemp("foreign")
    (folder / "ldm.py").write_text("raise ImportError('the foreign ldm module was imported')\n")
    return folder


def test_the_scripts_are_found():
    assert {"txt2img.py", "img2img.py", "inpaint.py", "consistency_benchmark.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_script_starts_with_another_ldm_first_on_the_path(script, foreign_ldm, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(foreign_ldm))
    result = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr[-2000:]
