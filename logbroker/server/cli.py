"""The `logbroker` command: `serve` runs one broker, `dev` runs a local cluster of broker processes."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import sys
from pathlib import Path

from logbroker_client.cli import package_version

from logbroker.server.config import BrokerConfigError, load_config, parse_client_quota, parse_peers
from logbroker.server.malloc_tuning import fix_mmap_threshold

DEV_BROKERS = 3
DEV_BASE_PORT = 9092
DEV_HOST = "127.0.0.1"
DEV_SECRET_FILE = "cluster.secret"


def _install_event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from logbroker.server.app import serve

    try:
        config = load_config(args.config, {
            "data_dir": args.data_dir, "listen": args.listen, "node_id": args.node_id,
            "peers": parse_peers(args.peers) if args.peers else None,
            "raft_listen": args.raft_listen, "raft_peers": parse_peers(args.raft_peers) if args.raft_peers else None,
            "advertised_peers": parse_peers(args.advertised_peers) if args.advertised_peers else None,
            "data_listen": args.data_listen, "raft_tick_ms": args.raft_tick_ms,
            "cluster_secret_file": args.cluster_secret_file,
            "kafka_listen": args.kafka_listen, "metrics_listen": args.metrics_listen,
            **backpressure_overrides(args),
        })
    except BrokerConfigError as exc:
        print(f"logbroker: {exc}", file=sys.stderr)
        return 2
    _install_event_loop_policy()
    fix_mmap_threshold()
    try:
        asyncio.run(serve(config))
    except OSError as exc:
        logging.getLogger("logbroker").error("%s", exc)
        return 1
    return 0


def backpressure_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The backpressure and quota flags given (None: not given, the config file or default stands)."""
    quotas = dict(parse_client_quota(text) for text in args.client_quota or ())
    return {"max_inflight_produce_bytes": args.max_inflight_produce_bytes,
            "min_free_disk_bytes": args.min_free_disk_bytes,
            "quota_produce_bytes_per_s": args.quota_produce_bytes_per_s,
            "quota_fetch_bytes_per_s": args.quota_fetch_bytes_per_s,
            "client_quotas": quotas or None}


def add_backpressure_flags(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--max-inflight-produce-bytes", type=int, metavar="BYTES",
                       help="bytes of produce requests handled at once; past it producers wait and are throttled "
                            "(default 128 MiB)")
    serve.add_argument("--min-free-disk-bytes", type=int, metavar="BYTES",
                       help="refuse produce requests while the data disk has less free space (default 100 MiB; "
                            "0: no floor)")
    serve.add_argument("--quota-produce-bytes-per-s", type=int, metavar="N",
                       help="default produce quota of every client id, per broker (default 0: unlimited)")
    serve.add_argument("--quota-fetch-bytes-per-s", type=int, metavar="N",
                       help="default fetch quota of every client id, per broker (default 0: unlimited)")
    serve.add_argument("--client-quota", action="append", metavar="ID:produce=N,fetch=N",
                       help="one client id's quotas in bytes per second (repeatable; wins over the defaults)")


def cmd_dev(args: argparse.Namespace) -> int:
    """Start `--brokers` broker processes on consecutive ports and supervise them until Ctrl-C or SIGTERM."""
    from logbroker.server.dev import DevCluster, dev_brokers

    if args.brokers < 1:
        print("logbroker dev: --brokers must be at least 1", file=sys.stderr)
        return 2
    data_dir = Path(args.data_dir).resolve()
    secret_file = dev_cluster_secret(data_dir)
    log_level = args.log_level if args.log_level.lower() != "info" else None
    brokers = dev_brokers(args.brokers, args.base_port, DEV_HOST, data_dir, secret_file, log_level)
    return DevCluster(brokers, restart=args.restart).run()


def dev_cluster_secret(data_dir: Path) -> Path:
    """The dev cluster's shared secret: made once, readable by this user only, kept with the data."""
    path = data_dir / DEV_SECRET_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32) + "\n")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="logbroker", description="logbroker: a Kafka-style log broker")
    parser.add_argument("--log-level", default=os.environ.get("LOGBROKER_LOG_LEVEL", "info"))
    parser.add_argument("--version", action="version", version=f"logbroker {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run one broker")
    serve.add_argument("--config", type=Path, help="TOML file; flags win over it")
    serve.add_argument("--data-dir", type=Path)
    serve.add_argument("--listen", help="HOST:PORT for clients (default 127.0.0.1:9092)")
    serve.add_argument("--node-id", type=int)
    serve.add_argument("--peers", help="every broker of the cluster, this one included: 1=HOST:PORT,2=HOST:PORT,...")
    serve.add_argument("--raft-listen", metavar="HOST:PORT",
                       help="HOST:PORT for the other brokers' Raft traffic (default: the --listen host, port + 300); "
                            "every broker's Raft port is its --peers port plus one offset, unless --raft-peers")
    serve.add_argument("--raft-peers", metavar="1=HOST:PORT,...",
                       help="every broker's Raft address, where the --peers port plus one offset does not give it")
    serve.add_argument("--advertised-peers", metavar="1=HOST:PORT,...",
                       help="every broker's address as clients are to reach it, where that is not its --peers "
                            "address (brokers behind a proxy or NAT from each other); default: --peers")
    serve.add_argument("--data-listen", metavar="HOST:PORT",
                       help="HOST:PORT for clients' produce and fetch as plain frames, faster than gRPC (default: "
                            "the --listen host, port + 400; 'off' for none); every broker's data port is its "
                            "--peers port plus one offset")
    serve.add_argument("--raft-tick-ms", type=int, help="Raft tick (default 50 ms; elections after 10-20 ticks)")
    serve.add_argument("--cluster-secret-file", type=Path,
                       help="file holding the secret every broker of the cluster shares (needed with --peers; "
                            "or set $LOGBROKER_CLUSTER_SECRET)")
    serve.add_argument("--kafka-listen", help="HOST:PORT for Kafka clients (off unless given); every broker's "
                                              "Kafka port must be its --listen port plus the same offset")
    serve.add_argument("--metrics-listen", metavar="HOST:PORT",
                       help="serve Prometheus metrics over HTTP at http://HOST:PORT/metrics (off unless given)")
    add_backpressure_flags(serve)
    serve.set_defaults(func=cmd_serve)
    dev = sub.add_parser("dev", help="run a local cluster of broker processes until Ctrl-C")
    dev.add_argument("--brokers", type=int, default=DEV_BROKERS)
    dev.add_argument("--data-dir", default="./data")
    dev.add_argument("--base-port", type=int, default=DEV_BASE_PORT)
    dev.add_argument("--no-restart", dest="restart", action="store_false",
                     help="leave a broker that dies down (default: restart it, at most 3 times a minute)")
    dev.set_defaults(func=cmd_dev)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.log_level)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
