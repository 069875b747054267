"""Collection rules for the doctests under funchess/ (tests/conftest.py holds the test fixtures)."""

from __future__ import annotations

import importlib.util

# the laplace-torch adapter imports laplace at module level: its doctests run only where the
# optional extra is installed (pip install "funchess[laplace]"), as tests/test_laplace.py does
collect_ignore = [] if importlib.util.find_spec("laplace") else ["funchess/integrations/laplace.py"]
