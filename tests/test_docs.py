"""The documentation tells the truth about the tree: the Layout block in docs/layout.md names every
module under src/dgqtool and nothing that does not exist; the README's set-up commands are Makefile
targets and `make demo` runs what the README says; every `dgq` command line in the README uses
commands and options the CLI has; relative links in README.md and docs/ resolve."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
LAYOUT = REPO / "docs" / "layout.md"
PACKAGE = REPO / "src" / "dgqtool"
INDENT = 2


def fenced_blocks(text: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)


def section(text: str, heading: str) -> str:
    """The body of the `## heading` section (up to the next heading of level 1 or 2)."""
    match = re.search(rf"^## {re.escape(heading)}\s*\n(.*?)(?=^#{{1,2}} |\Z)", text, flags=re.S | re.M)
    assert match, f"README has no '## {heading}' section"
    return match.group(1)


# ------------------------------------------------------------------------------------ Layout
def layout_entries(block: str) -> list[str]:
    """Paths named by a tree block: one entry per line, `name  description`, two spaces of indent
    per level, directories end with '/'."""
    paths, stack = [], []
    for number, line in enumerate(block.splitlines(), 1):
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        assert indent % INDENT == 0, f"layout line {number}: indent {indent} is not a multiple of {INDENT}: {line!r}"
        depth = indent // INDENT
        assert depth <= len(stack), f"layout line {number}: deeper than its parent: {line!r}"
        del stack[depth:]
        name = line.split()[0]
        path = "".join(stack) + name
        paths.append(path)
        if name.endswith("/"):
            stack.append(name)
    return paths


def test_layout_block_parses():
    blocks = fenced_blocks(LAYOUT.read_text())
    assert len(blocks) == 1, "docs/layout.md should hold exactly one fenced block: the tree"
    entries = layout_entries(blocks[0])
    assert "src/dgqtool/" in entries


def test_layout_names_only_paths_that_exist():
    missing = [p for p in layout_entries(fenced_blocks(LAYOUT.read_text())[0])
               if not (REPO / p).exists() or (p.endswith("/") and not (REPO / p).is_dir())]
    assert not missing, f"docs/layout.md names paths that do not exist: {missing}"


def package_modules() -> set[str]:
    """Every Python module under src/dgqtool, as a repository path (caches aside, and __init__.py
    files that hold nothing but a docstring)."""
    modules = set()
    for path in PACKAGE.rglob("*.py"):
        if "__pycache__" in path.parts:
            continue
        if path.name == "__init__.py" and not _has_code(path):
            continue
        modules.add(path.relative_to(REPO).as_posix())
    return modules


def _has_code(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return bool(body)


def test_layout_names_every_module():
    named = set(layout_entries(fenced_blocks(LAYOUT.read_text())[0]))
    omitted = sorted(package_modules() - named)
    assert not omitted, f"docs/layout.md omits these modules (add a line for each): {omitted}"


def test_layout_checker_catches_staleness():
    """The parser sees a moved module as missing and a new one as omitted."""
    entries = layout_entries("src/dgqtool/\n  a.py  x\n  sub/\n    b.py  y\n  c.py  z\nkernels/\n  k.cu  w\n")
    assert entries == ["src/dgqtool/", "src/dgqtool/a.py", "src/dgqtool/sub/", "src/dgqtool/sub/b.py",
                       "src/dgqtool/c.py", "kernels/", "kernels/k.cu"]
    with pytest.raises(AssertionError):
        layout_entries("src/dgqtool/\n      deep.py  skipped a level\n")


# ------------------------------------------------------------------------- README vs Makefile
def makefile() -> tuple[dict[str, list[str]], dict[str, str]]:
    """(target -> recipe lines, variable -> default) of the Makefile."""
    targets: dict[str, list[str]] = {}
    variables: dict[str, str] = {}
    current = None
    for line in (REPO / "Makefile").read_text().splitlines():
        if line.startswith("\t") and current is not None:
            targets[current].append(line.strip())
            continue
        current = None
        if m := re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*[?:]?=\s*(.*)$", line):
            variables[m.group(1)] = m.group(2).strip()
        elif m := re.match(r"^([A-Za-z0-9_.$()/-]+)\s*:(?!=)", line):
            if not m.group(1).startswith("."):
                current = m.group(1)
                targets[current] = []
    return targets, variables


def expand(text: str, variables: dict[str, str]) -> str:
    for _ in range(5):
        text = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), text)
    return text


def test_readme_setup_commands_are_the_makefile_targets():
    targets, _ = makefile()
    blocks = fenced_blocks(section(README.read_text(), "Set up"))
    assert blocks, "the README's Set up section has no command block"
    commands = [line.split("#")[0].strip() for line in blocks[0].splitlines() if line.strip()]
    assert commands == ["make demo", "make test"], commands
    assert any("dgq quantize" in line for line in targets["demo"]), "make demo no longer quantizes"
    assert any("pytest" in line for line in targets["test"]), "make test no longer runs pytest"


def test_readme_quotes_what_make_demo_runs():
    targets, variables = makefile()
    setup = section(README.read_text(), "Set up")
    (recipe,) = [line for line in targets["demo"] if "dgq quantize" in line]
    env, _, command = recipe.partition(" ")
    command = expand(command, variables | {"BIN": ""}).lstrip("/")
    assert f"`{command}`" in " ".join(setup.split()), f"the README should quote `{command}`"
    name, _, value = env.partition("=")
    default = re.sub(r"\$\(abspath ([^)]*)\)", r"\1", expand(value, variables))
    assert f"`{name}={default}`" in setup, f"the README should say `{name}={default}`"


def test_every_make_command_in_the_readme_exists():
    targets, variables = makefile()
    for match in re.finditer(r"\bmake ((?:[A-Z]+=\S+ )*)([a-z][\w-]*)((?: [A-Z]+=[^\s`]+)*)", README.read_text()):
        assert match.group(2) in targets, f"README: `make {match.group(2)}` is not a Makefile target"
        for assignment in (match.group(1) + match.group(3)).split():
            assert assignment.split("=")[0] in variables, f"README: {assignment} is not a Makefile variable"


# ------------------------------------------------------------------------------ README vs CLI
def readme_dgq_lines() -> list[str]:
    text = README.read_text()
    lines = [line for block in fenced_blocks(text) for line in block.splitlines() if line.startswith("dgq ")]
    lines += [span for span in re.findall(r"`([^`\n]+)`", text) if span.startswith("dgq ")]
    lines = [re.sub(r'"[^"]*"', "", line.split(" #")[0]) for line in lines]
    return [part if part.startswith("dgq ") else "dgq " + part for line in lines for part in line.split(" | dgq ")]


def test_readme_commands_and_options_exist():
    typer = pytest.importorskip("typer")
    from dgqtool.cli import app

    root = typer.main.get_command(app)

    def options(command) -> set[str]:
        return {opt for p in command.params for opt in (*p.opts, *p.secondary_opts) if opt.startswith("-")}

    global_opts = options(root) | {"--help"}
    lines = readme_dgq_lines()
    assert len(lines) > 10
    for line in lines:
        allowed, command = set(global_opts), root
        for word in line.split()[1:]:  # descend `dgq [GLOBAL] COMMAND [SUBCOMMAND]`
            if word.startswith("-") or not hasattr(command, "commands"):
                continue
            if word.isupper() or not re.fullmatch(r"[a-z][a-z-]*", word):  # COMMAND, MODEL, ...
                break
            assert word in command.commands, f"README: `{word}` is not a dgq command ({line})"
            command = command.commands[word]
            allowed |= options(command)
        used = re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", line)
        unknown = [opt for opt in used if opt not in allowed]
        assert not unknown, f"README: {unknown} not accepted by `{line.strip()}`"


def test_readme_prose_options_exist():
    """Every `--option` the README's text names is an option of some dgq command."""
    typer = pytest.importorskip("typer")
    from dgqtool.cli import app

    root = typer.main.get_command(app)
    known = {opt for command in (root, *root.commands.values()) for p in command.params
             for opt in (*p.opts, *p.secondary_opts)}
    text = re.sub(r"^```.*?^```", "", README.read_text(), flags=re.S | re.M)
    named = set(re.findall(r"`(--[a-z][a-z0-9-]*)", text))
    assert not named - known, f"README names options no command has: {sorted(named - known)}"


# ------------------------------------------------------------------------------------- links
def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@pytest.mark.parametrize("page", [README, *sorted((REPO / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        assert path.exists(), f"{page.name}: link to missing {target}"
        if anchor and path.suffix == ".md":
            anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)}
            assert anchor in anchors, f"{page.name}: no heading for #{anchor} in {path.name}"
