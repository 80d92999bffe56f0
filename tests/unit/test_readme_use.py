"""The README's first example (issue 20): its task module sends nothing at import (every worker start would send a
message), and the sending commands it shows reach the task's queue."""

from __future__ import annotations

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _use_section() -> str:
    return README.split("## Use", 1)[1].split("\n### ", 1)[0]


def test_the_task_module_of_the_first_example_sends_nothing_at_import():
    block = re.search(r"```python\n(# tasks\.py\n.*?)```", _use_section(), re.S)
    assert block, "the first example shows tasks.py"
    top_level = [ln for ln in block.group(1).splitlines() if ln and not ln.startswith((" ", "#", "@", "def ", "from "))]
    assert not [ln for ln in top_level if ".send" in ln], top_level


def test_the_first_examples_send_commands_name_the_tasks_queue():
    for line in re.findall(r"^magne send .*$", _use_section(), re.M):
        assert "--module" in line or "--queue" in line, line
    assert re.search(r"^magne send send_welcome .*--module tasks", _use_section(), re.M)
