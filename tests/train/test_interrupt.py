"""StopRequests: SIGTERM / SIGINT only set a flag inside the context; a second Ctrl-C stops at
once; the previous handlers come back; off the main thread nothing is installed."""
from __future__ import annotations

import os
import signal
import threading

import pytest

from vlm_treegrpo.train.interrupt import StopRequests


def test_signals_set_the_request_and_a_second_ctrl_c_raises():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with StopRequests() as stop:
        assert stop.signal is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == signal.SIGTERM  # (the process lives on)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert {s: signal.getsignal(s) for s in before} == before


def test_off_the_main_thread_nothing_is_installed():
    seen = []

    def run():
        with StopRequests() as stop:
            seen.append((signal.getsignal(signal.SIGTERM), stop.signal))

    previous = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == [(previous, None)]
