"""The topic catalogue: names, partition counts, replication factors and configs, kept on disk.

On one broker the catalogue is a JSON file replaced atomically (write, fsync, rename, fsync the
directory), so a crash leaves either the old or the new catalogue, never half of one.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

CATALOGUE_FILE = "topics.json"
CATALOGUE_VERSION = 1
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
    if name in (".", ".."):
        raise TopicNameError(f"topic name {name!r} is reserved")
    if not _TOPIC_NAME.match(name):
        raise TopicNameError(
            f"topic name {name!r} has characters outside [A-Za-z0-9._-]; use letters, digits, '.', '_' or '-'"
        )


@dataclass
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    configs: dict[str, str] = field(default_factory=dict)


class TopicStore:
    def __init__(self, data_dir: Path) -> None:
        self._path = data_dir / CATALOGUE_FILE
        self._topics: dict[str, TopicSpec] = {}
        if self._path.exists():
            self._topics = self._read()

    def _read(self) -> dict[str, TopicSpec]:
        try:
            doc = json.loads(self._path.read_text())
        except (OSError, ValueError) as exc:
            raise RuntimeError(
                f"topic catalogue {self._path} is unreadable ({exc}); restore it from a backup or remove it "
                "to start with no topics (partition data stays on disk)"
            ) from None
        return {t["name"]: TopicSpec(**t) for t in doc.get("topics", [])}

    def _write(self) -> None:
        doc = {"version": CATALOGUE_VERSION, "topics": [vars(t) for t in self._topics.values()]}
        tmp = self._path.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path)
        dir_fd = os.open(self._path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def __contains__(self, name: str) -> bool:
        return name in self._topics

    def get(self, name: str) -> TopicSpec | None:
        return self._topics.get(name)

    def all(self) -> list[TopicSpec]:
        return sorted(self._topics.values(), key=lambda t: t.name)

    def add(self, spec: TopicSpec) -> None:
        assert spec.name not in self._topics
        self._topics[spec.name] = spec
        self._write()

    def remove(self, name: str) -> None:
        del self._topics[name]
        self._write()
