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
    """A stream entry is not a valid event; ``reason`` goes to the dead-letter stream."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
