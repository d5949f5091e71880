"""The browser tier (``make test-browser``): collected only when ``VOXCORE_TEST_BROWSER=1``.

It drives the system Chromium (Debian ``chromium`` + ``chromium-driver``) headless with selenium; the
fast suite (``make test``) leaves it out.
"""

from __future__ import annotations

import os

collect_ignore_glob = [] if os.environ.get("VOXCORE_TEST_BROWSER") == "1" else ["test_*.py"]
