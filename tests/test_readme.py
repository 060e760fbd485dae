"""The README's config reference is generated from the schema: it cannot drift."""

from pathlib import Path

from lora_cli.config import schema_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_config_reference_matches_the_schema():
    text = README.read_text()
    start, end = "<!-- config-reference:start -->\n", "\n<!-- config-reference:end -->"
    table = text[text.index(start) + len(start):text.index(end)]
    assert table == schema_markdown(), (
        "README config reference is out of date; regenerate it with\n"
        "python -c 'from lora_cli.config import schema_markdown; print(schema_markdown())'")


def test_readme_commands_name_real_files():
    text = README.read_text()
    for path in ("configs/quickstart.yaml", "configs/seed_linear.yaml", "data/make_quickstart.py",
                 "configs/hf_causal_lm.yaml", "configs/hf_classification.yaml"):
        assert path in text
        assert (README.parent / path).exists(), path


def test_every_shipped_config_is_valid():
    from lora_cli.config import load_config
    configs = sorted((README.parent / "configs").glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        load_config(path, check_files=False)
