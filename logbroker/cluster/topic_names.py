"""Topic names and the limits on topics, checked before a topic reaches the controller."""

from __future__ import annotations

import re

MAX_TOPIC_NAME_LENGTH = 249
MAX_PARTITIONS = 10_000
_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


class TopicNameError(ValueError):
    pass


def check_topic_name(name: str) -> None:
    """Kafka's rule: 1-249 characters of [A-Za-z0-9._-], and not '.' or '..'."""
    if not name:
        raise TopicNameError("topic name is empty")
    if len(name) > MAX_TOPIC_NAME_LENGTH:
        raise TopicNameError(f"topic name is {len(name)} characters long; the limit is {MAX_TOPIC_NAME_LENGTH}")
    if name.startswith("__"):
        raise TopicNameError(f"topic name {name!r} starts with '__', which is reserved for internal topics")
    if name in (".", ".."):
        raise TopicNameError(f"topic name {name!r} is reserved")
    if not _TOPIC_NAME.match(name):
        raise TopicNameError(
            f"topic name {name!r} has characters outside [A-Za-z0-9._-]; use letters, digits, '.', '_' or '-'"
        )
