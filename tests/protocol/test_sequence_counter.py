"""SequenceCounter (node/state.py): numbers never go backwards, even across a crash."""

from __future__ import annotations

import json

import pytest

from node.common.state import SEQ_FILE, SequenceCounter


def take(counter: SequenceCounter, n: int) -> list[int]:
    return [counter.next() for _ in range(n)]


def test_numbers_start_at_one_and_strictly_increase():
    counter = SequenceCounter(None)
    got = take(counter, 2500)
    assert got == list(range(1, 2501))


def test_a_restart_continues_above_every_number_already_used(tmp_path):
    first = take(SequenceCounter(tmp_path), 5)
    second = take(SequenceCounter(tmp_path), 5)
    assert min(second) > max(first)
    assert second == sorted(second)


def test_a_crash_mid_block_never_reuses_a_number(tmp_path):
    # "crash": the counter object is dropped without any shutdown step
    used: list[int] = []
    for n in (1, 999, 1000, 1001, 1500, 0, 2001, 3):
        used += take(SequenceCounter(tmp_path), n)
    assert used == sorted(used)
    assert len(set(used)) == len(used)


def test_a_restart_skips_at_most_one_block(tmp_path):
    used = take(SequenceCounter(tmp_path), 10)
    after = SequenceCounter(tmp_path).next()
    assert max(used) < after <= max(used) + SequenceCounter.BLOCK + 1


def test_the_reservation_is_written_before_a_number_is_handed_out(tmp_path):
    counter = SequenceCounter(tmp_path)
    for _ in range(2 * SequenceCounter.BLOCK + 5):
        n = counter.next()
        reserved = json.loads((tmp_path / SEQ_FILE).read_text())["reserved"]
        assert n < reserved


def test_a_sequence_file_written_by_an_older_run_is_honoured(tmp_path):
    (tmp_path / SEQ_FILE).write_text(json.dumps({"reserved": 123456}))
    assert SequenceCounter(tmp_path).next() == 123456


@pytest.mark.parametrize("content", ["", "{", "[]", "{}", '{"reserved": "x"}', "null"])
def test_a_corrupt_sequence_file_is_refused(tmp_path, content):
    (tmp_path / SEQ_FILE).write_text(content)
    with pytest.raises(ValueError, match="corrupt sequence file"):
        SequenceCounter(tmp_path)


def test_the_sequence_file_is_private(tmp_path):
    SequenceCounter(tmp_path)
    assert (tmp_path / SEQ_FILE).stat().st_mode & 0o777 == 0o600
