"""docs/plugins.md's five-minute example, copied as written into a fresh directory,
installs with pip (offline: ``--no-deps --no-build-isolation``, into a folder of its own)
and passes its own tests against the installed distribution."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "plugins.md"


def five_minute_files() -> dict[str, str]:
    """The files of the section "In five minutes": the layout block names them, and each
    is given as a code block after a line naming it (`path`:), or marked (empty)."""
    text = GUIDE.read_text(encoding="utf-8")
    section = text[text.index("## In five minutes") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```[a-z]*\n(.*?)```", section, flags=re.S)
    layout = [line.strip() for line in blocks[0].splitlines()[1:] if line.strip()]
    files: dict[str, str] = {}
    for line in layout:
        path, _, note = line.partition(" ")
        files[path] = "" if note.strip() == "(empty)" else None  # type: ignore[assignment]
    for name, body in re.findall(r"^`([^`]+)`:\n\n```[a-z]*\n(.*?)```", section, flags=re.S | re.M):
        assert name in files, f"docs/plugins.md gives {name}, which its layout does not list"
        files[name] = body
    missing = [p for p, body in files.items() if body is None]
    assert not missing, f"docs/plugins.md's five-minute example lists {missing} without giving them"
    return files


def test_the_five_minute_example_installs_and_passes_its_tests(tmp_path):
    files = five_minute_files()
    assert set(files) == {
        "pyproject.toml",
        "src/diffkit_sigmoid/__init__.py",
        "src/diffkit_sigmoid/plugin.py",
        "tests/test_plugin.py",
    }
    work, site = tmp_path / "my-plugin", tmp_path / "site"
    for rel, body in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(body, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFKIT_")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site), str(work)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (site / "diffkit_sigmoid" / "plugin.py").is_file()
    shutil.rmtree(work / "src")  # its tests must exercise the installed distribution
    env["PYTHONPATH"] = str(site)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    done = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "2 passed" in done.stdout
    check = [sys.executable, "-m", "diffkit.cli", "plugins", "--check"]
    done = subprocess.run(check, cwd=work, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
