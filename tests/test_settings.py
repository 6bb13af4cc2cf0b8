"""kontext_server/settings.py: every environment variable is declared there, documented in docs/operations.md, and
read at call time."""
from __future__ import annotations

import re
from pathlib import Path

from kontext_server import settings

ROOT = Path(__file__).resolve().parents[1]


def test_every_flux_variable_named_in_the_code_is_declared():
    declared = {v.name for v in settings.all_vars()}
    sources = [p for d in ("kontext_server", "optimizations", "patches", "tools", "bench")
               for p in (ROOT / d).rglob("*.py")]
    named = set()
    for path in sources + [ROOT / "utils.py", ROOT / "flux_kontext_optimized.py"]:
        named |= set(re.findall(r"\bFLUX_[A-Z0-9_]+\b", path.read_text()))
    assert named - declared == set(), "declare these in kontext_server/settings.py"


def test_the_operations_guide_holds_the_current_table():
    doc = (ROOT / "docs" / "operations.md").read_text()
    assert settings.markdown_table() in doc, "regenerate the table: python -c 'from kontext_server import " \
                                              "settings; print(settings.markdown_table())'"


def test_a_variable_is_read_when_asked_not_when_imported(monkeypatch):
    monkeypatch.setenv("FLUX_MAX_QUEUE", "3")
    assert settings.MAX_QUEUE.get_int() == 3
    monkeypatch.delenv("FLUX_MAX_QUEUE")
    assert settings.MAX_QUEUE.get_int() == 16


def test_a_switch_is_off_only_when_zero(monkeypatch):
    monkeypatch.delenv("FLUX_AOT_REGIONS", raising=False)
    assert not settings.AOT_REGIONS.off()
    monkeypatch.setenv("FLUX_AOT_REGIONS", "1")
    assert not settings.AOT_REGIONS.off()
    monkeypatch.setenv("FLUX_AOT_REGIONS", "0")
    assert settings.AOT_REGIONS.off()


def test_the_cli_defaults_come_from_the_settings(monkeypatch):
    from kontext_server.cli import build_parser

    monkeypatch.setenv("FLUX_PORT", "9123")
    monkeypatch.setenv("FLUX_MODEL", "synthetic-full")
    a = build_parser().parse_args(["serve"])
    assert a.port == 9123 and a.model == "synthetic-full"
    assert "env FLUX_PORT" in build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
