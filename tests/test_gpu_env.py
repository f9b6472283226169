"""scripts/gpu_env.sh: the GPU scripts' environment. The device image lacks omegaconf; wheels
carried in .whl/ are installed for the command, and anything still missing is one error line."""
import os
import shutil
import subprocess
import zipfile

import pytest

from conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
PROBE = "ldm_gpu_env_probe"


def source_env(tmp_path, wheels, required):
    env = dict(os.environ, WHEELS=str(wheels), REQUIRED_MODULES=required, TMPDIR=str(tmp_path))
    script = f"source scripts/gpu_env.sh && python3 -c 'import {PROBE}; print({PROBE}.VALUE)'"
    return subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def write_wheel(folder, name, version="0.1"):
    """A minimal pure-Python wheel, as pip download would bring one."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{name}/__init__.py", "VALUE = 'from the carried wheel'\n")
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return path


def test_a_missing_module_is_installed_from_the_carried_wheels(tmp_path):
    write_wheel(tmp_path / "whl", PROBE)
    result = source_env(tmp_path, tmp_path / "whl", f"torch {PROBE}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "from the carried wheel"
    assert (tmp_path / "ldm-gpu-site" / PROBE / "__init__.py").is_file()  # not into the environment itself


def test_a_module_missing_without_wheels_is_one_error_line(tmp_path):
    result = source_env(tmp_path, tmp_path / "no-wheels", f"torch {PROBE}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and PROBE in lines[0] and "scripts/gpu_wheels.sh" in lines[0]
    assert "torch" not in lines[0].split("lacks")[1].split(";")[0]  # only what is missing is named


def test_a_broken_wheel_is_one_error_line(tmp_path):
    (tmp_path / "whl").mkdir()
    (tmp_path / "whl" / f"{PROBE}-0.1-py3-none-any.whl").write_bytes(b"not a zip file")
    result = source_env(tmp_path, tmp_path / "whl", f"torch {PROBE}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: pip could not install the wheels")
