"""The README's file tree stays true: every package module, test, script and doc page is listed."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_lists_every_file():
    readme = (ROOT / "README.md").read_text()
    tree = readme[readme.index("## Files"):readme.index("## Stages")]
    missing = []
    for p in sorted((ROOT / "dlp_lora").rglob("*.py")):
        rel = p.relative_to(ROOT / "dlp_lora").as_posix()
        if rel not in tree:
            missing.append(f"dlp_lora/{rel}")
    for folder, pattern in (("tests", "*.py"), ("scripts", "*"), ("docs", "*")):
        for p in sorted((ROOT / folder).glob(pattern)):
            if p.is_file() and p.name not in tree:
                missing.append(f"{folder}/{p.name}")
    assert not missing, f"add these to the README's file tree: {missing}"
    for cmd in ("make demo", "make test"):
        assert cmd in readme
