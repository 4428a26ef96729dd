"""Requests to a group's coordinator (synchronous): find it, call it, and find it again when it moved."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import grpc

from logbroker_client.connection import translate_rpc_error
from logbroker_client.errors import BrokerUnavailableError, LogbrokerError, NoBrokerAnsweredError
from logbroker_client.groups import (
    COORDINATOR_RETRY_BACKOFF_S,
    CoordinatorCache,
    answer_error,
    coordinator_address,
    find_coordinator_request,
)
from logbroker_client.metadata import ClusterMetadata

ErrorReader = Callable[[Any], LogbrokerError | None]


def remaining_s(deadline: float) -> float:
    """What is left until deadline (a little at least, so a last attempt is still made)."""
    return max(0.05, deadline - time.monotonic())


def gives_up(exc: LogbrokerError, deadline: float) -> bool:
    """Whether a failed attempt is final: not worth retrying, the whole cluster is silent, or time is up."""
    return (not exc.retriable or isinstance(exc, NoBrokerAnsweredError)
            or time.monotonic() + COORDINATOR_RETRY_BACKOFF_S >= deadline)


class Coordinators:
    """Thread-safe enough for a consumer's heartbeat thread and its caller: the cache is a dict of strings."""

    def __init__(self, metadata: ClusterMetadata) -> None:
        self._metadata = metadata
        self._cache = CoordinatorCache()

    def address(self, group_id: str, deadline: float) -> str:
        """The coordinator's HOST:PORT, asking any broker (retried while the group's partition has no leader;
        the first request of a cluster creates __consumer_offsets, which takes a moment)."""
        cached = self._cache.get(group_id)
        if cached is not None:
            return cached
        while True:
            try:
                response = self._metadata.call("FindCoordinator", find_coordinator_request(group_id),
                                               service="groups", attempt_timeout_s=remaining_s(deadline))
                address = coordinator_address(response, group_id)
            except LogbrokerError as exc:
                if gives_up(exc, deadline):
                    raise
                time.sleep(COORDINATOR_RETRY_BACKOFF_S)
                continue
            self._cache.remember(group_id, address)
            return address

    def forget(self, group_id: str) -> None:
        self._cache.forget(group_id)

    def call_once(self, group_id: str, method: str, request: Any, timeout_s: float,
                  errors: ErrorReader = answer_error) -> Any:
        """One attempt at the coordinator; raises the answer's error (typed). A coordinator that moved or does
        not answer is forgotten, so the next attempt looks it up again."""
        deadline = time.monotonic() + timeout_s
        address = self.address(group_id, deadline)
        try:
            response = getattr(self._metadata.connection(address).groups, method)(
                request, timeout=remaining_s(deadline))
        except grpc.RpcError as exc:
            raise call_failed(self, self._metadata, group_id, address, exc) from None
        return checked_answer(self, group_id, response, errors)

    def call(self, group_id: str, method: str, request: Any, errors: ErrorReader = answer_error,
             timeout_s: float | None = None) -> Any:
        """Attempts until one succeeds, fails for good, or the request timeout passes."""
        deadline = time.monotonic() + (self._metadata.request_timeout_s if timeout_s is None else timeout_s)
        while True:
            try:
                return self.call_once(group_id, method, request, deadline - time.monotonic(), errors)
            except LogbrokerError as exc:
                if gives_up(exc, deadline):
                    raise
                time.sleep(COORDINATOR_RETRY_BACKOFF_S)


class _Forgetting(Protocol):
    def forget(self, group_id: str) -> None: ...


class _MarksUnreachable(Protocol):
    def mark_unreachable(self, address: str) -> None: ...


def call_failed(coordinators: _Forgetting, metadata: _MarksUnreachable, group_id: str, address: str,
                exc: grpc.RpcError) -> LogbrokerError:
    """The typed error of a coordinator call that failed on the wire; an unreachable broker is marked, and a
    coordinator worth looking up again is forgotten (the sync and async clients share this)."""
    error = translate_rpc_error(exc, address)
    if isinstance(error, BrokerUnavailableError):
        metadata.mark_unreachable(address)
    if error.retriable:
        coordinators.forget(group_id)
    return error


def checked_answer(coordinators: _Forgetting, group_id: str, response: Any, errors: ErrorReader) -> Any:
    """The response, or its refusal raised (typed); a coordinator that moved is forgotten."""
    refusal = errors(response)
    if refusal is not None:
        if refusal.retriable:
            coordinators.forget(group_id)
        raise refusal
    return response
