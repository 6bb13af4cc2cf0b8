"""The bytecode cache (kontext_server/startup/bytecode_cache.py): where Python's compiled imports go when the image
would not keep them.

Each case runs in a fresh interpreter (sys.pycache_prefix and sys.dont_write_bytecode are process-wide), importing
a package made for the test, so what is asserted is where its .pyc files really land.
"""
from __future__ import annotations

import importlib.util
import json
import os
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINTS = ["import kontext_server.service.service",
                "import flux_kontext_optimized; flux_kontext_optimized.app._get()"]

CHILD = """
import json, sys
sys.path.append({pkgs!r})  # the test's own package
from kontext_server.startup import bytecode_cache
status = bytecode_cache.enable(probe="probepkg")
import probepkg.mod
print(json.dumps({{"status": status, "cached": probepkg.mod.__cached__, "prefix": sys.pycache_prefix,
                  "dont_write": sys.dont_write_bytecode}}))
"""


@pytest.fixture
def pkgs(tmp_path):
    """A package with no bytecode yet: probepkg/__init__.py and probepkg/mod.py."""
    root = tmp_path / "pkgs"
    (root / "probepkg").mkdir(parents=True)
    (root / "probepkg" / "__init__.py").write_text("")
    (root / "probepkg" / "mod.py").write_text("VALUE = 42\n")
    return root


def run_child(pkgs: Path, cache: Path, **env_changes) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX", "FLUX_BYTECODE_CACHE")}
    env["FLUX_CACHE_DIR"] = str(cache)
    env.update({k: v for k, v in env_changes.items() if v is not None})
    out = subprocess.run([sys.executable, "-c", CHILD.format(pkgs=str(pkgs))], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def pycs(path: Path) -> list[Path]:
    return sorted(path.rglob("*.pyc")) if path.exists() else []


def test_dont_write_bytecode_image_gets_its_bytecode_cached_under_the_cache_dir(pkgs, tmp_path):
    cache = tmp_path / "cache"
    first = run_child(pkgs, cache, PYTHONDONTWRITEBYTECODE="1")
    assert first["status"]["enabled"] is True
    assert "PYTHONDONTWRITEBYTECODE" in first["status"]["reason"]
    assert first["prefix"] == str(cache / "pycache") and first["dont_write"] is False
    # The module's bytecode is under the cache directory, and nothing was written into the package.
    assert Path(first["cached"]).is_file() and Path(first["cached"]).is_relative_to(cache / "pycache")
    assert pycs(pkgs) == []
    written = {p: p.stat().st_mtime_ns for p in pycs(cache / "pycache")}
    assert len(written) == 2  # probepkg/__init__ and probepkg/mod
    # A second start finds it and does not compile again (the files are not rewritten).
    second = run_child(pkgs, cache, PYTHONDONTWRITEBYTECODE="1")
    assert second["cached"] == first["cached"]
    assert {p: p.stat().st_mtime_ns for p in pycs(cache / "pycache")} == written


def test_switched_off_writes_no_bytecode_anywhere(pkgs, tmp_path):
    cache = tmp_path / "cache"
    got = run_child(pkgs, cache, PYTHONDONTWRITEBYTECODE="1", FLUX_BYTECODE_CACHE="0")
    assert got["status"] == {"enabled": False, "reason": "FLUX_BYTECODE_CACHE=0"}
    assert got["prefix"] is None and got["dont_write"] is True
    assert pycs(pkgs) == [] and pycs(cache) == []


def test_nothing_changes_where_python_already_keeps_bytecode(pkgs, tmp_path):
    cache = tmp_path / "cache"
    got = run_child(pkgs, cache)  # writable package, bytecode writes on: Python's own __pycache__
    assert got["status"]["enabled"] is False and "not needed" in got["status"]["reason"]
    assert got["prefix"] is None
    assert len(pycs(pkgs)) == 2 and not (cache / "pycache").exists()


def test_shipped_bytecode_is_used_as_it_is(pkgs, tmp_path):
    for f in (pkgs / "probepkg").glob("*.py"):  # what pip's install-time compilation leaves
        py_compile.compile(str(f), cfile=importlib.util.cache_from_source(str(f)))
    got = run_child(pkgs, tmp_path / "cache", PYTHONDONTWRITEBYTECODE="1")
    assert got["status"]["enabled"] is False and "already next to its sources" in got["status"]["reason"]
    assert got["prefix"] is None
    assert Path(got["cached"]).is_relative_to(pkgs)


def test_the_operators_prefix_is_kept(pkgs, tmp_path):
    theirs = tmp_path / "theirs"
    got = run_child(pkgs, tmp_path / "cache", PYTHONPYCACHEPREFIX=str(theirs))
    assert got["status"]["enabled"] is False and got["prefix"] == str(theirs)
    assert len([p for p in pycs(theirs) if "probepkg" in p.parts]) == 2 and pycs(pkgs) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write to a read-only directory")
def test_read_only_package_directory_gets_its_bytecode_cached(pkgs, tmp_path):
    cache = tmp_path / "cache"
    os.chmod(pkgs / "probepkg", 0o555)
    try:
        got = run_child(pkgs, cache)
    finally:
        os.chmod(pkgs / "probepkg", 0o755)
    assert got["status"]["enabled"] is True and "read-only" in got["status"]["reason"]
    assert len(pycs(cache / "pycache")) == 2 and pycs(pkgs) == []


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_entry_points_enable_it_before_torch_is_imported(entry, tmp_path):
    """The point is the imports after it: an entry point that imported torch first would compile torch anyway."""
    code = f"""
import sys
from kontext_server.startup import bytecode_cache
real = bytecode_cache.enable
seen = []
def spy(*args, **kwargs):
    seen.append("torch" in sys.modules)
    return real(*args, **kwargs)
bytecode_cache.enable = spy
{entry}
print(seen)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "FLUX_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    seen = out.stdout.strip().splitlines()[-1]
    assert seen.startswith("[False"), f"enable() was not called before torch was imported: {seen}"
