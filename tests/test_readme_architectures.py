"""The README's list of supported architectures is the adapter table's, rendered."""

from pathlib import Path

from dgqtool.models.adapters import supported_architectures

MARK = "<!-- generated: supported_architectures(short=True) -->\n"


def test_readme_lists_the_adapter_table():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    generated = text.split(MARK)[1].split("<!-- end generated -->")[0]
    assert generated.strip() == supported_architectures(short=True).strip(), "regenerate the README's list"
