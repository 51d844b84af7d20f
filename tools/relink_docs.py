"""Keep the docs' links to lines of code pointing at the right line.

The convention (docs/README.md states it for writers): a link to one line of code
has an inline code span as its whole text, and that code must appear verbatim on
the linked line:

    [`self.scaling = alpha / math.sqrt(r) if rslora else alpha / r`](../minilora/lora/layer.py#L66)

Line numbers move when the code around them changes; the snippet does not (or, if
it does, the link should be looked at by a person). This script rewrites every
`#Lnn` in README.md and docs/*.md to the line where its snippet is now:

    .venv/bin/python tools/relink_docs.py           # rewrite the files, list what moved
    .venv/bin/python tools/relink_docs.py --check   # change nothing; exit 1 if anything would

A link whose snippet is still on its line is left alone. Otherwise the snippet
must occur on exactly one line of the file: if it occurs nowhere (the code
changed) or on several lines (the snippet is too short to say which), the link is
reported and left as it is, and the exit status is 1. Fix those by hand: choose a
snippet that is on the intended line and nowhere else in the file.

tests/test_docs.py uses `doc_files`, `find_links` and `check_link` from here.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# [text](target): the text is either one code span (which may hold brackets) or
# plain text without brackets. Targets never contain spaces or parentheses here.
LINK_RE = re.compile(r"\[(?P<text>`[^`\n]+`|[^\]\n]*)\]\((?P<target>[^)\s]+)\)")
LINE_ANCHOR_RE = re.compile(r"^L(\d+)$")
FENCE_RE = re.compile(r"^\s*(```|~~~)")
RELINK_HINT = "run `.venv/bin/python tools/relink_docs.py` to move the line numbers"


@dataclass
class Link:
    doc: Path          # the markdown file holding the link
    doc_line: int      # 1-based line of the link in that file
    text: str          # the link text as written
    target: str        # the link target as written
    start: int         # character span of the target inside its markdown line
    end: int

    @property
    def is_external(self) -> bool:
        return re.match(r"^[a-z][a-z0-9+.-]*:", self.target) is not None or self.target.startswith("//")

    @property
    def path_part(self) -> str:
        return self.target.split("#", 1)[0]

    @property
    def anchor(self) -> str | None:
        return self.target.split("#", 1)[1] if "#" in self.target else None

    @property
    def file(self) -> Path:
        """The file the link points at (the markdown file itself for a bare #anchor)."""
        return (self.doc.parent / self.path_part).resolve() if self.path_part else self.doc

    @property
    def line(self) -> int | None:
        """The linked line number for a `#Lnn` link, else None."""
        m = LINE_ANCHOR_RE.match(self.anchor or "")
        return int(m.group(1)) if m else None

    @property
    def snippet(self) -> str | None:
        """The code span that is the link's text, without its backticks, else None."""
        if len(self.text) >= 2 and self.text[0] == "`" and self.text[-1] == "`":
            return self.text[1:-1]
        return None

    def where(self, root: Path = ROOT) -> str:
        return f"{_rel(self.doc, root)}:{self.doc_line}"


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md and every markdown file under docs/."""
    files = [root / "README.md"] if (root / "README.md").is_file() else []
    return files + sorted((root / "docs").glob("**/*.md"))


def markdown_lines(doc: Path) -> list[tuple[int, str]]:
    """(1-based line number, text) of every line outside fenced code blocks."""
    out, fence = [], None
    for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
        m = FENCE_RE.match(line)
        if m:
            if fence is None:
                fence = m.group(1)
            elif m.group(1) == fence:
                fence = None
            continue
        if fence is None:
            out.append((number, line))
    return out


def find_links(doc: Path) -> list[Link]:
    links = []
    for number, line in markdown_lines(doc):
        for m in LINK_RE.finditer(line):
            links.append(Link(doc, number, m.group("text"), m.group("target"), m.start("target"), m.end("target")))
    return links


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"`|\*\*|__", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def heading_anchors(doc: Path) -> set[str]:
    anchors: set[str] = set()
    for _, line in markdown_lines(doc):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug, n = github_slug(m.group(1)), 0
            while (slug if n == 0 else f"{slug}-{n}") in anchors:
                n += 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _code_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def check_link(link: Link, root: Path = ROOT) -> str | None:
    """None if the link is good, else one line that says what is wrong and what to do."""
    if link.is_external:
        return None
    where = link.where(root)
    target = link.file
    if not target.exists():
        return f"{where}: {link.target} points at a file that does not exist ({_rel(target, root)})"
    anchor = link.anchor
    if anchor is None or target.is_dir():
        return None
    if anchor.startswith("L") and anchor[1:2].isdigit():
        if link.line is None:
            return f"{where}: {link.target}: link one line (#Lnn), not a range"
        if link.snippet is None:
            return (f"{where}: {link.target} links a line of code but its text [{link.text}] is not a code span; "
                    "write the code on that line as the text: [`code`](file#Lnn)")
        lines = _code_lines(target)
        if not 1 <= link.line <= len(lines):
            return f"{where}: {link.target}: {_rel(target, root)} has only {len(lines)} lines; {RELINK_HINT}"
        if link.snippet not in lines[link.line - 1]:
            found = [i for i, text in enumerate(lines, 1) if link.snippet in text]
            now = f"it is now on line(s) {', '.join(map(str, found))}" if found else "it is in no line of the file"
            return (f"{where}: `{link.snippet}` is not on line {link.line} of {_rel(target, root)} ({now}); "
                    f"{RELINK_HINT}" + ("" if len(found) == 1 else ", then fix the snippet by hand"))
        return None
    if target.suffix == ".md" and anchor not in heading_anchors(target):
        return f"{where}: {link.target}: {_rel(target, root)} has no heading with the anchor #{anchor}"
    return None


class RelinkError(ValueError):
    pass


def new_line_for(link: Link, root: Path = ROOT) -> int:
    """Where the link's snippet is now: its current line if still there, else its only line."""
    lines = _code_lines(link.file)
    if link.line is not None and 1 <= link.line <= len(lines) and link.snippet in lines[link.line - 1]:
        return link.line
    found = [i for i, text in enumerate(lines, 1) if link.snippet in text]
    if not found:
        raise RelinkError(f"{link.where(root)}: `{link.snippet}` is on no line of {_rel(link.file, root)}: "
                          "the code changed; rewrite the snippet and its line number by hand")
    if len(found) > 1:
        raise RelinkError(f"{link.where(root)}: `{link.snippet}` is on lines {', '.join(map(str, found))} of "
                          f"{_rel(link.file, root)}: make the snippet longer so that it names one line")
    return found[0]


def relink(root: Path = ROOT, write: bool = True) -> tuple[list[str], list[str]]:
    """Move every line link to its snippet's line. Returns (what moved, errors)."""
    moved, errors = [], []
    for doc in doc_files(root):
        text_lines = doc.read_text(encoding="utf-8").split("\n")
        changed = False
        # Right to left within a line, so earlier spans stay valid after a rewrite.
        for link in sorted(find_links(doc), key=lambda l: (l.doc_line, -l.start)):
            if link.is_external or link.line is None or link.snippet is None or not link.file.is_file():
                continue
            try:
                line = new_line_for(link, root)
            except RelinkError as e:
                errors.append(str(e))
                continue
            if line != link.line:
                new_target = f"{link.path_part}#L{line}"
                row = text_lines[link.doc_line - 1]
                text_lines[link.doc_line - 1] = row[: link.start] + new_target + row[link.end :]
                moved.append(f"{link.where(root)}: `{link.snippet}` L{link.line} -> L{line}")
                changed = True
        if changed and write:
            doc.write_text("\n".join(text_lines), encoding="utf-8")
    return moved, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Move the #Lnn of every code link in README.md and docs/ to the "
                                                 "line where its snippet (the link's code-span text) is now.")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if any link would move")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this script's repo)")
    args = parser.parse_args(argv)
    moved, errors = relink(args.root, write=not args.check)
    for line in moved:
        print(("would move " if args.check else "moved ") + line)
    for line in errors:
        print("error: " + line, file=sys.stderr)
    if not moved and not errors:
        print("every code link is on its line")
    return 1 if errors or (args.check and moved) else 0


if __name__ == "__main__":
    sys.exit(main())
