"""The completion thread on its own: abandoned captures are held until their device work is
done and then given back unread; leaving global capture mode never raises."""

from __future__ import annotations

import threading

import torch

from esper_telemetry.collector import completion
from esper_telemetry.collector.completion import CompletionThread, Pending


class _Event:
    """A device event as the thread sees it: ``query()`` says whether the work is done."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.queries = 0

    def query(self) -> bool:
        self.queries += 1
        return self.ready.is_set()


def test_an_abandoned_capture_is_held_until_its_work_is_done_then_given_back_unread():
    done, abandoned, errors = [], [], []
    thread = CompletionThread(done.append, errors.append, abandoned.append)
    try:
        event = _Event()
        grads = [torch.ones(3)]
        held = Pending(0, 0.0, False, None, grads, object(), [event])
        held.abandoned = True
        thread.submit(held)
        normal = Pending(1, 0.0, False, None, [], None, [], finish=None)
        normal.sums = [[1.0], [0.0]]  # as if computed: only handed on, in order
        thread.submit(normal)
        assert not thread.wait_idle(0.2)  # the abandoned one's work is still queued
        assert event.queries > 0 and held.grads is grads  # polled, and still holding
        assert abandoned == [] and done == []  # in order: nothing behind it handed on early
        event.ready.set()
        assert thread.wait_idle(5.0)
        assert abandoned == [held] and done == [normal] and errors == []
        assert held.grads is None  # released once given back
    finally:
        thread.stop(1.0)


def test_leaving_global_capture_mode_says_why_not_instead_of_raising(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert completion.leave_global_capture_mode() == "not a CUDA build of torch"
    # a CUDA build on a machine whose driver library cannot be loaded (or lacks the symbol)
    monkeypatch.setattr(torch.version, "cuda", "12.8")

    def no_driver(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(completion.ctypes, "CDLL", no_driver)
    assert completion.leave_global_capture_mode() == (
        "OSError: libcuda.so.1: cannot open shared object file"
    )


def test_the_thread_leaves_global_capture_mode_once_before_its_first_cuda_call(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(
        completion, "leave_global_capture_mode", lambda: calls.append("relax") or None
    )
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(f"set_device {d}"))

    class CudaPlan:  # what Pending reads of a plan with a CUDA slice
        cuda = [type("Slice", (), {"device": torch.device("cuda", 0)})()]

    done, errors = [], []
    thread = CompletionThread(done.append, errors.append)
    try:
        for step in range(3):
            event = _Event()
            event.ready.set()
            pending = Pending(step, 0.0, False, CudaPlan(), [], None, [event])
            pending.sums = [[0.0], [0.0]]
            thread.submit(pending)
        assert thread.wait_idle(5.0) and errors == []
    finally:
        thread.stop(1.0)
    assert [p.step for p in done] == [0, 1, 2]
    assert calls == ["relax", "set_device 0"] and thread.capture_mode_error is None
