"""The process settings minidiff applies at import (minidiff/runtime.py)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from minidiff.cli import main


def _malloc_note(**env):
    code = "import minidiff; print(minidiff.runtime.malloc_note())"
    env = {**os.environ, **env}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(platform.system() != "Linux", reason="mallopt is glibc's")
def test_import_tunes_the_allocator_on_linux():
    assert "keeps freed memory for reuse" in _malloc_note(MINIDIFF_MALLOC="")


def test_the_user_can_keep_the_allocator_defaults():
    assert _malloc_note(MINIDIFF_MALLOC="system") == "the allocator's defaults (MINIDIFF_MALLOC=system)"


def test_apply_is_idempotent():
    import minidiff

    note = minidiff.runtime.malloc_note()
    minidiff.runtime.apply()
    assert minidiff.runtime.malloc_note() == note != "not applied"


def test_info_reports_the_process_settings(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    settings = out[out.index("process settings:") :]
    assert "blas" in settings and "malloc" in settings
