"""The one exception type of the project. It carries an MLflow error code; `server.api.errors` alone
turns it into the JSON envelope and HTTP status the client expects."""

from __future__ import annotations


class RunyardError(Exception):
    def __init__(self, message: str, error_code: str = "INVALID_PARAMETER_VALUE", status: int | None = None):
        super().__init__(message)
        self.message = message
        self.error_code = error_code
        self.status = status  # only where HTTP says more than MLflow's code does (e.g. 413)


def invalid(message: str) -> RunyardError:
    return RunyardError(message, "INVALID_PARAMETER_VALUE")


def not_found(message: str) -> RunyardError:
    return RunyardError(message, "RESOURCE_DOES_NOT_EXIST")


def already_exists(message: str) -> RunyardError:
    return RunyardError(message, "RESOURCE_ALREADY_EXISTS")
