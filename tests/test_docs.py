"""The docs stay true: links land on the code they quote, examples run, numbers add up.

A link to a line of code has the code on that line as its text
([`code`](../file.py#Lnn), the convention in docs/README.md). When code moves,
`.venv/bin/python tools/relink_docs.py` moves the line numbers; these tests fail
until it has been run, and name the link.
"""

import importlib.util
import linecache
import re
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from minilora.qlora.nf4 import NF4_CODE_VALUES, quantize_nf4

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _load_relink():
    spec = importlib.util.spec_from_file_location("relink_docs", ROOT / "tools" / "relink_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


relink_docs = _load_relink()
DOC_FILES = relink_docs.doc_files(ROOT)
DOC_IDS = [str(p.relative_to(ROOT)) for p in DOC_FILES]


def _section(doc: str, start: str, end: str) -> str:
    text = (DOCS / doc).read_text(encoding="utf-8")
    m = re.search(re.escape(start) + r".*?\n(.*?)" + re.escape(end), text, re.S)
    assert m, f"docs/{doc} lost its {start!r} ... {end!r} markers"
    return m.group(1)


def _python_blocks(path: Path) -> list[tuple[int, str]]:
    """(first line number, code) of every ```python block."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if current is None and line.strip() == "```python":
            current, start = [], number + 1
        elif current is not None and line.strip() == "```":
            blocks.append((start, "\n".join(current) + "\n"))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_the_docs_exist():
    for name in ("README.md", "lora.md", "qlora.md", "hyperparameters.md"):
        assert (DOCS / name).is_file(), f"docs/{name} is missing"
    assert ROOT / "README.md" in DOC_FILES


@pytest.mark.parametrize("doc", DOC_FILES, ids=DOC_IDS)
def test_every_relative_link_lands_on_its_code(doc):
    errors = [e for e in (relink_docs.check_link(link, ROOT) for link in relink_docs.find_links(doc)) if e]
    assert not errors, "broken doc links:\n" + "\n".join(errors)


@pytest.mark.parametrize("doc", DOC_FILES, ids=DOC_IDS)
def test_link_parser_sees_every_link(doc):
    # A cruder count of "](" outside code blocks: a link the regex misses would not be checked.
    text = "\n".join(line for _, line in relink_docs.markdown_lines(doc))
    # Drop inline code, keeping "[]" where a code span was a link's text (code may hold "](").
    text = re.sub(r"\[`[^`\n]+`\]|`[^`\n]*`", lambda m: "[]" if m.group(0)[0] == "[" else "", text)
    assert text.count("](") == len(relink_docs.find_links(doc))


def test_the_teaching_pages_link_the_lines_they_explain():
    def line_links(doc, code_file):
        return [l for l in relink_docs.find_links(DOCS / doc) if l.line and l.file == ROOT / code_file]

    assert len(line_links("lora.md", "minilora/lora/layer.py")) >= 12
    # The walker, its target rules and LoraConfig's defaults (one file before the split).
    assert sum(len(line_links("lora.md", f"minilora/lora/{f}.py")) for f in ("inject", "targets", "config")) >= 5
    assert len(line_links("qlora.md", "minilora/qlora/nf4.py")) >= 12
    assert len(line_links("qlora.md", "minilora/qlora/nf4_linear.py")) >= 3
    assert len(line_links("qlora.md", "kernels/nf4_dequant.py")) >= 6
    # The equations themselves: h = W0x + s·BAx, s = α/r or α/√r, B = 0, A Kaiming, W = W0 + s·BA.
    snippets = {l.snippet for l in line_links("lora.md", "minilora/lora/layer.py")}
    for needed in ("self.lora_B(self.lora_A(", "alpha / math.sqrt(r) if rslora else alpha / r",
                   "nn.init.zeros_(self.lora_B.weight)", "kaiming_uniform_(self.lora_A.weight",
                   "self.lora_B.weight @ self.lora_A.weight"):
        assert any(needed in s for s in snippets), f"docs/lora.md no longer links the line with {needed!r}"


@pytest.mark.parametrize("doc", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_python_examples_in_docs_run(doc):
    for start, code in _python_blocks(doc):
        name = f"{doc.relative_to(ROOT)}, example at line {start}"
        linecache.cache[name] = (len(code), None, code.splitlines(True), name)  # tracebacks show the line
        torch.manual_seed(0)
        exec(compile(code, name, "exec"), {"__name__": "docs_example"})


def test_nf4_code_table_is_minilora_s_code():
    rows = [r for r in _section("qlora.md", "<!-- nf4-code-table", "<!-- end nf4-code-table -->").splitlines()
            if re.match(r"\|\s*\d", r)]
    table = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    assert [int(i) for i, _, _ in table] == list(range(16))
    assert [bits for _, bits, _ in table] == [format(i, "04b") for i in range(16)]
    assert tuple(float(v) for _, _, v in table) == NF4_CODE_VALUES
    assert [v for _, _, v in table] == [repr(v) for v in NF4_CODE_VALUES]  # printed in full, not rounded


def test_bit_budget_sums_are_right():
    section = _section("qlora.md", "<!-- bit-budget", "<!-- end bit-budget -->")
    sums = re.findall(r"\*\*(4 \+ [^=*]+?) = ([\d.]+)\*\*", section)
    assert {lhs for lhs, _ in sums} == {"4 + 32/64", "4 + 8/64 + 32/(64·256)"}
    for lhs, rhs in sums:
        exact = Fraction(eval(lhs.replace("·", "*").replace("/", "*Fraction(1)/"), {"Fraction": Fraction}))
        decimals = len(rhs.partition(".")[2])
        assert round(float(exact), decimals) == float(rhs), f"{lhs} = {float(exact)}, not {rhs}"
    assert "4.126953125" in section  # the exact value, 4 + 1/8 + 1/512
    assert Fraction(4) + Fraction(8, 64) + Fraction(32, 64 * 256) == Fraction("4.126953125")


def test_bit_budget_is_what_nf4_storage_costs():
    w = torch.randn(256, 256 * 4)  # 4096 blocks of 64 = 16 nested blocks of 256
    assert quantize_nf4(w, 64, double_quant=False).bits_per_param == 4.5
    nested = quantize_nf4(w, 64, double_quant=True)
    per_matrix_offset = 32 / w.numel()
    assert nested.bits_per_param - per_matrix_offset == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-12)


# --------------------------------------------------------------------------- the relink tool


def _tree(tmp_path, code: str, doc: str) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(code)
    (tmp_path / "docs" / "page.md").write_text(doc)
    return tmp_path


def test_relink_moves_a_link_to_its_snippet_s_new_line(tmp_path):
    doc = "See [`y = f(x)`](../pkg/mod.py#L2), twice [`z = 1`](../pkg/mod.py#L3) [`y = f(x)`](../pkg/mod.py#L2).\n"
    root = _tree(tmp_path, "import f\ny = f(x)\nz = 1\n", doc)
    link = relink_docs.find_links(root / "docs" / "page.md")[0]
    assert relink_docs.check_link(link, root) is None

    (root / "pkg" / "mod.py").write_text("import f\n\n\n# moved down\ny = f(x)\nz = 1\n")
    error = relink_docs.check_link(relink_docs.find_links(root / "docs" / "page.md")[0], root)
    assert "not on line 2 of pkg/mod.py (it is now on line(s) 5)" in error and "tools/relink_docs.py" in error
    assert relink_docs.main(["--check", "--root", str(root)]) == 1
    assert (root / "docs" / "page.md").read_text() == doc  # --check writes nothing

    moved, errors = relink_docs.relink(root)
    assert errors == [] and len(moved) == 3
    assert (root / "docs" / "page.md").read_text() == doc.replace("#L2", "#L5").replace("#L3", "#L6")
    assert relink_docs.main(["--check", "--root", str(root)]) == 0


def test_relink_refuses_a_missing_or_ambiguous_snippet(tmp_path):
    doc = "[`y = f(x)`](../pkg/mod.py#L2) and [`z = 1`](../pkg/mod.py#L3)\n"
    root = _tree(tmp_path, "import f\ny = f(x)\nz = 1\n", doc)
    (root / "pkg" / "mod.py").write_text("import f\ny = g(x)\n\nz = 1\nz = 1\n")
    moved, errors = relink_docs.relink(root)
    assert moved == []
    assert any("`y = f(x)` is on no line of pkg/mod.py" in e for e in errors)
    assert any("`z = 1` is on lines 4, 5 of pkg/mod.py" in e and "longer" in e for e in errors)
    assert (root / "docs" / "page.md").read_text() == doc


def test_check_link_rejects_bad_targets(tmp_path):
    doc = ("[plain text](../pkg/mod.py#L1) [`x`](../pkg/gone.py#L1) [`import f`](../pkg/mod.py#L9)\n"
           "[`import f`](../pkg/mod.py#L1-L2) [ok](../pkg/mod.py) [nope](page.md#no-such-heading)\n"
           "# A Heading, with `code`\n[yes](page.md#a-heading-with-code) [web](https://example.org/x#L3)\n"
           "```\n[`inside a fence`](../pkg/mod.py#L99)\n```\n")
    root = _tree(tmp_path, "import f\n", doc)
    results = [relink_docs.check_link(link, root) for link in relink_docs.find_links(root / "docs" / "page.md")]
    assert len(results) == 8  # the fenced link is not a link
    assert "is not a code span" in results[0]
    assert "does not exist" in results[1]
    assert "has only 1 lines" in results[2]
    assert "not a range" in results[3]
    assert results[4] is None
    assert "no heading with the anchor #no-such-heading" in results[5]
    assert results[6] is None and results[7] is None


def test_reading_order_gives_each_file_its_real_size():
    text = (DOCS / "README.md").read_text(encoding="utf-8")
    section = text.split("## Reading order", 1)[1].split("\n## ", 1)[0]
    entries = re.findall(r"\[`([^`]+)`\]\(\.\./\1\), (\d+) lines:", section)
    assert [path.split("/")[1] for path, _ in entries][:3] == ["lora", "lora", "lora"]
    assert {path.split("/")[1] for path, _ in entries} >= {"lora", "qlora", "train", "models"}
    for path, stated in entries:
        actual = len((ROOT / path).read_text(encoding="utf-8").splitlines())
        assert int(stated) == actual, f"docs/README.md says {path} has {stated} lines; it has {actual}: update it"
