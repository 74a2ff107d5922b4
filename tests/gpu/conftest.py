"""tests/gpu/ reuses the CPU suite's helpers (tests/test_sync.py, tests/test_learner.py): its folder
is on the import path, as for the tests there."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
