"""How long a new group coordinator takes to load 10,000 groups from a snapshot (CPU seconds; goal: under 1).

    python -m benchmarks.group_takeover

Each group has one member subscribed to a 4-partition topic and 4 committed offsets. The groups are made
through the coordinator itself, snapshotted, encoded into record batches as they would be stored, then
decoded and replayed into a fresh coordinator, which is what a broker taking over a partition of
__consumer_offsets does.
"""

from __future__ import annotations

import time

from benchmarks.common import emit
from logbroker.groups import records as r
from logbroker.groups.coordinator import GroupConfig, GroupCoordinatorShard, HeartbeatRequest

GROUPS = 10_000


def main() -> None:
    catalog = {f"t{i}": 4 for i in range(100)}
    shard = GroupCoordinatorShard(lambda: catalog, GroupConfig())
    for g in range(GROUPS):
        joined, _ = shard.heartbeat(HeartbeatRequest(f"g{g}", f"m{g}", 0, subscribed_topic_names=(f"t{g % 100}",),
                                                     full_request=True))
        shard.commit(f"g{g}", f"m{g}", joined.member_epoch, [(f"t{g % 100}", p, 100, "") for p in range(4)])
    batches = r.to_batches(shard.snapshot(), 1)
    started = time.process_time()
    fresh = GroupCoordinatorShard(lambda: catalog, GroupConfig())
    for payload, _ in batches:
        for record in r.from_batch(payload):
            fresh.replay(record)
    elapsed = time.process_time() - started
    assert len(fresh.groups) == GROUPS
    emit({"tool": "group_takeover", "groups": GROUPS, "snapshot_batches": len(batches),
          "snapshot_bytes": sum(len(b) for b, _ in batches), "load_cpu_s": round(elapsed, 3)})


if __name__ == "__main__":
    main()
