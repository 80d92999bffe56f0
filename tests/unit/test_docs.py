"""Every code example in README.md and docs/*.md is executed here, without a broker, in a few seconds.

The docs are what a newcomer copies first, so an example that no longer runs is a bug. How each kind of
fenced block is treated:

- `python`: run in order, one namespace per page, while `magne.testing.worker()` stands in for the broker
  (every send lands in memory). A block whose first line is `# NAME.py` is that module: it is written to a
  temporary folder on sys.path and imported, so that later blocks can `from NAME import ...` as an
  application does. Then every message the page's examples sent runs through a fresh testing worker that
  knows every task the page registered, and none may be dead-lettered.
- `<!-- not-run: REASON -->` on the line before a block: not run (a fragment, or only meaningful against a
  real broker); the reason is required.
- `<!-- file: PATH -->` on the line before a block: the block is that file of this repository, byte for
  byte, and the suite runs the file where it lives (tests/unit/docs_example/).
- `json`: must parse. `sh` and `text`: not run, but each `magne ...` command line in them must parse with
  the CLI's own parser, and each copy of the test command must be the one .ci/run runs.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

from magne import hooks
from magne.cli import build_parser
from magne.registry import REGISTRY
from magne.testing import worker

ROOT = Path(__file__).parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"<!--\s*(not-run|file):\s*(.*?)\s*-->")
MODULE = re.compile(r"# (\w+)\.py\b")
TEST_COMMAND = re.compile(r"^python3 -m venv \.venv && .*pytest.*$", re.M)


@dataclasses.dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    mark: str | None  # "not-run" or "file"
    mark_text: str | None

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page (top-level fences only: the docs indent none), with the mark just above each."""
    lines = page.read_text().split("\n")
    found, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j] == "```")
        mark = MARK.fullmatch(lines[i - 1].strip()) if i > 0 else None
        found.append(Block(page, i + 1, m.group(1), "\n".join(lines[i + 1:end]) + "\n",
                           mark and mark.group(1), mark and mark.group(2)))
        i = end + 1
    return found


ALL = [b for page in PAGES for b in blocks(page)]
RUN = [b for b in ALL if b.lang == "python" and b.mark is None]
RUN_PAGES = sorted({b.page for b in RUN})


def test_the_examples_are_found():
    """Guards the parser: if it stopped finding blocks, every other test here would pass on nothing."""
    assert len(RUN) >= 10
    assert {ROOT / "README.md", ROOT / "docs" / "getting-started.md", ROOT / "docs" / "tasks.md"} <= set(RUN_PAGES)
    assert [b.lang for b in ALL if b.page.name == "README.md"] == ["text", "sh", "sh", "python", "sh", "python"]


def test_every_fence_is_closed_and_every_block_says_its_language():
    for page in PAGES:
        fences = [n for n, line in enumerate(page.read_text().split("\n"), 1) if line.startswith("```")]
        assert len(fences) % 2 == 0, f"{page.name}: an unclosed fence"
    unnamed = [b.where() for b in ALL if not b.lang]
    assert not unnamed, f"blocks without a language (python, sh, text, json): {unnamed}"


def test_every_not_run_mark_gives_its_reason_and_sits_on_a_block():
    for page in PAGES:
        lines = page.read_text().split("\n")
        for n, line in enumerate(lines):
            m = MARK.search(line)
            if not m:
                continue
            where = f"{page.name}:{n + 1}"
            assert m.group(2), f"{where}: `<!-- {m.group(1)}: ... -->` needs its reason or path"
            assert n + 1 < len(lines) and lines[n + 1].startswith("```"), f"{where}: the mark must sit right above a block"


def test_file_blocks_are_the_files_the_suite_runs():
    files = [b for b in ALL if b.mark == "file"]
    assert files, "docs/testing.md shows the files of tests/unit/docs_example"
    for b in files:
        path = ROOT / b.mark_text
        assert path.is_file(), f"{b.where()}: {b.mark_text} does not exist"
        assert b.code == path.read_text(), f"{b.where()}: differs from {b.mark_text}"


