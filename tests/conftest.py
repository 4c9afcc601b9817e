"""Settings for every test: Hypothesis runs the same examples on every `make test`.

A random search that finds a new counter-example on one CI run and not the next makes the
suite flaky, not stronger; `make fuzz` runs the same property tests with fresh random
examples and more of them, to go looking for new ones (then pin what it finds as a test).
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", max_examples=500, print_blob=True)
settings.load_profile(os.environ.get("GRIDMESH_HYPOTHESIS", "repeatable"))
