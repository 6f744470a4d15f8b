"""README.md and docs/*.md against the repository: links and anchors resolve, named files exist, commands name real
scripts, benchmarks and flags, docs/layout.md mirrors the package's own table, and the README stays a front page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 150

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")  # [text](target), not images
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
REPO_FILE = re.compile(r"^[\w./-]+\.(py|ipynb|toml|md)$")  # a backticked name of a file kept in the repository
SCRIPT_CALL = re.compile(r"(?:^|\s)(?:python\s+|\S*/)?([\w/]+\.py)\b(.*)$")
MODULE_CALL = re.compile(r"python\s+-m\s+([\w.]+)(.*)$")
FLAG = re.compile(r"(?<![\w-])--([a-z][\w-]*)")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def split_code(text: str) -> tuple[list[str], list[str]]:
    """(prose lines, lines inside fenced code blocks)."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif fenced:
            code.append(line)
        else:
            prose.append(line)
    return prose, code


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: rendered text, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"(?<!\w)_+|_+(?!\w)", "", text)  # _emphasis_ markers, not snake_case
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in split_code(path.read_text(encoding="utf-8"))[0]:
        m = HEADING.match(line)
        if m:
            slug = github_slug(m.group(2))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(path: Path) -> list[str]:
    """Every relative link of a Markdown file whose file or #anchor does not exist, as 'file: target (why)'."""
    problems = []
    for line in split_code(path.read_text(encoding="utf-8"))[0]:
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                problems.append(f"{path.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{path.name}: {target} (no heading with that anchor)")
    return problems


def missing_files(path: Path) -> list[str]:
    """Backticked repository file names (`gpt2repro/data.py`, `play.ipynb`) that do not exist."""
    prose, code = split_code(path.read_text(encoding="utf-8"))
    names = {n for line in prose for n in re.findall(r"`([^`\s]+)`", line) if REPO_FILE.match(n)}
    return sorted(f"{path.name}: {n}" for n in names if not (ROOT / n).exists())


def flag_defined(flag: str, script: Path) -> bool:
    """A flag is a literal "--flag" of the script, or (train_gpt2.py) a TrainConfig field or option of config.py."""
    sources = [script.read_text(encoding="utf-8")]
    if script.name == "train_gpt2.py":
        sources.append((ROOT / "gpt2repro" / "config.py").read_text(encoding="utf-8"))
    name = re.escape(flag)
    return any(re.search(rf"[\"']--{name}[\"']|^\s+{name}: ", s, re.M) for s in sources)


def bad_commands(path: Path) -> list[str]:
    """Commands in code blocks that name a missing script, benchmark or make target, or a flag the script lacks."""
    problems = []
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for line in split_code(path.read_text(encoding="utf-8"))[1]:
        line = line.split("  #")[0].split(" # ")[0]  # the comment, not the command
        if m := re.match(r"^\s*make\s+(\w+)", line):
            if not re.search(rf"^{m.group(1)}:", makefile, re.M):
                problems.append(f"{path.name}: make {m.group(1)} (no such target)")
        if m := MODULE_CALL.search(line):
            module, rest = m.groups()
            parts = module.split(".")
            if parts[0] == "bench":
                names = parts[1:] or [w for w in rest.split() if not w.startswith("-")]
                for name in names:
                    if not (ROOT / "bench" / f"{name}.py").exists():
                        problems.append(f"{path.name}: python -m {module} {name} (no bench/{name}.py)")
                script = ROOT / "bench" / f"{names[0]}.py" if len(names) == 1 else None
                for flag in FLAG.findall(rest):
                    ok = flag == "quick" or (script is not None and script.exists() and flag_defined(flag, script))
                    if not ok:
                        problems.append(f"{path.name}: python -m {module} --{flag} (no such flag)")
            continue
        if m := SCRIPT_CALL.search(line):
            script = ROOT / m.group(1)
            if not script.exists():
                problems.append(f"{path.name}: {m.group(1)} (no such script)")
                continue
            problems += [f"{path.name}: {script.name} --{f} (no such flag)" for f in FLAG.findall(m.group(2))
                         if not flag_defined(f, script)]
    return problems


