"""The pieces of backpressure and quotas (logbroker/server/quotas.py), without a broker: the token bucket's
throttle times, per-client quotas and their defaults, the in-flight bound's waiting line, the disk floor, and
how the settings are read."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from logbroker.server import errors
from logbroker.server.cli import build_parser
from logbroker.server.config import BrokerConfigError, load_config, parse_client_quota
from logbroker.server.quotas import (
    FETCH,
    MAX_THROTTLE_S,
    PRODUCE,
    Backpressure,
    ClientQuota,
    ClientQuotas,
    DiskGuard,
    InflightBudget,
    InflightFull,
    client_id_of,
    quotas_from,
)


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def test_a_client_within_its_rate_is_not_throttled_and_one_over_it_waits_out_the_excess() -> None:
    clock = FakeClock()
    quotas = ClientQuotas(ClientQuota(), {"slow": ClientQuota(produce_bytes_per_s=1000)}, clock)
    assert quotas.charge("slow", PRODUCE, 1000) == 0  # the one-second burst
    assert quotas.charge("slow", PRODUCE, 500) == pytest.approx(0.5)  # 500 bytes over a 1000 B/s rate
    assert quotas.debt_s("slow", PRODUCE) == pytest.approx(0.5)
    clock.now_s += 0.5
    assert quotas.debt_s("slow", PRODUCE) == 0  # paid back at the quota's rate
    assert quotas.charge("slow", FETCH, 10**9) == 0  # no fetch quota: fetches are never throttled
    assert quotas.charge("other", PRODUCE, 10**9) == 0  # the default is unlimited


def test_a_huge_debt_is_answered_with_at_most_the_largest_throttle_and_paid_back_over_time() -> None:
    clock = FakeClock()
    quotas = ClientQuotas(ClientQuota(produce_bytes_per_s=100), {}, clock)
    assert quotas.charge("anyone", PRODUCE, 100 + 100 * 60) == MAX_THROTTLE_S  # a minute's worth over
    clock.now_s += MAX_THROTTLE_S
    assert quotas.debt_s("anyone", PRODUCE) == MAX_THROTTLE_S  # fifty seconds of debt remain
    clock.now_s += 50
    assert quotas.debt_s("anyone", PRODUCE) == 0


def test_the_default_quota_applies_to_each_client_id_on_its_own() -> None:
    clock = FakeClock()
    quotas = ClientQuotas(ClientQuota(fetch_bytes_per_s=1000), {}, clock)
    assert quotas.charge("a", FETCH, 1500) == pytest.approx(0.5)
    assert quotas.charge("b", FETCH, 1000) == 0  # b has a bucket of its own


def test_a_client_entry_naming_one_rate_keeps_the_default_of_the_other(tmp_path: Path) -> None:
    config = load_config(None, {"data_dir": tmp_path, "quota_fetch_bytes_per_s": 7,
                                "client_quotas": {"billing": {"produce_bytes_per_s": 5}}})
    quotas = quotas_from(config)
    assert quotas.quota_of("billing") == ClientQuota(produce_bytes_per_s=5, fetch_bytes_per_s=7)
    assert quotas.quota_of("someone") == ClientQuota(produce_bytes_per_s=0, fetch_bytes_per_s=7)


def test_client_quotas_come_from_the_file_and_the_flags_and_a_flag_wins(tmp_path: Path) -> None:
    config_file = tmp_path / "broker.toml"
    config_file.write_text('[client_quotas.billing]\nproduce_bytes_per_s = 10\n'
                           '[client_quotas.reports]\nfetch_bytes_per_s = 20\n')
    args = build_parser().parse_args(["serve", "--client-quota", "billing:produce=30,fetch=40",
                                      "--max-inflight-produce-bytes", "1048576"])
    assert args.client_quota == ["billing:produce=30,fetch=40"]
    config = load_config(config_file, {"data_dir": tmp_path, "client_quotas": dict([parse_client_quota(
        args.client_quota[0])]), "max_inflight_produce_bytes": args.max_inflight_produce_bytes})
    assert config.client_quotas == {"billing": {"produce_bytes_per_s": 30, "fetch_bytes_per_s": 40},
                                    "reports": {"fetch_bytes_per_s": 20}}
    assert config.max_inflight_produce_bytes == 1 << 20


@pytest.mark.parametrize("text", ["billing", "billing:produce", "billing:speed=5", ":produce=5", "b:produce=-1"])
def test_a_malformed_client_quota_flag_is_refused_with_an_example(text: str) -> None:
    with pytest.raises(BrokerConfigError, match="for example billing:produce=1048576"):
        parse_client_quota(text)


def test_a_client_id_with_a_colon_keeps_it() -> None:
    assert parse_client_quota("team:app:fetch=9") == ("team:app", {"fetch_bytes_per_s": 9})


def test_bad_backpressure_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BrokerConfigError, match="max_inflight_produce_bytes must be at least 1"):
        load_config(None, {"data_dir": tmp_path, "max_inflight_produce_bytes": 0})
    with pytest.raises(BrokerConfigError, match="client_quotas for 'x'"):
        load_config(None, {"data_dir": tmp_path, "client_quotas": {"x": {"produce_rate": 1}}})


def test_the_client_id_is_read_from_the_call_metadata() -> None:
    assert client_id_of((("user-agent", "grpc"), ("client-id", "billing"))) == "billing"
    assert client_id_of(None) == ""


async def test_requests_past_the_in_flight_bound_wait_in_order_until_room_is_freed() -> None:
    budget = InflightBudget(limit_bytes=100)
    assert await budget.acquire(60, wait_s=1) == 0
    second = asyncio.ensure_future(budget.acquire(60, wait_s=5))
    third = asyncio.ensure_future(budget.acquire(10, wait_s=5))  # would fit, but waits its turn behind second
    await asyncio.sleep(0.05)
    assert not second.done() and not third.done() and budget.waiting == 2
    budget.release(60)
    assert await second > 0 and await third > 0
    assert budget.used_bytes == 70 and budget.waiting == 0


async def test_a_request_that_finds_no_room_in_time_gives_up_and_lets_the_next_one_in() -> None:
    budget = InflightBudget(limit_bytes=100)
    await budget.acquire(90, wait_s=1)
    with pytest.raises(TimeoutError):
        await budget.acquire(50, wait_s=0.05)
    assert budget.waiting == 0 and budget.used_bytes == 90
    assert await budget.acquire(10, wait_s=0.05) == 0


async def test_a_request_larger_than_the_bound_goes_alone() -> None:
    budget = InflightBudget(limit_bytes=100)
    assert await budget.acquire(500, wait_s=0.05) == 0
    budget.release(500)
    assert budget.used_bytes == 0


async def test_a_produce_that_waited_for_room_is_answered_with_a_throttle_time_and_one_that_did_not_is_not() -> None:
    pressure = Backpressure(ClientQuotas(ClientQuota(), {}), inflight_limit_bytes=100, produce_wait_s=5, node_id=1)
    async with pressure.produce("a", 80, timeout_s=30) as quick:
        waiting = asyncio.ensure_future(_produce_once(pressure, 80))
        await asyncio.sleep(0.1)
    assert quick.throttle_ms == 0
    assert await waiting >= 90  # it waited about 0.1 s for the first one to be answered


async def _produce_once(pressure: Backpressure, size: int) -> int:
    async with pressure.produce("b", size, timeout_s=30) as ticket:
        pass
    return ticket.throttle_ms


async def test_a_produce_with_no_room_within_the_wait_is_refused_as_retriable_naming_the_setting() -> None:
    pressure = Backpressure(ClientQuotas(ClientQuota(), {}), inflight_limit_bytes=100, produce_wait_s=0.05,
                            node_id=3)
    async with pressure.produce("a", 100, timeout_s=30):
        with pytest.raises(InflightFull, match="broker 3 .* max_inflight_produce_bytes") as full:
            await _produce_once(pressure, 10)
    assert full.value.code == errors.RequestTimedOut.code and full.value.throttle_s == 0.05


def test_the_disk_floor_refuses_a_produce_naming_the_partition_and_what_to_do(tmp_path: Path) -> None:
    free = {"bytes": 50 << 20}
    guard = DiskGuard(tmp_path, 100 << 20, free_bytes=lambda path: free["bytes"])
    with pytest.raises(errors.StorageFailure, match=r"orders-2: refused, .* 50\.0 MiB free, below .*"
                                                    r"min_free_disk_bytes=100\.0 MiB.*retention\.bytes"):
        guard.check("orders", 2)
    DiskGuard(tmp_path, 0, free_bytes=lambda path: 0).check("orders", 2)  # no floor: never refused
