"""MINILLM_NO_SKIPS=1 (CI) makes a skip a failure, so a missing extra cannot pass unnoticed."""

import subprocess
import sys

from conftest import REPO


def test_a_skip_fails_under_minillm_no_skips(tmp_path):
    (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text(encoding="utf-8"))
    (tmp_path / "test_s.py").write_text("import pytest\n\ndef test_a():\n    pytest.skip('no extra')\n")
    (tmp_path / "test_m.py").write_text("import pytest\npytest.importorskip('no_such_module_x')\n\n"
                                       "def test_b():\n    pass\n")

    def run(env_value, *files):
        env = {"PATH": "/usr/bin:/bin", "MINILLM_NO_SKIPS": env_value, "PYTHONPATH": str(REPO)}
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", "/dev/null",
                               *(str(tmp_path / f) for f in files)], capture_output=True, text=True, cwd=tmp_path,
                              env=env, timeout=120)

    lenient = run("0", "test_s.py", "test_m.py")
    assert lenient.returncode == 0 and "2 skipped" in lenient.stdout, lenient.stdout
    test = run("1", "test_s.py")
    assert test.returncode == 1 and "skipped under MINILLM_NO_SKIPS=1" in test.stdout and "1 failed" in test.stdout
    module = run("1", "test_m.py")
    assert module.returncode != 0 and "ERROR test_m.py" in module.stdout, module.stdout