@pytest.fixture
def page_sandbox(tmp_path, monkeypatch):
    """A page's examples register tasks, hooks and modules: each page starts from none and leaves none behind."""
    saved_tasks = dict(REGISTRY)
    saved_hooks = hooks.registered()
    saved_modules = set(sys.modules)
    REGISTRY.clear()
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for hook in hooks.registered():
        if hook not in saved_hooks:
            hooks.remove(hook)
    REGISTRY.clear()
    REGISTRY.update(saved_tasks)
    for name in set(sys.modules) - saved_modules:
        if str(tmp_path) in str(getattr(sys.modules[name], "__file__", "") or ""):
            del sys.modules[name]


@pytest.mark.parametrize("page", RUN_PAGES, ids=lambda p: p.name)
def test_the_python_examples_of_a_page_run(page, page_sandbox):
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    with worker(threads=0) as recorder:  # tasks register as the blocks run, so this one only records the sends
        for b in (b for b in RUN if b.page == page):
            module = MODULE.match(b.code)
            try:
                if module:
                    (page_sandbox / f"{module.group(1)}.py").write_text(b.code)
                    importlib.invalidate_caches()
                    sys.modules.pop(module.group(1), None)
                    importlib.import_module(module.group(1))
                else:
                    exec(compile(b.code, b.where(), "exec"), namespace)
            except Exception as exc:
                pytest.fail(f"the example at {b.where()} raised {exc!r}")
    sent = recorder.sent
    with worker(threads=0) as w:  # now every task the page defined is known: run what its examples sent
        for s in sent:
            REGISTRY[s.task].send_with_options(args=s.args, kwargs=s.kwargs, delay=s.delay)
        w.join()
    assert not w.dead_letters(), [(r.task, r.reason, r.error_message) for r in w.dead_letters()]
    assert len(w.succeeded()) >= len(sent)


def test_json_examples_parse():
    for b in (b for b in ALL if b.lang == "json"):
        json.loads(b.code)


def _command_lines() -> list[tuple[Block, str]]:
    found = []
    for b in ALL:
        for line in b.code.split("\n"):
            line = line.strip()
            if b.lang == "text" and not line.startswith("$ "):
                continue  # output, not commands
            line = line.removeprefix("$ ")
            if re.match(r"^(\.venv/bin/)?magne ", line):
                found.append((b, line))
    return found


def test_the_magne_commands_shown_parse():
    lines = _command_lines()
    assert len(lines) >= 8
    parser = build_parser()
    for each in _parsers(parser):  # the docs spell options out: `--thread` would parse, as an abbreviation
        each.allow_abbrev = False
        each.exit_on_error = False
    for b, line in lines:
        argv = shlex.split(line, comments=True)[1:]
        try:
            parser.parse_args(argv)
        except (SystemExit, argparse.ArgumentError) as exc:
            pytest.fail(f"{b.where()}: `{line}` does not parse ({exc})")


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [parser, *(q for s in subs for sp in s.choices.values() for q in _parsers(sp))]


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings if o.startswith("--")} - {"--help"}


def test_the_configuration_table_lists_every_worker_option():
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    options = _options(sub.choices["worker"]) | _options(parser)  # --log-level and --log-format come before `worker`
    table = (ROOT / "docs" / "configuration.md").read_text().split("| option |", 1)[1].split("\n\n", 1)[0]
    first_cells = [row.split("|")[1] for row in table.split("\n") if row.startswith("| `")]
    documented = {o for cell in first_cells for o in re.findall(r"`(--[a-z-]+)`", cell)}
    assert documented == options


def test_each_copy_of_the_test_command_is_the_one_ci_runs():
    ci = TEST_COMMAND.findall((ROOT / ".ci" / "run").read_text())
    assert len(ci) == 1
    copies = [(b.where(), line) for b in ALL if b.lang == "sh" for line in TEST_COMMAND.findall(b.code)]
    assert [w for w, _ in copies if w.startswith("README.md")], "the README shows the test command"
    assert all(line == ci[0] for _, line in copies), copies
    assert "mkdocs build --strict" in ci[0]


