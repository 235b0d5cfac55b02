"""Code run in a fresh Python process: what `import dqa_ext` registers or imports by itself,
without anything this test session already loaded."""

import subprocess
import sys


def run_fresh(code, timeout=600):
    """Runs code with this interpreter, outside the checkout; fails the test with its stderr."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout
