"""Starting a local server: its two ready lines are found however the pipe delivers them."""

from __future__ import annotations

import subprocess
import sys
import time

from tuneforge.clients.local_server import _read_ready_lines

BOTH_AT_ONCE = (
    "import sys, time\n"
    "sys.stdout.write('tuneforge metrics on http://127.0.0.1:9/metrics\\ntuneforge listening on 127.0.0.1:7\\n')\n"
    "sys.stdout.flush()\n"
    "time.sleep(30)\n"
)


def test_both_lines_in_one_write_are_read_at_once() -> None:
    """A buffered readline would take both lines off the pipe, return the first, and leave select() waiting for
    bytes that never come (the timeout a loaded machine once hit)."""
    process = subprocess.Popen([sys.executable, "-c", BOTH_AT_ONCE], stdout=subprocess.PIPE, text=True)
    try:
        began = time.monotonic()
        assert _read_ready_lines(process, 20) == ("127.0.0.1:7", "http://127.0.0.1:9/metrics")
        assert time.monotonic() - began < 10
    finally:
        process.kill()
        process.wait()
        assert process.stdout is not None
        process.stdout.close()
