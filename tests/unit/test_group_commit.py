"""courier.app.ingest.GroupCommit's hand-over between threads, with `commit` replaced by a recorder.

The real store is in tests/integration/test_mllp_listener.py (each AA after its own commit, a
spoilt group). Here: which batches go into which transaction, that each thread gets its own
batch's results and nothing before its transaction returned, and how failures are shared out.
"""
from __future__ import annotations

import threading
import time

import pytest

from courier.app import ingest
from courier.app.ingest import Batch, GroupCommit, IngestError


class Recorder:
    """Stands in for ingest.commit: records each transaction's batches; the first one waits for `release`."""

    def __init__(self, fail=lambda batches: None):
        self.transactions: list[list[str]] = []
        self.release, self.entered = threading.Event(), threading.Event()
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, store, batches):
        with self.lock:
            self.transactions.append([b.source for b in batches])
            first = len(self.transactions) == 1
        if first:
            self.entered.set()
            assert self.release.wait(10)
        error = self.fail(batches)
        if error is not None:
            raise error
        return [[f"stored {b.source}"] for b in batches]


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(ingest, "commit", rec)
    return rec


def run_threads(group: GroupCommit, names: list[str]) -> tuple[dict[str, object], list[threading.Thread]]:
    out: dict[str, object] = {}

    def one(name):
        try:
            out[name] = group.commit(Batch(name, []))
        except Exception as exc:  # noqa: BLE001  # the outcome under test
            out[name] = exc

    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    for t in threads:
        t.start()
    return out, threads


def test_batches_arriving_during_a_transaction_share_the_next_and_each_gets_its_own_results(recorder):
    group = GroupCommit(None, leaders=1, patience=5)
    out, first = run_threads(group, ["a"])
    assert recorder.entered.wait(5)
    more, threads = run_threads(group, ["e", "b", "d", "c"])
    time.sleep(0.2)
    assert out == {} and more == {}  # nobody is answered before its transaction has returned
    recorder.release.set()
    for t in first + threads:
        t.join(5)
    assert recorder.transactions == [["a"], ["b", "c", "d", "e"]]  # the waiting four in one, in key order
    assert {**out, **more} == {n: [f"stored {n}"] for n in "abcde"}
    assert (group.batches, group.transactions) == (5, 2)


def test_a_spoilt_group_is_committed_again_batch_by_batch(monkeypatch):
    rec = Recorder(fail=lambda batches: RuntimeError("bad") if any(b.source == "bad" for b in batches) else None)
    monkeypatch.setattr(ingest, "commit", rec)
    group = GroupCommit(None, leaders=1, patience=5)
    out, first = run_threads(group, ["a"])
    assert rec.entered.wait(5)
    more, threads = run_threads(group, ["bad", "x", "y"])
    time.sleep(0.2)
    rec.release.set()
    for t in first + threads:
        t.join(5)
    assert rec.transactions == [["a"], ["bad", "x", "y"], ["bad"], ["x"], ["y"]]
    assert isinstance(more["bad"], RuntimeError)
    assert (out["a"], more["x"], more["y"]) == (["stored a"], ["stored x"], ["stored y"])


def test_an_outage_fails_the_whole_group_at_once(monkeypatch):
    from sqlalchemy.exc import OperationalError

    def outage(batches):
        if len(batches) > 1:
            cause = OperationalError("SELECT 1", {}, Exception("connection refused"))
            cause.connection_invalidated = True
            error = IngestError(503, "store_unavailable", "the message store could not commit")
            error.__cause__ = cause
            return error
        return None

    rec = Recorder(fail=outage)
    monkeypatch.setattr(ingest, "commit", rec)
    group = GroupCommit(None, leaders=1, patience=5)
    out, first = run_threads(group, ["a"])
    assert rec.entered.wait(5)
    more, threads = run_threads(group, ["x", "y"])
    time.sleep(0.2)
    rec.release.set()
    for t in first + threads:
        t.join(5)
    assert rec.transactions == [["a"], ["x", "y"]]  # not tried again one by one: the store is not there
    assert all(isinstance(more[n], IngestError) and more[n].code == "store_unavailable" for n in "xy")


def test_a_batch_waits_at_most_its_patience_for_a_stuck_leader(recorder):
    group = GroupCommit(None, leaders=1, patience=0.2)
    out, first = run_threads(group, ["stuck"])
    assert recorder.entered.wait(5)
    started = time.monotonic()
    more, threads = run_threads(group, ["next"])
    threads[0].join(5)
    assert more == {"next": ["stored next"]} and time.monotonic() - started < 2
    assert out == {}  # the stuck one is still waiting for its transaction
    recorder.release.set()
    first[0].join(5)
    assert out == {"stuck": ["stored stuck"]}
    assert recorder.transactions == [["stuck"], ["next"]]
