"""The documentation runs: every Python block of the README and docs/, on this backend.

Each ``python`` block of README.md, CONTRIBUTING.md, benchmarks/README.md and
docs/ runs here, alone, on the backends it claims (see ``docs_blocks`` for the
convention). A block that raises fails its test; most blocks also assert what
the text around them says. Besides, the API reference names every public
object, the version is written once, and the package ships its license.
"""

import configparser
import dataclasses
import json
import os
import re
import select
import subprocess
import sys

import docs_blocks
import pytest
from conftest import BACKEND

import kerasbn

ROOT = docs_blocks.ROOT
ALL_BLOCKS = [
    block
    for page in docs_blocks.documentation_files()
    for block in docs_blocks.blocks(page)
]
# A block that cannot run in a test at all is an exception, not a habit.
MAX_SKIPPED = 3


class Worker:
    """A Python process that runs the blocks (``docs_blocks.serve``), started once.

    The blocks run there, not in the test process: what they change (Keras's
    global state, random generators, a framework's runtime such as
    TensorFlow's collective ops) cannot reach the tests after them.
    """

    TIMEOUT_S = 600

    def __init__(self, log):
        self.log = log
        self.process = None

    def _start(self):
        env = dict(os.environ, KERAS_BACKEND=BACKEND)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT), env.get("PYTHONPATH")])
        )
        self.process = subprocess.Popen(
            [sys.executable, docs_blocks.__file__, "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            text=True,
        )

    def run(self, block, cwd):
        """``None`` if the block ran, else its error."""
        if self.process is None or self.process.poll() is not None:
            self._start()
        request = {"name": f"{ROOT / block.path}:{block.line}", "code": block.code}
        self.process.stdin.write(json.dumps({**request, "cwd": str(cwd)}) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], self.TIMEOUT_S)
        line = self.process.stdout.readline() if ready else ""
        if not line:  # a hang or a crash: the next block gets a new worker
            self.close()
            return f"no answer from the worker within {self.TIMEOUT_S} s"
        answer = json.loads(line)
        return None if answer["ok"] else answer["error"]

    def close(self):
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    with open(tmp_path_factory.mktemp("docs") / "worker.log", "w") as log:
        running = Worker(log)
        yield running
        running.close()


@pytest.mark.parametrize(
    "block",
    [block for block in ALL_BLOCKS if BACKEND in block.backends],
    ids=lambda block: block.name,
)
def test_code_block_runs(block, worker, tmp_path):
    if block.skip:
        pytest.skip(f"{block.name}: {block.skip}")
    if block.process:
        _run_in_a_fresh_process(block, tmp_path)
        return
    error = worker.run(block, tmp_path)
    assert error is None, f"{block.name} failed:\n{error}"


