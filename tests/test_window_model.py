"""scripts/window_model.py: work items of window-major KV-outer groups against block-major ones (CPU model)."""
import pytest

from scripts.window_model import main, model, pair_blocks


def test_windows_only_add_items_and_one_window_adds_none():
    tok, blk = pair_blocks(2048, seed=1)
    whole = model(2048, 4, 2048, tok, blk)  # one window: the same groups as block-major
    assert whole["items_window_major"] == whole["items_block_major"] and whole["extra_items"] == 0
    prev = whole["items_window_major"]
    for window in (1024, 512, 256):  # smaller windows cut more groups
        r = model(2048, 4, window, tok, blk)
        assert r["items_window_major"] >= prev
        prev = r["items_window_major"]
        assert 0 < r["rows_used_window_major"] <= r["rows_used_block_major"] <= 1
        assert r["partials_mb_all_heads"] == pytest.approx(r["partials_mb_per_kv_head"] * 8)


def test_rejects_windows_that_are_not_whole_blocks(monkeypatch):
    monkeypatch.setattr("sys.argv", ["window_model.py", "--sizes", "2048", "--windows", "100"])
    with pytest.raises(ValueError, match="--windows"):
        main()
