"""Ctrl-C and kill -9 in the middle of a real run: finished steps stay, nothing half-written looks finished."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from caspec.spec.load import load_spec
from caspec.store import LocalStore

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def default_sigint() -> None:
    """Ctrl-C must reach the child even when the tests run as a background job (a shell starts those with
    SIGINT ignored, and Python then keeps ignoring it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(tmp: Path) -> tuple[subprocess.Popen, Path]:
    spec = tmp / "demo.yaml"
    shutil.copy(ROOT / "specs" / "demo.yaml", spec)
    proc = subprocess.Popen([sys.executable, "-m", "caspec", "run", str(spec)], cwd=tmp,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
                            preexec_fn=default_sigint)
    marker = tmp / "out" / "demo" / "robot" / ".caspec-key"
    deadline = time.monotonic() + 240
    while not marker.exists():  # the root step has finished and been laid out; the edit step is running
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "root step did not finish in time"
        time.sleep(0.05)
    time.sleep(1.0)
    return proc, spec


def records(store: LocalStore) -> list[str]:
    return sorted(r.meta["step_id"] for r in store.records())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_interrupt_mid_edit(tmp_path, sig):
    proc, spec = start(tmp_path)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    store = LocalStore(tmp_path / ".caspec")
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert "interrupted" in err and "Traceback" not in err
        assert list((store.root / "tmp").iterdir()) == []  # staging removed on the way out
    else:
        assert proc.returncode == -signal.SIGKILL
    assert records(store) == ["robot"]  # the finished step is kept, the interrupted one left no record
    for record in store.records():
        assert store.verify(record) == []
    report = store.gc({r.key for r in store.records()})
    assert report.records == []
    assert list((store.root / "tmp").iterdir()) == []
    # the next run picks up where it stopped: the root is cached, the edit runs, the gate pauses
    rerun = subprocess.run([sys.executable, "-m", "caspec", "run", str(spec)], cwd=tmp_path,
                           capture_output=True, text=True)
    assert rerun.returncode == 3, rerun.stderr
    assert "robot                root    cached" in rerun.stderr
    assert records(store) == ["robot", "robot-colors"]
    assert load_spec(spec).name == "demo"