def _run_in_a_fresh_process(block, cwd):
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), env.get("PYTHONPATH")])
    )
    done = subprocess.run(
        [sys.executable, "-c", block.code],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{block.name} failed:\n{done.stderr[-3000:]}"


def test_every_page_follows_the_block_convention():
    # docs_blocks raises ConventionError at collection for a malformed page;
    # here: there are blocks, each backend runs some, and skips stay rare.
    assert len(ALL_BLOCKS) >= 10
    for backend in docs_blocks.BACKENDS:
        assert any(backend in block.backends and not block.skip for block in ALL_BLOCKS)
    skipped = [f"{block.name}: {block.skip}" for block in ALL_BLOCKS if block.skip]
    assert len(skipped) <= MAX_SKIPPED, skipped


@pytest.mark.parametrize(
    "page, error",
    [
        ("<!-- docs-test: backends tensorflow -->\n```bash\nls\n```\n", "right before"),
        ("<!-- docs-test: backends theano -->\n```python\npass\n```\n", "one or more"),
        ("<!-- docs-test: skip -->\n```python\npass\n```\n", "needs a reason"),
        ("<!-- docs-test: run twice -->\n```python\npass\n```\n", "unknown marker"),
        ("<!-- docs-test: backends jax twice -->\n```python\npass\n```\n", "one or"),
        ("<!-- docs-test: process process -->\n```python\npass\n```\n", "unknown"),
        ("```py\npass\n```\n", "write `python`"),
        (
            "<!-- docs-test: backends jax -->\n\nSome text.\n```python\npass\n```\n",
            "before",
        ),
        ("text\n<!-- docs-test: backends jax -->\n", "no block after it"),
    ],
)
def test_a_malformed_page_is_refused_with_the_line(page, error, tmp_path, monkeypatch):
    monkeypatch.setattr(docs_blocks, "ROOT", tmp_path)
    path = tmp_path / "page.md"
    path.write_text(page)
    with pytest.raises(docs_blocks.ConventionError, match=error) as raised:
        docs_blocks.blocks(path)
    assert "page.md:" in str(raised.value)


def test_markers_set_backends_and_skips(tmp_path, monkeypatch):
    monkeypatch.setattr(docs_blocks, "ROOT", tmp_path)
    path = tmp_path / "page.md"
    path.write_text(
        "# Title\n\n## Start\n\n```python\na = 1\n```\n\n- item\n\n"
        "    <!-- docs-test: backends jax torch -->\n    ```python\n    b = 2\n    ```\n\n"
        "<!-- docs-test: skip because it needs two machines -->\n```python\nc = 3\n```\n"
        "```bash\necho not python\n```\n"
        "<!-- docs-test: process backends torch -->\n```python\nd = 4\n```\n"
    )
    found = docs_blocks.blocks(path)
    assert [(b.line, b.code, b.backends, b.skip, b.process) for b in found] == [
        (5, "a = 1\n", docs_blocks.BACKENDS, None, False),
        (12, "b = 2\n", ("jax", "torch"), None, False),
        (17, "c = 3\n", docs_blocks.BACKENDS, "because it needs two machines", False),
        (24, "d = 4\n", ("torch",), None, True),
    ]
    assert {b.section for b in found} == {"Start"}


def test_the_readme_quick_start_is_one_block_for_every_backend():
    quick = [block for block in ALL_BLOCKS if block.path == "README.md"]
    quick = [block for block in quick if block.section == "Quick start"]
    assert len(quick) == 1 and quick[0].backends == docs_blocks.BACKENDS
    assert quick[0].skip is None


def test_the_readme_stays_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 160, f"README.md has {len(lines)} lines; move detail to docs/"


def _reference_entries() -> set[str]:
    entries = set()
    for page in (ROOT / "docs/reference").glob("*.md"):
        entries |= set(re.findall(r"^::: (kerasbn\.[\w.]+)", page.read_text(), re.M))
    return entries


def test_every_public_name_has_an_api_reference_entry():
    entries = _reference_entries()
    missing = [
        f"::: kerasbn.{name}"
        for name in kerasbn.__all__
        if f"kerasbn.{name}" not in entries
    ]
    assert not missing, f"add to a page of docs/reference/: {missing}"


def test_every_api_reference_entry_exists():
    for entry in _reference_entries():
        target = kerasbn
        for part in entry.split(".")[1:]:
            target = getattr(target, part)  # AttributeError names a stale entry


def test_the_version_is_written_once():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert setup["metadata"]["version"] == "attr: kerasbn._version.__version__"
    literals = re.findall(
        r"__version__ = ['\"](.+)['\"]", (ROOT / "kerasbn/_version.py").read_text()
    )
    assert literals == [kerasbn.__version__]
    assert re.fullmatch(r"\d+\.\d+\.\d+", kerasbn.__version__)
    for path in (ROOT / "kerasbn").rglob("*.py"):
        if path.name != "_version.py":
            assert not re.search(r"__version__ = ['\"]", path.read_text()), path


def test_the_changelog_has_a_section_for_this_version():
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", changelog, re.M)
    assert releases and releases[0] == kerasbn.__version__, releases


def test_the_package_ships_the_apache_license_and_its_type_hints():
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert (
        "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    )
    assert "END OF TERMS AND CONDITIONS" in license_text
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert setup["metadata"]["license_expression"] == "Apache-2.0"
    assert setup["metadata"]["license_files"] == "LICENSE"
    assert (ROOT / "kerasbn/py.typed").exists()
    assert setup["options.package_data"]["kerasbn"] == "py.typed"


def _slug(heading: str) -> str:
    """A heading's anchor, as GitHub and MkDocs make it for these pages."""
    heading = re.sub(r"[`*_~]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


@pytest.mark.parametrize("page", ["README.md", "CONTRIBUTING.md", "CHANGELOG.md"])
def test_links_of_the_top_level_pages_resolve(page):
    # MkDocs checks the links of docs/ (mkdocs build --strict); these pages are
    # read on the repository's site and on PyPI, outside it.
    text = (ROOT / page).read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (ROOT / page).parent / path if path else ROOT / page
        assert file.exists(), f"{page} links to {target}: no such file"
        if anchor:
            headings = re.findall(r"^#{1,6}\s+(.*)$", file.read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, f"{page}: {target}"


def test_a_failing_block_fails_its_test_in_either_process(worker, tmp_path):
    code = "print('out')\nraise ValueError('broken')\n"
    block = docs_blocks.Block("page.md", 3, "", code, docs_blocks.BACKENDS, None, True)
    with pytest.raises(AssertionError, match="ValueError: broken"):
        _run_in_a_fresh_process(block, tmp_path)
    assert "ValueError: broken" in worker.run(block, tmp_path)
    assert worker.run(dataclasses.replace(block, code="x = 1\n"), tmp_path) is None
