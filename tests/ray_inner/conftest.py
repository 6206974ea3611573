"""These tests start a Ray cluster and must run inside a loopback-only network namespace: the outer test
(tests/integration/test_ray_pool.py) creates one and runs them there. Elsewhere they are not collected."""

from __future__ import annotations

import os

INSIDE = "TUNEFORGE_INSIDE_LOOPBACK_NAMESPACE"

collect_ignore_glob = [] if os.environ.get(INSIDE) == "1" else ["test_*.py"]
