"""Every code example of the docs runs, so the docs cannot rot.

The ```sh and ```python blocks of README.md, docs/getting-started.md and docs/guide/*.md run in page order,
each page in a fresh folder of its own (its cwd), against the bundled starcoder2-nano: sh blocks
as bash scripts (``set -eo pipefail``) with this venv's ``starlift`` first on PATH, python blocks
in one interpreter per page (this venv's python) that keeps its variables from block to block, as
a reader running the page would. Performance pages are not run (they quote measurements).

Opting a block out: the line right before its opening fence (blank lines allowed between) is
``<!-- skip-test: reason -->``, for what cannot run here (TensorRT, a Ray cluster, llama.cpp
builds, the set-up commands, long benchmarks). The reason is required.

Budget: pages repeat the same set-up (export the nano model, quantize it). A command line
``starlift export ...`` or ``starlift quantize ...`` that the parser reads to the same arguments
(the output folder aside) on the same input as one an earlier page ran gets a copy of that
output instead of a second run; the ort-flavour export the rest of the suite uses
(conftest's ``nano_ort``) seeds it. Signing commands always run.

A failure names the page, the block's line, the command that failed and its output.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # the slow tier: `make test-slow` (CI runs both)

DOCS = REPO / "docs"
RUN_LANGS = {"sh": "sh", "bash": "sh", "shell": "sh", "python": "python", "py": "python"}
SKIP = re.compile(r"^<!--\s*skip-test:\s*(.*?)\s*-->$")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
BLOCK_TIMEOUT = 300  # seconds, per block


def pages() -> list[Path]:
    """The pages whose examples run: the README, getting started, then the how-to guides."""
    found = [REPO / "README.md", DOCS / "getting-started.md", *sorted((DOCS / "guide").glob("*.md"))]
    return [p for p in found if p.is_file()]


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str  # "sh" or "python", or the fence's own word for blocks that do not run
    code: str
    skip: str | None  # the skip-test reason, if any

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def extract(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, with their skip-test markers."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, word = m.group(1), m.group(2), m.group(3).lower()
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        marker = SKIP.match(lines[j].strip()) if j >= 0 else None
        blocks.append(Block(page, start + 1, RUN_LANGS.get(word, word), "\n".join(body) + "\n",
                            marker.group(1) if marker else None))
    return blocks


# --- the copy-instead-of-rerun memo for exports and quantizations ------------------------------

def _memo_key(command: str, cwd: Path) -> tuple[str, Path] | None:
    """(key, output folder) for a plain ``starlift export|quantize`` line, else None."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        return None
    if len(words) < 2 or words[0] != "starlift" or words[1] not in ("export", "quantize"):
        return None
    if any(w in ("&&", "||", ";", "|", ">", "<", "&") or "$" in w for w in words):
        return None
    from starlift.cli import build_parser

    try:
        args = vars(build_parser().parse_args(words[1:]))
    except SystemExit:
        return None
    if args.get("sign_key"):
        return None  # a key made on this page: always run
    out = Path(args.pop("out"))
    for k in ("force", "no_progress", "_module", "debug"):
        args.pop(k, None)
    source = cwd / (args.get("artifact") or args.get("checkpoint"))
    for name in ("manifest.json", "config.json"):  # what the output depends on: the input's identity
        if (source / name).is_file():
            args["source_sha256"] = hashlib.sha256((source / name).read_bytes()).hexdigest()
            break
    return json.dumps(args, sort_keys=True, default=str), out


def _logical_lines(code: str) -> list[str]:
    lines, current = [], ""
    for raw in code.splitlines():
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        lines.append(current + raw)
        current = ""
    if current:
        lines.append(current)
    return lines


class Workspace:
    """A folder per page, and the memo of exports/quantizations shared by all pages."""

    def __init__(self, root: Path):
        self.root = root
        self.memo: dict[str, Path] = {}
        self.home = root / "home"
        self.home.mkdir()
        venv_bin = Path(sys.executable).parent
        self.env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "HOME": str(self.home),
                    "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}

    def page_dir(self, page: Path) -> Path:
        d = self.root / "pages" / page.relative_to(REPO).with_suffix("").as_posix().replace("/", "-")
        d.mkdir(parents=True)
        return d

    def prepare_sh(self, code: str, cwd: Path) -> tuple[str, list[tuple[str, Path]]]:
        """The script to run: memoized lines become a copy of the earlier output. Returns the
        script and the (key, output) pairs to remember if it succeeds."""
        out_lines, remember = [], []
        for line in _logical_lines(code):
            found = _memo_key(line.strip(), cwd) if line.strip().startswith("starlift ") else None
            if found is None:
                out_lines.append(line)
                continue
            key, out = found
            if key in self.memo and not (cwd / out).exists():
                (cwd / out).parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(self.memo[key], cwd / out, symlinks=True)
                out_lines.append(f": {shlex.quote(line.strip())}  # the same run as an earlier page's: copied")
            else:
                out_lines.append(line)
                remember.append((key, cwd / out))
        return "\n".join(out_lines) + "\n", remember


