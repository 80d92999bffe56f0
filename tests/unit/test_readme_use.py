"""The first examples (issue 20), in the README and on the docs' Tasks page: their task module sends nothing at import
(every worker start would send a message), and the sending commands they show reach the task's queue."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
TASKS = (ROOT / "docs" / "tasks.md").read_text()


def _use_section() -> str:
    return TASKS.split("\n## ", 1)[0]


def test_the_task_module_of_the_first_example_sends_nothing_at_import():
    for text in (README, _use_section()):
        block = re.search(r"```python\n(# tasks\.py[^\n]*\n.*?)```", text, re.S)
        assert block, "the first example shows tasks.py"
        top_level = [ln for ln in block.group(1).splitlines() if ln and not ln.startswith((" ", "#", "@", "def ", "from "))]
        assert not [ln for ln in top_level if ".send" in ln], top_level


def test_the_first_examples_send_commands_name_the_tasks_queue():
    section = _use_section()
    own_queue = re.findall(r"@task\([^)]*queue=[^)]*\)[^\n]*\ndef (\w+)", section)
    assert "send_welcome" in own_queue
    for m in re.finditer(r"^magne send (\w+).*$", section, re.M):
        if m.group(1) in own_queue:  # not in the default queue NAME: the command must be told where it is
            assert "--module" in m.group(0) or "--queue" in m.group(0), m.group(0)
    assert re.search(r"^magne send send_welcome .*--module tasks", section, re.M)
