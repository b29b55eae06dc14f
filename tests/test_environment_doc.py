"""docs/environment.md lists every SPARSA_* variable that the library reads, and only those."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def names_in_code() -> set:
    found = set()
    for folder, _, files in os.walk(os.path.join(ROOT, "sparsa")):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name)) as f:
                    found |= set(re.findall(r"[\"'](SPARSA_[A-Z0-9_]+)[\"']", f.read()))
    return found


def test_every_environment_variable_is_documented():
    with open(os.path.join(ROOT, "docs", "environment.md")) as f:
        documented = set(re.findall(r"^\| `(SPARSA_[A-Z0-9_]+)` \|", f.read(), flags=re.M))
    in_code = names_in_code()
    assert len(in_code) >= 15  # the scan itself works
    assert in_code == documented, (sorted(in_code - documented), sorted(documented - in_code))


def test_head_group_override_is_checked(monkeypatch):
    from sparsa.ops.kl.triton_ops import _head_group

    monkeypatch.setenv("SPARSA_KL_HEAD_GROUP", "3")
    assert _head_group(1024, 256, 8) == 3 and _head_group(1024, 256, 2) == 2
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("SPARSA_KL_HEAD_GROUP", bad)
        with pytest.raises(ValueError, match="SPARSA_KL_HEAD_GROUP"):
            _head_group(1024, 256, 8)
