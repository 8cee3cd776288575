"""Typed errors. Each carries what a person needs to fix the cause."""

from __future__ import annotations


class TrainbusError(Exception):
    """Base class for every error trainbus raises on purpose."""


class SettingsError(TrainbusError, ValueError):
    """A setting has a bad value. The message names the variable and what is expected."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


class InvalidEvent(TrainbusError, ValueError):
    """A stream entry is not a valid event; ``reason`` goes to the dead-letter stream.

    ``run_id`` and ``seq`` are set when the envelope named them validly (only the rest was
    wrong), so that sinks can count the seq as done instead of waiting for it.
    """

    def __init__(self, reason: str, run_id: str | None = None, seq: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.run_id = run_id
        self.seq = seq
