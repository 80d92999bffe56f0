"""The whole suite collects in one run: test modules are imported by their basename (rootdir-relative, no packages),
so two files of the same name in tests/unit and tests/e2e stop the README's test command at collection, although
each folder run alone passes."""

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_no_two_test_modules_share_a_name():
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert not [n for n, c in names.items() if c > 1], names.most_common(3)