def package_table() -> dict[str, str]:
    """The module table of gpt2repro/__init__.py's docstring: {module: what it owns}."""
    import ast

    doc = ast.get_docstring(ast.parse((ROOT / "gpt2repro" / "__init__.py").read_text(encoding="utf-8")))
    return dict(re.findall(r"^\| `(\w+)` \| (.*?) \|$", doc, re.M))


# ----------------------------------------------------------------------------- the checkers themselves


def test_checkers_find_broken_links_anchors_files_and_commands(tmp_path):
    (tmp_path / "other.md").write_text("# The `--fast` path, and more!\n\n## Same\n\n## Same\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Top\n\n"
        "[ok](other.md) [ok](other.md#the---fast-path-and-more) [ok](other.md#same-1) [ok](#top) "
        "[web](https://example.com/x#y)\n"
        "[gone](missing.md) [bad anchor](other.md#nope) [bad local](#bottom) [dup](other.md#same-2)\n"
        "`[in code](missing-too.md)` `gpt2repro/data.py` `gpt2repro/nonexistent.py`\n"
        "```bash\n[fenced](also-missing.md)\n# not a heading\n"
        "python train_gpt2.py --max_steps 5 --no_such_flag 1   # --also_not_checked\n"
        "python nope.py\npython -m bench train --quick\npython -m bench nobench\nmake demo\nmake nothing\n```\n"
    )
    assert sorted(broken_links(page)) == sorted([
        "page.md: missing.md (no such file)",
        "page.md: other.md#nope (no heading with that anchor)",
        "page.md: #bottom (no heading with that anchor)",
        "page.md: other.md#same-2 (no heading with that anchor)",
    ])
    (tmp_path / "page.md").rename(tmp_path / "p.md")
    page = tmp_path / "p.md"
    assert missing_files(page) == ["p.md: gpt2repro/nonexistent.py"]
    assert sorted(bad_commands(page)) == sorted([
        "p.md: train_gpt2.py --no_such_flag (no such flag)",
        "p.md: nope.py (no such script)",
        "p.md: python -m bench nobench (no bench/nobench.py)",
        "p.md: make nothing (no such target)",
    ])


@pytest.mark.parametrize("heading, slug", [
    ("Training: `train_gpt2.py`", "training-train_gpt2py"),
    ("Later practice, and does it help? (EX4)", "later-practice-and-does-it-help-ex4"),
    ("**Bold** and [a link](x.md)", "bold-and-a-link"),
    ("Reliability: what is guaranteed", "reliability-what-is-guaranteed"),
])
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


# ----------------------------------------------------------------------------- the real documents


def test_readme_is_a_front_page():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move detail into docs/"


def test_docs_exist():
    assert len(doc_files()) > 1, "no docs/*.md"


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.name)
def test_links_resolve(path):
    assert broken_links(path) == []


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.name)
def test_named_files_exist(path):
    assert missing_files(path) == []


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.name)
def test_commands_name_real_scripts_and_flags(path):
    assert bad_commands(path) == []


def test_layout_mirrors_the_package():
    table = package_table()
    modules = {p.stem for p in (ROOT / "gpt2repro").glob("*.py") if p.stem != "__init__"}
    assert set(table) == modules, "gpt2repro/__init__.py's table and the package's modules differ"
    layout = (ROOT / "docs" / "layout.md").read_text(encoding="utf-8")
    for module, owns in table.items():
        assert f"| `gpt2repro/{module}.py` | {owns} |" in layout, f"docs/layout.md: row of gpt2repro/{module}.py"
    scripts = [p.name for p in ROOT.glob("*.py")] + [p.name for p in ROOT.glob("*.ipynb")]
    for name in scripts:
        assert f"`{name}`" in layout, f"docs/layout.md does not describe {name}"
