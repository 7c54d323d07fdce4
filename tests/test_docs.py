"""The repository's docs: corruption tables equal the presets, and no file cites docs that live
outside the repository."""
import ast
import re
import subprocess
from pathlib import Path

from raymoll.corruptions.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]


def test_corruption_tables_equal_presets():
    text = (ROOT / "docs" / "corruptions.md").read_text()
    for preset, table in PRESETS.items():
        section = text.split(f"(`{preset}`)", 1)[1].split("\n### ", 1)[0]
        rows = {m[1]: m[2] for m in re.finditer(r"^\| (\w+) \| (`.+) \|$", section, re.M)}
        assert set(rows) == set(table)
        for name, cells in rows.items():
            values = tuple(ast.literal_eval(c.strip().strip("`")) for c in cells.split("|"))
            assert values == table[name], (preset, name)


def test_no_file_cites_docs_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    outside = re.compile(r"METHOD\.md|PLATFORM_NOTES|CORRUPTIONS\.md|DESIGN\.md|shared/docs")
    citing = [f for f in files if f != "tests/test_docs.py" and (ROOT / f).is_file()
              and outside.search((ROOT / f).read_text(errors="ignore"))]
    assert citing == []
