"""The scheduler is plain Python: tested with stand-in requests, no model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from server.engine.scheduler import Scheduler, SchedulerConfig, split_by_length


@dataclass(eq=False)
class FakeRequest:
    request_id: str
    num_rows: int = 1
    num_reserved_tokens: int = 10


def make_scheduler(max_batch_size: int = 4, max_batch_tokens: int = 100, max_waiting: int = 3) -> Scheduler:
    return Scheduler(SchedulerConfig(max_batch_size, max_batch_tokens, max_waiting))


def test_schedule_admits_in_arrival_order_when_room():
    scheduler = make_scheduler()
    requests = [FakeRequest(str(i)) for i in range(3)]
    for request in requests:
        scheduler.add(request)
    assert scheduler.schedule() == requests
    assert scheduler.running == requests and not scheduler.waiting


def test_schedule_stops_at_max_batch_size():
    scheduler = make_scheduler(max_batch_size=2, max_waiting=5)
    for i in range(3):
        scheduler.add(FakeRequest(str(i)))
    assert [r.request_id for r in scheduler.schedule()] == ["0", "1"]
    assert [r.request_id for r in scheduler.waiting] == ["2"]


def test_schedule_stops_at_token_budget():
    scheduler = make_scheduler(max_batch_tokens=25)
    for i in range(3):
        scheduler.add(FakeRequest(str(i), num_reserved_tokens=10))
    assert len(scheduler.schedule()) == 2
    assert scheduler.num_reserved_tokens == 20


def test_schedule_never_skips_the_head_for_smaller_requests():
    scheduler = make_scheduler(max_batch_tokens=30)
    scheduler.add(FakeRequest("running", num_reserved_tokens=20))
    scheduler.schedule()
    big, small = FakeRequest("big", num_reserved_tokens=20), FakeRequest("small", num_reserved_tokens=5)
    scheduler.add(big)
    scheduler.add(small)
    assert scheduler.schedule() == []  # FIFO: `small` would fit, but it must not starve `big`
    scheduler.remove(scheduler.running[0])
    assert scheduler.schedule() == [big, small]


def test_ensemble_rows_count_against_batch_size():
    scheduler = make_scheduler(max_batch_size=4)
    scheduler.add(FakeRequest("single"))
    scheduler.add(FakeRequest("ensemble", num_rows=4))
    assert [r.request_id for r in scheduler.schedule()] == ["single"]
    assert scheduler.num_running_rows == 1


def test_why_never_fits_names_the_limit():
    scheduler = make_scheduler(max_batch_size=2, max_batch_tokens=50)
    assert "max_batch_size is 2" in scheduler.why_never_fits(FakeRequest("a", num_rows=3))
    assert "max_batch_tokens is 50" in scheduler.why_never_fits(FakeRequest("b", num_reserved_tokens=51))
    assert scheduler.why_never_fits(FakeRequest("c", num_reserved_tokens=50)) is None


def test_is_full_at_max_waiting():
    scheduler = make_scheduler(max_waiting=2)
    scheduler.add(FakeRequest("a"))
    assert not scheduler.is_full()
    scheduler.add(FakeRequest("b"))
    assert scheduler.is_full()


def test_add_refuses_when_full():
    scheduler = make_scheduler(max_waiting=1)
    scheduler.add(FakeRequest("a"))
    with pytest.raises(AssertionError):
        scheduler.add(FakeRequest("b"))


def test_remove_and_find_cover_waiting_and_running():
    scheduler = make_scheduler(max_batch_size=1)
    first, second = FakeRequest("first"), FakeRequest("second")
    scheduler.add(first)
    scheduler.add(second)
    scheduler.schedule()
    assert scheduler.find("first") is first and scheduler.find("second") is second
    scheduler.remove(second)
    scheduler.remove(first)
    assert scheduler.find("first") is None and not scheduler.has_work()


# ---- prefill passes by length


def test_equal_lengths_share_one_pass():
    assert split_by_length([(1, 40)] * 5, split_tokens=0) == [[0, 1, 2, 3, 4]]


def test_one_request_is_one_pass():
    assert split_by_length([(3, 17)], split_tokens=256) == [[0]]


def test_short_requests_split_off_when_the_padding_saved_exceeds_the_price_of_a_pass():
    # widths 100 and 10: keeping them together pads 3 short rows by 90 positions each (270 > 256)
    sizes = [(1, 100), (1, 10), (1, 100), (2, 10)]
    assert split_by_length(sizes, split_tokens=256) == [[1, 3], [0, 2]]
    assert split_by_length(sizes, split_tokens=270) == [[0, 2, 1, 3]]


def test_every_request_lands_in_exactly_one_pass_with_its_rows():
    sizes = [(1 + i % 3, 7 + (i * 37) % 120) for i in range(40)]
    for split_tokens in (0, 64, 256, 10_000):
        passes = split_by_length(sizes, split_tokens)
        assert sorted(i for indices in passes for i in indices) == list(range(40))
        widths = [max(sizes[i][1] for i in indices) for indices in passes]
        assert widths == sorted(widths)  # the shortest pass runs first


def test_a_larger_price_never_makes_more_passes():
    sizes = [(1, 7 + (i * 37) % 120) for i in range(32)]
    counts = [len(split_by_length(sizes, t)) for t in (0, 16, 64, 256, 1024, 1 << 20)]
    assert counts == sorted(counts, reverse=True) and counts[-1] == 1
