from magne.testing import magne_worker  # noqa: F401  (the fixture: one testing worker per test)
