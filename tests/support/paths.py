"""Where the tests find this checkout and the embedded database's binary."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
HARNESS = Path(os.environ.get("USERS_DEV_DB_BINARY", REPO_ROOT / "dbharness/bin/dbharness"))
