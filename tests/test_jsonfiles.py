"""llmrun's JSON writer: processes writing one file at once each replace it whole."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmrun.jsonfiles import read_cache, read_json_object, write_json_atomic

# One writer: 200 replacements of the file, each with its own id (what ranks caching one measurement do).
_WRITER = """
import sys
from pathlib import Path
from llmrun.jsonfiles import write_json_atomic
for i in range(200):
    write_json_atomic(Path(sys.argv[1]), {"writer": int(sys.argv[2]), "i": i})
"""


def test_concurrent_writers_of_one_file_all_succeed_and_leave_one_whole_file(tmp_path):
    path = tmp_path / "cache" / "tuning.json"
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(n)]) for n in range(4)]
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0, 0]
    data = read_json_object(path)
    assert data["writer"] in range(4) and data["i"] == 199  # the last rename of some writer, whole
    assert [p.name for p in path.parent.iterdir()] == ["tuning.json"]  # no temporary file left behind


def test_a_failed_write_leaves_the_earlier_file_and_no_temporary(tmp_path):
    path = tmp_path / "roofs.json"
    write_json_atomic(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})  # not JSON: raises before anything is replaced
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["roofs.json"]


def test_a_cache_that_is_absent_or_corrupt_reads_empty(tmp_path):
    path = tmp_path / "tuning.json"
    assert read_cache(path) == {}
    for text in ("garbage{", "[1, 2]", "\xff\xfe"):
        path.write_text(text, encoding="latin-1")
        assert read_cache(path) == {}
    write_json_atomic(path, {"version": 1})
    assert read_cache(path) == {"version": 1}
