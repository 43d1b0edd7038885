"""The thread benchmark runs, prints its table and writes its JSON."""

import json
import os

import pytest
import torch

from benchmarks import threads


@pytest.mark.slow
def test_tiny_run_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "threads.json"
    torch.set_num_threads(2)  # the autouse fixture restores the count it found
    threads.main(["--steps", "8", "--repeats", "1", "--out", str(out)])
    assert torch.get_num_threads() == 2  # fit gave the caller's count back
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["model", "default", "chosen", "speedup"]
    report = json.loads(out.read_text())
    assert report["busy_process"] and len(report["load_average_before"]) == 3
    assert [row["model"] for row in report["rows"]] == list(threads.problems())
    for row in report["rows"]:
        assert row["default_threads"] == 2 and set(row["chosen_threads"]) <= {1, 2}
        assert row["default_s"] > 0 and row["chosen_s"] > 0


def test_the_busy_process_is_gone_after_the_block():
    with threads.busy_core(True) as pid:
        assert pid is not None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        gone = True
    else:  # a reaped pid is not reused this fast; a live one would answer
        gone = False
    assert gone
