"""Joining a Ray cluster: Ray Client's lost race at session start is retried, every other failure is not.

The race (Ray's proxier finds the session's launcher process already a zombie) cannot be forced, so
``ray.init`` is stood in for by an object that fails as Ray does; the real connection is covered by
``tests/scenarios/test_ray.py``.
"""

from __future__ import annotations

import io

import pytest

from batchcap.config import UsageError
from batchcap.pipeline import ray_engine

LOST_RACE = ConnectionAbortedError(
    "Initialization failure from server:\nTraceback (most recent call last):\n"
    "psutil.ZombieProcess: PID still exists but it's a zombie (pid=17908)"
)


class StandInRay:
    """``is_initialized`` and ``init`` of the ray module, failing with the given errors first."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.addresses: list[str | None] = []

    def is_initialized(self) -> bool:
        return False

    def init(self, address: str | None = None) -> None:
        self.addresses.append(address)
        if self.errors:
            raise self.errors.pop(0)


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_engine, "CLIENT_SESSION_RETRY_WAITS", (0.0, 0.0))


def test_a_client_session_that_failed_to_start_is_tried_again() -> None:
    ray, said = StandInRay(LOST_RACE, LOST_RACE), io.StringIO()
    assert ray_engine._connect(ray, "ray://127.0.0.1:10001", said) is True
    assert ray.addresses == ["ray://127.0.0.1:10001"] * 3
    assert said.getvalue().count("failed to start a session; trying again") == 2


def test_a_client_session_that_never_starts_is_a_clear_error_after_three_tries() -> None:
    ray = StandInRay(LOST_RACE, LOST_RACE, LOST_RACE, LOST_RACE)
    with pytest.raises(UsageError, match="cannot connect to a Ray cluster there"):
        ray_engine._connect(ray, "ray://127.0.0.1:10001", io.StringIO())
    assert len(ray.addresses) == 3


@pytest.mark.parametrize(
    ("address", "error"),
    [
        ("127.0.0.1:6379", LOST_RACE),  # not Ray Client: nothing of the race applies
        ("ray://127.0.0.1:10001", ConnectionError("no cluster listening")),
    ],
)
def test_other_failures_are_not_retried(address: str, error: Exception) -> None:
    ray, said = StandInRay(error), io.StringIO()
    with pytest.raises(UsageError, match="start one with `ray start --head`"):
        ray_engine._connect(ray, address, said)
    assert len(ray.addresses) == 1 and said.getvalue() == ""
