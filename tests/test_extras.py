"""conftest.need: a test of an optional extra skips where the extra is not installed, and fails
instead under CI (CI=true), where `pip install -e ".[dev]"` installs every extra; .ci/run says so."""
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

NEEDS_A_MISSING_MODULE = {  # file -> what it holds: `need` at module level, and inside a test
    "test_module_level.py": 'need("bnntrain_no_such_module", extra="nothing")\n\n\ndef test_a():\n    pass\n',
    "test_in_a_test.py": ('def test_b():\n    need("bnntrain_no_such_module", extra="nothing")\n\n\n'
                          'def test_c():\n    need("json", extra="nothing")\n'),
}


def run_pytest(folder: Path, ci: str | None) -> subprocess.CompletedProcess:
    """pytest on `folder`, going on past a file that fails to collect, with CI=`ci` or no CI."""
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({} if ci is None else {"CI": ci})
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-rfEs",
                           "--continue-on-collection-errors", str(folder)],
                          capture_output=True, text=True, cwd=folder, env=env, timeout=120)


def test_a_missing_extra_skips_but_fails_under_ci(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # this folder is the rootdir: none of the project's options
    header = f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nfrom conftest import need  # noqa: E402\n\n\n"
    for name, body in NEEDS_A_MISSING_MODULE.items():
        (tmp_path / name).write_text(header + body)
    local = run_pytest(tmp_path, ci=None)
    assert local.returncode == 0 and "1 passed, 2 skipped" in local.stdout, local.stdout + local.stderr
    assert "pip install -e '.[nothing]'" in local.stdout
    ci = run_pytest(tmp_path, ci="true")
    assert ci.returncode == 1, ci.stdout + ci.stderr
    assert "1 failed, 1 passed, 1 error" in ci.stdout, ci.stdout
    for line in ("FAILED test_in_a_test.py::test_b - Failed: CI=true: bnntrain_no_such_module is missing",
                 "ERROR test_module_level.py - Failed: CI=true: bnntrain_no_such_module is missing"):
        assert line in ci.stdout, ci.stdout


def test_the_ci_script_runs_the_suite_under_ci():
    script = (TESTS.parent / ".ci" / "run").read_text()
    assert "export CI=true" in script.split("pytest -q")[0]
