"""The documentation stays true: the commands it names exist, the Python it shows runs.

- Every ``c2f <subcommand>`` named in ``docs/cli.md`` (in inline code or at the start of a line
  in a code block) is a subcommand of the CLI parser, and ``c2f <subcommand> --help`` exits 0.
- Every fenced ```` ```python ```` block of ``README.md`` runs, each in a fresh namespace with a
  temporary directory as the working directory. A block is left out when the line just before
  its opening fence (blank lines aside) is the marker ``<!-- skip-test -->``, e.g. a snippet
  that needs a GPU or downloads weights::

      <!-- skip-test -->
      ```python
      model = C2FNet(ModelConfig(pretrained="imagenet", fast_kernels=True))
      ```
 Failures are reported with the block number (1-based, counting the Python
  blocks of the file) and the line of its fence.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CLI_DOC = ROOT / "docs" / "cli.md"

SKIP_MARKER = "<!-- skip-test -->"
#: Seconds one README block may run before it counts as failed (where SIGALRM is available).
BLOCK_TIMEOUT_S = 300

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")


# --------------------------------------------------------------------------- code-block machinery
@dataclass
class CodeBlock:
    """One fenced code block of a Markdown file."""

    number: int  # 1-based among the blocks returned (e.g. among the Python blocks)
    line: int  # 1-based line of the opening fence
    lang: str  # info string's first word, lower case ("" when none)
    code: str
    skip: bool  # the line before the fence is SKIP_MARKER


def code_blocks(markdown: str, lang: str | None = None) -> list[CodeBlock]:
    """Fenced code blocks of ``markdown`` (of language ``lang`` only, when given), in order.

    Handles ``` and ~~~ fences (a block closes with a fence of the same character, at least as
    long), strips the opening fence's indentation from the block's lines, and marks a block
    ``skip`` when the non-blank line just before its fence is :data:`SKIP_MARKER`.
    """
    lines = markdown.splitlines()
    blocks: list[CodeBlock] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m.group("fence"), len(m.group("indent"))
        info = m.group("info").lower()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines):
            close = re.match(r"^\s*(`{3,}|~{3,})\s*$", lines[i])
            if close and close.group(1)[0] == fence[0] and len(close.group(1)) >= len(fence):
                break
            text = lines[i]
            body.append(text[indent:] if text[:indent].strip() == "" else text.lstrip())
            i += 1
        i += 1  # past the closing fence (or the end of the file)
        prev = start - 1
        while prev >= 0 and not lines[prev].strip():
            prev -= 1
        skip = prev >= 0 and lines[prev].strip() == SKIP_MARKER
        if lang is None or info == lang:
            blocks.append(CodeBlock(len(blocks) + 1, start + 1, info, "\n".join(body) + "\n", skip))
    return blocks


@contextlib.contextmanager
def _time_limit(seconds: int):
    """Raise TimeoutError in the block after ``seconds`` (main thread with SIGALRM only)."""
    usable = hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    if not usable or seconds <= 0:
        yield
        return

    def _alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_blocks(blocks: list[CodeBlock], source: str = "README.md", timeout_s: int = BLOCK_TIMEOUT_S) -> list[str]:
    """Execute every non-skipped block in its own fresh namespace, in the current directory.

    Returns one message per failing block, ``"block N (line L): <error type>: <message>"`` followed
    by the traceback lines that point into the block; an empty list when all ran.
    """
    failures: list[str] = []
    for block in blocks:
        if block.skip:
            continue
        filename = f"<{source} python block {block.number}, line {block.line}>"
        namespace = {"__name__": f"__doc_block_{block.number}__", "__builtins__": __builtins__}
        try:
            code = compile(block.code, filename, "exec")
            with _time_limit(timeout_s):
                exec(code, namespace)  # noqa: S102 -- running the documentation is the point
        except BaseException as exc:  # noqa: BLE001 -- SystemExit from a snippet is a failure too
            if isinstance(exc, KeyboardInterrupt):
                raise
            # linecache does not know the block's pseudo file name: take the lines from the block
            source_lines = block.code.splitlines()
            frames = [
                f"    {filename}:{fs.lineno}: {source_lines[fs.lineno - 1].strip()}"
                for fs in traceback.extract_tb(exc.__traceback__)
                if fs.filename == filename and fs.lineno and 0 < fs.lineno <= len(source_lines)
            ]
            head = f"block {block.number} (line {block.line}): {type(exc).__name__}: {exc}"
            failures.append("\n".join([head, *frames]))
    return failures


