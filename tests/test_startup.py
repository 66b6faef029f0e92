"""A job's command line starts without torch: it loads where a describer is built (in the extraction actors,
when queries are described), not with ``jobs.search`` or ``retrieval JOB --help`` (torch alone takes seconds)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

NO_TORCH = """
import sys
import jobs.cli, jobs.search
loaded = sorted(m for m in ("torch", "torchvision") if m in sys.modules)
assert not loaded, f"importing the jobs loaded {loaded}"
try:
    jobs.cli.main(["search", "--help"])
except SystemExit as e:
    assert e.code == 0, e.code
for job in jobs.cli.JOBS:
    try:
        jobs.cli.main([job, "--help"])
    except SystemExit as e:
        assert e.code == 0, (job, e.code)
    loaded = sorted(m for m in ("torch", "torchvision") if m in sys.modules)
    assert not loaded, f"retrieval {job} --help loaded {loaded}"
"""


@pytest.mark.slow  # a fresh interpreter (this one has torch loaded by other tests)
def test_search_and_every_jobs_help_do_not_import_torch():
    proc = subprocess.run([sys.executable, "-c", NO_TORCH], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--index" in proc.stdout  # the help was printed
