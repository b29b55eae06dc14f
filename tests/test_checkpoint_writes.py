"""sparsa.checkpoint's atomic writers: the file appears whole or not at all, and a failed write leaves the old one."""
import json

import pytest

from sparsa.checkpoint import write_json, write_text


def test_write_json_and_text_replace_whole_files(tmp_path):
    path = tmp_path / "sub" / "result.json"
    write_json(path, {"a": 1})
    write_json(path, {"b": 2.5, "x": object()}, indent=1, default=lambda o: "obj")  # default as in json.dump
    assert json.loads(path.read_text()) == {"b": 2.5, "x": "obj"}
    text_path = tmp_path / "table.md"
    write_text(text_path, "| a |\n")
    assert text_path.read_text() == "| a |\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["result.json", "sub", "table.md"]  # no temporaries left


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "result.json"
    write_json(path, {"kept": True})
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})  # not serialisable: json.dump raises mid-write
    assert json.loads(path.read_text()) == {"kept": True}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
