"""Every reference in the documentation resolves inside a clone of the repository: the relative links of
README.md and docs/*.md (files and #anchors), the repository paths they name (`maskrcnn/...`, `configs/...`,
`tests/...`, bare `name.py` file names, `python -m` modules), and no text file points outside the project."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# What a clone does not hold (the environment, generated data and runs, caches)
NOT_IN_A_CLONE = {".git", ".venv", "runs", "datasets", "__pycache__", ".pytest_cache", ".whl", ".gl"}
# Folders of the repository whose paths the documentation names; a path under another folder (runs/, datasets/,
# .venv/, img/) is something a command writes
REPO_DIRS = ("maskrcnn", "configs", "tests", "docs", "assets", ".ci")


def repo_files() -> list[Path]:
    out = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if path.is_file() and not (set(rel.parts[:-1]) & NOT_IN_A_CLONE) and not any(
                p.endswith(".egg-info") for p in rel.parts):
            out.append(path)
    return out


def text_files() -> list[Path]:
    out = []
    for path in repo_files():
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        out.append(path)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(md: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)  # a '# comment' in a code block is no heading
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def links(md: Path) -> list[str]:
    """Targets of Markdown links and images: [text](target), ![alt](target)."""
    return re.findall(r"\]\(([^)\s]+)\)", md.read_text())


def path_references(md: Path) -> list[str]:
    """Repository paths named in the text (backticked or in code blocks): `maskrcnn/...`, `configs/x.yaml`, ..."""
    text = md.read_text()
    found = re.findall(r"(?<![\w/.<-])((?:%s)/[\w./-]*[\w/])" % "|".join(re.escape(d) for d in REPO_DIRS), text)
    return [p for p in found if "<" not in p]


def bare_python_files(md: Path) -> list[str]:
    """Backticked file names without a folder: `sampling.py`, `test_train.py`."""
    return re.findall(r"`([\w-]+\.py)`", md.read_text())


def modules(md: Path) -> list[str]:
    return re.findall(r"python -m (maskrcnn(?:\.\w+)+)", md.read_text())


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(md):
    bad = []
    for target in links(md):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (md.parent / file).resolve() if file else md
        if not dest.exists() or ROOT not in dest.parents and dest != ROOT:
            bad.append(f"{target}: no {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{md.name}: " + "; ".join(bad)


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_repository_paths_exist(md):
    names = {p.name for p in repo_files()}
    missing = [p for p in path_references(md) if not (ROOT / p).exists()]
    missing += [p for p in bare_python_files(md) if p not in names]
    missing += [m for m in modules(md) if not (ROOT / (m.replace(".", "/") + ".py")).is_file()]
    assert path_references(md) or md.name != "README.md"  # the README does name files: the scan works
    assert not missing, f"{md.name} names files this repository does not have: {sorted(set(missing))}"


# Written so that this file does not match them itself
OUTSIDE = [re.compile(r"\.\./" + "shared"), re.compile("shared" + r"/(DESIGN|STYLE|seeds)"),
           re.compile("DESIGN" + r"\.md"), re.compile(r"(?i)\bseeds? \d{3}\b")]


def test_no_file_points_outside_the_project():
    hits = []
    for path in text_files():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            hits += [f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}" for rx in OUTSIDE if rx.search(line)]
    assert not hits, "references outside the repository:\n" + "\n".join(hits)


def test_the_checks_can_fail(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("See [the notes](docs/nothing.md), `maskrcnn/model/nothing.py`, `nothing_here.py`, "
                  "`python -m maskrcnn.data.nothing`, and [a heading](#no-such-heading).\n# A heading: `x.py`\n")
    assert links(md) == ["docs/nothing.md", "#no-such-heading"]
    assert path_references(md) == ["docs/nothing.md", "maskrcnn/model/nothing.py"]
    assert bare_python_files(md) == ["nothing_here.py", "x.py"]
    assert modules(md) == ["maskrcnn.data.nothing"] and anchors(md) == {"a-heading-xpy"}
    assert slug("The weekly check-up: `visualize.py report`") == "the-weekly-check-up-visualizepy-report"
    seed, outside = "the rule of " + "seed 0" + "00", "see " + "../" + "shared/" + "DESIGN" + ".md"
    assert [bool(rx.search(seed)) for rx in OUTSIDE] == [False, False, False, True]
    assert [bool(rx.search(outside)) for rx in OUTSIDE] == [True, True, True, False]