@pytest.fixture(scope="session")
def workspace(tmp_path_factory, nano_ort) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("docs"))
    found = _memo_key("starlift export starcoder2-nano out/ort --flavour ort", ws.root)
    ws.memo[found[0]] = nano_ort  # conftest's export, the same call
    return ws


# --- running one page -----------------------------------------------------------------------

# One interpreter per page: reads a JSON request per stdin line, runs the block in a namespace
# kept between blocks, and answers on stdout after a marker (a block may print anything).
DRIVER = textwrap.dedent('''
    import json, sys, traceback
    namespace = {"__name__": "__main__"}
    for request in sys.stdin:
        r = json.loads(request)
        ok = True
        try:
            source = "\\n" * r["first_line"] + r["code"]  # tracebacks give the page's own line numbers
            exec(compile(source, r["where"], "exec"), namespace)
        except BaseException:
            ok = False
            traceback.print_exc()
        sys.stdout.flush(); sys.stderr.flush()
        print("\\x00starlift-docs-block " + json.dumps({"ok": ok}), flush=True)
''')


class PythonSession:
    def __init__(self, cwd: Path, env: dict):
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=cwd, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def run(self, block: Block) -> tuple[bool, str]:
        timer = threading.Timer(BLOCK_TIMEOUT, self.proc.kill)
        timer.start()
        try:
            self.proc.stdin.write(json.dumps({"code": block.code, "first_line": block.line,
                                              "where": str(block.page.relative_to(REPO))}) + "\n")
            self.proc.stdin.flush()
            output = []
            for line in self.proc.stdout:
                if line.startswith("\x00starlift-docs-block "):
                    return json.loads(line.split(" ", 1)[1])["ok"], "".join(output)
                output.append(line)
            return False, "".join(output) + f"\n(the interpreter ended, exit {self.proc.wait()}; "\
                f"killed after {BLOCK_TIMEOUT} s?)"
        finally:
            timer.cancel()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


SH_PRELUDE = "set -eo pipefail\ntrap 'echo \"FAILED: $BASH_COMMAND (exit $?)\" >&2' ERR\n"


def run_sh(block: Block, ws: Workspace, cwd: Path) -> tuple[bool, str]:
    script, remember = ws.prepare_sh(block.code, cwd)
    try:
        proc = subprocess.run(["bash", "-c", SH_PRELUDE + script], cwd=cwd, env=ws.env, capture_output=True,
                              text=True, timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        return False, f"{e.stdout or ''}{e.stderr or ''}\n(timed out after {BLOCK_TIMEOUT} s)"
    if proc.returncode == 0:
        for key, out in remember:
            if out.is_dir():
                ws.memo.setdefault(key, out)
    return proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_page_examples_run(page: Path, request):
    blocks = [b for b in extract(page) if b.lang in ("sh", "python") and b.skip is None]
    if not blocks:
        pytest.skip(f"{page.relative_to(REPO)} has no runnable sh/python block")
    workspace = request.getfixturevalue("workspace")  # only pages with examples pay for the nano export
    cwd = workspace.page_dir(page)
    session = None
    try:
        for block in blocks:
            if block.lang == "sh":
                ok, output = run_sh(block, workspace, cwd)
            else:
                session = session or PythonSession(cwd, workspace.env)
                ok, output = session.run(block)
            if not ok:
                pytest.fail(f"{block.where}: the ```{block.lang} block failed (run in {cwd})\n"
                            f"--- block\n{block.code}--- output\n{output[-6000:]}", pytrace=False)
    finally:
        if session is not None:
            session.close()


def test_skip_markers_give_a_reason():
    """An opt-out says why, and is spelled so that the extractor sees it (a misspelt marker would
    otherwise leave the block running, or a marker without a reason hide why it does not)."""
    problems = []
    for page in pages():
        for i, line in enumerate(page.read_text(encoding="utf-8").splitlines()):
            m = SKIP.match(line.strip())
            if "skip-test" in line and not (m and m.group(1)):
                problems.append(f"{page.relative_to(REPO)}:{i + 1}: not `<!-- skip-test: reason -->`: {line.strip()}")
    assert not problems, "\n".join(problems)


def test_extract_reads_markers_lines_and_indentation(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# t\n\n<!-- skip-test: needs a GPU -->\n\n```sh\nnvidia-smi\n```\n\n- item\n\n"
                    "    ```python\n    x = 1\n    ```\n\n```text\nout\n```\n")
    a, b, c = extract(page)
    assert (a.line, a.lang, a.code, a.skip) == (5, "sh", "nvidia-smi\n", "needs a GPU")
    assert (b.line, b.lang, b.code, b.skip) == (11, "python", "x = 1\n", None)
    assert (c.lang, c.skip) == ("text", None)