# --------------------------------------------------------------------------- CLI machinery
def cli_commands_in(markdown: str) -> list[str]:
    """Subcommand names of every ``c2f <sub>`` in inline code or starting a code-block line
    (an optional ``$`` prompt allowed); options such as ``c2f --help`` are not subcommands."""
    found: list[str] = []
    candidates = re.findall(r"(?<!`)`([^`\n]+)`(?!`)", markdown)
    for block in code_blocks(markdown):
        candidates += block.code.splitlines()
    for text in candidates:
        m = re.match(r"^\s*(?:\$\s+)?c2f\s+(\S+)", text)
        if m and not m.group(1).startswith("-") and m.group(1) not in found:
            found.append(m.group(1))
    return found


def cli_subcommands() -> list[str]:
    from c2f_fast.cli import build_parser

    parser = build_parser()
    names: list[str] = []
    for action in parser._actions:  # argparse exposes subparsers only through its actions
        if isinstance(action, argparse._SubParsersAction):
            names += list(action.choices)
    return names


# --------------------------------------------------------------------------- tests
def test_cli_commands_in_docs_exist() -> None:
    if not CLI_DOC.is_file():
        pytest.skip("docs/cli.md does not exist yet")
    named = cli_commands_in(CLI_DOC.read_text(encoding="utf-8"))
    assert named, "docs/cli.md names no `c2f <subcommand>`"
    known = cli_subcommands()
    missing = [name for name in named if name not in known]
    assert not missing, f"docs/cli.md names subcommands the CLI does not have: {missing} (it has {known})"

    from c2f_fast.cli import main

    for name in named:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code in (0, None), f"`c2f {name} --help` exited with {exit_info.value.code}"


def test_cli_command_extraction() -> None:
    doc = (
        "Run `c2f info` first, then `c2f synth DIR`; `c2f --help` lists all.\n\n"
        "```bash\n$ c2f train --config x.toml\nc2f info\npython -m c2f_fast\n```\n"
        "Not a command: `the c2f package`.\n"
    )
    assert cli_commands_in(doc) == ["info", "synth", "train"]
    assert {"info", "synth"} <= set(cli_subcommands())


_SAMPLE = f"""# Sample

```python
from pathlib import Path
Path("ran.txt").write_text("yes")
x = 1
```

Not Python:

```bash
exit 1
```

{SKIP_MARKER}
```python
raise RuntimeError("a skipped block must not run")
```

   ```python
   print(x)  # each block has a fresh namespace: x is undefined here
   ```
"""


def test_code_block_machinery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = code_blocks(_SAMPLE, "python")
    assert [(b.number, b.skip) for b in blocks] == [(1, False), (2, True), (3, False)]
    assert blocks[2].code == "print(x)  # each block has a fresh namespace: x is undefined here\n"
    assert [b.lang for b in code_blocks(_SAMPLE)] == ["python", "bash", "python", "python"]

    monkeypatch.chdir(tmp_path)
    failures = run_blocks(blocks, source="sample.md")
    assert (tmp_path / "ran.txt").read_text() == "yes"  # block 1 ran, in the temporary directory
    assert len(failures) == 1, failures  # block 2 skipped, block 3 failed
    assert failures[0].startswith(f"block 3 (line {blocks[2].line}): NameError"), failures[0]
    assert "print(x)" in failures[0]


def test_readme_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = code_blocks(README.read_text(encoding="utf-8"), "python")
    if not blocks:
        pytest.skip("README.md has no python code block")
    monkeypatch.chdir(tmp_path)
    failures = run_blocks(blocks)
    assert not failures, "README.md python blocks fail:\n" + "\n".join(failures)