def test_the_readme_headline_figures_are_those_of_the_performance_page():
    readme = (ROOT / "README.md").read_text()
    headline = readme.split("<!-- headline:start -->", 1)[1].split("<!-- headline:end -->", 1)[0]
    performance = (ROOT / "docs" / "performance.md").read_text()
    figures = re.findall(r"\d[\d,]*(?:\.\d+)?(?=/s|x)", headline)
    assert len(figures) >= 12
    missing = [f for f in figures if f not in performance]
    assert not missing, f"README figures not in docs/performance.md: {missing}"


def test_the_site_home_opens_with_the_readme_introduction():
    """Two copies of the same paragraph and diagram (GitHub's front page, the site's): kept equal here."""
    def intro(text: str) -> str:
        return text.split("\n", 1)[1].split("\n## ", 1)[0].replace("](docs/", "](").strip()

    assert intro((ROOT / "docs" / "index.md").read_text()) == intro((ROOT / "README.md").read_text())


def _code_index() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Names each magne module defines at top level, and the names in each class body, read with ast (importing
    every module would start optional extras): enough to tell whether a name the docs cite still exists."""
    modules: dict[str, set[str]] = {}
    classes: dict[str, set[str]] = {}
    for path in (ROOT / "magne").rglob("*.py"):
        rel = path.relative_to(ROOT / "magne").with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        tree = ast.parse(path.read_text())
        top = modules.setdefault(name, set())
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                members = classes.setdefault(node.name, set())
                for item in ast.walk(node):
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                        members.add(item.name)
                    elif isinstance(item, ast.Attribute) and isinstance(item.value, ast.Name) and item.value.id == "self":
                        members.add(item.attr)
                    elif isinstance(item, ast.AnnAssign | ast.Assign):
                        for target in item.targets if isinstance(item, ast.Assign) else [item.target]:
                            if isinstance(target, ast.Name):
                                members.add(target.id)
            for sub in ast.walk(node) if not isinstance(node, ast.ClassDef) else [node]:
                if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    top.add(sub.name)
                elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                    top.add(sub.id)
                elif isinstance(sub, ast.alias):
                    top.add((sub.asname or sub.name).split(".")[0])
    return modules, classes


GENERATED = {"site/"}  # made by `mkdocs build`, not in the tree


def test_the_files_and_names_the_docs_cite_exist():
    """The thread map, the layout and the design notes name files (`io/loop.py`), module names (`publisher._IOThread`,
    `timelimits.Slot`) and methods (`Pool.check`): when the code moves, this names the page to update."""
    modules, classes = _code_index()
    bases = [ROOT, ROOT / "magne", ROOT / "tests" / "unit" / "docs_example"]
    missing, checked = [], 0
    for page in PAGES:
        text = page.read_text()
        for tok in set(re.findall(r"`([\w./-]+\.py|[\w-]+/(?:[\w-]+/)*)`", text)):
            if tok in GENERATED:
                continue
            checked += 1
            if not any((base / tok).exists() for base in bases):
                missing.append(f"{page.name}: file {tok}")
        for tok in set(re.findall(r"`((?:magne\.)?[A-Za-z_]\w*(?:/\w+)*(?:\.\w+)+)`", text)):
            parts = tok.removeprefix("magne.").replace("/", ".").split(".")
            if parts[-1] in {"py", "md", "json", "png"}:
                continue
            # the longest prefix that is a magne module, then a name in it; or a class and one of its members
            cut = next((i for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in modules), 0)
            if cut and cut < len(parts):
                checked += 1
                found = parts[cut] in modules[".".join(parts[:cut])] or ".".join(parts[:cut + 1]) in modules
                if not found:
                    missing.append(f"{page.name}: {tok}")
            elif not cut and parts[0] in classes and len(parts) == 2:
                checked += 1
                if parts[1] not in classes[parts[0]]:
                    missing.append(f"{page.name}: {tok}")
    assert checked >= 50
    assert not missing, f"the docs cite what the code no longer has: {missing}"
