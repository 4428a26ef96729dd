"""The one error registry (logbroker_client/error_codes.py) and the four places that use it agree: the wire
codes of the gRPC port, the Kafka codes of the Kafka port, the clients' exception classes and their retries,
and the names the broker's own exceptions carry."""

from __future__ import annotations

import pytest
from kio.schema.errors import ErrorCode
from logbroker_client import errors
from logbroker_client import records as rec
from logbroker_client.error_codes import ERRORS, spec_for_code
from logbroker_client.proto import logbroker_pb2 as pb

from logbroker.groups import classic  # noqa: F401  (its GroupError subclasses are checked once imported)
from logbroker.groups import errors as group_errors
from logbroker.kafka.errors import KAFKA_CODES, kafka_error
from logbroker.server import errors as broker_errors

WIRE_CODES = [name for name in pb.ErrorCode.keys() if name != "NONE"]  # noqa: SIM118  (an enum wrapper, not a dict)


def subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *subclasses(sub)]
    return found


@pytest.mark.parametrize("name", WIRE_CODES)
def test_every_wire_code_has_an_entry_and_a_client_class_that_retries_as_it_says(name: str) -> None:
    spec = ERRORS[name]
    raised = errors.error_for(pb.ErrorCode.Value(name), f"{name} happened", "t", 0)
    assert raised.retriable == spec.retriable, f"{type(raised).__name__} retriable={raised.retriable}"
    assert str(raised) == f"{name} happened"


def test_every_entry_names_a_kafka_code_the_kafka_port_answers_with() -> None:
    assert set(KAFKA_CODES) == set(ERRORS)
    for name, spec in ERRORS.items():
        assert KAFKA_CODES[name] is ErrorCode[spec.kafka]


def test_the_brokers_and_the_coordinators_exceptions_carry_registered_names() -> None:
    for cls in subclasses(broker_errors.BrokerError):
        assert pb.ErrorCode.Name(cls.code) in ERRORS, cls
    for cls in [group_errors.GroupError, *subclasses(group_errors.GroupError)]:
        assert cls.code in ERRORS, cls


def test_a_broker_error_means_the_same_on_both_ports() -> None:
    failure = broker_errors.NotLeader("orders-0: broker 2 is not the leader", leader_id=3)
    assert kafka_error(failure)[0] is ErrorCode.not_leader_or_follower
    assert isinstance(errors.error_for(failure.code, failure.message), errors.NotLeaderError)


def test_an_unknown_code_from_a_newer_broker_is_not_retried() -> None:
    assert spec_for_code(9_999).name == "UNKNOWN_SERVER_ERROR"
    raised = errors.error_for(9_999, "")
    assert not raised.retriable and str(raised) == "UNKNOWN_SERVER_ERROR"


def test_the_codec_and_the_broker_answer_raise_one_corrupt_batch_class() -> None:
    assert rec.CorruptBatchError is errors.CorruptBatchError
    with pytest.raises(errors.CorruptBatchError):
        rec.validate_batch(b"\x00" * 70)
    assert isinstance(errors.error_for(pb.ErrorCode.CORRUPT_BATCH, "bad bytes"), ValueError)
