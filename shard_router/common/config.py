"""One typed configuration, read from flags with environment fallbacks.

Every setting has a flag and an ``INVENTORY_*`` variable; flags win. Processes started by
``inventory up`` get theirs as flags, so ``ps`` shows how each one runs. Every ``--help``
shows each option's default (``HelpFormatter``); a default read from the environment is
shown as it is, so ``--help`` tells what a run would use.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

ENVIRONMENT_PREFIX = "INVENTORY_"


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """How a process checks its callers (DESIGN section 12; shard_router.common.auth)."""

    # The JWKS file of the keys that verify callers' tokens, read again when it changes.
    keys_path: str = ""
    # Serve every caller without a token: an explicit choice, warned about at start.
    no_auth: bool = False

    def problem(self) -> str | None:
        """Why this configuration cannot run, in one line naming the flags."""
        if self.no_auth and self.keys_path:
            return "--auth-keys and --no-auth contradict each other"
        if not self.no_auth and not self.keys_path:
            return (
                "callers must be authenticated: pass --auth-keys JWKS_FILE (inventory up makes "
                "one), or --no-auth to serve every caller without a token"
            )
        return None


# One trace in a hundred of those that start here: a sampled reservation's spans cost the
# servers about as much again as the call (shard_router.common.tracing), so this is ~1-2 %.
TRACE_SAMPLE_RATIO_DEFAULT = 0.01


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """Where this process's spans go (DESIGN section 12; shard_router.common.tracing)."""

    # The OTLP collector (gRPC), e.g. http://127.0.0.1:4317; none: tracing off (no provider,
    # no exporter, no span).
    otlp_endpoint: str = ""
    # The share of the traces that start here (a call that arrives without a trace) that are
    # recorded; a call that arrives with one follows its caller's decision (parent-based).
    sample_ratio: float = TRACE_SAMPLE_RATIO_DEFAULT


@dataclass(frozen=True, slots=True)
class ServerTLSConfig:
    """How a server is reached (shard_router.common.tls): plaintext without a certificate;
    TLS with one; mutual TLS when callers' certificates must chain to ``client_ca_path``."""

    cert_path: str = ""
    key_path: str = ""
    client_ca_path: str = ""

    def problem(self) -> str | None:
        """Why this configuration cannot run, in one line naming the flags."""
        if bool(self.cert_path) != bool(self.key_path):
            return "--tls-cert and --tls-key go together"
        if self.client_ca_path and not self.cert_path:
            return "--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key"
        return None


@dataclass(frozen=True, slots=True)
class ChannelTLSConfig:
    """How a caller reaches a server (shard_router.common.tls): plaintext without a CA; TLS
    trusting the servers whose certificates chain to ``ca_path``; presenting a certificate
    of its own (``cert_path``, ``key_path``) to a server that asks for one (mutual TLS)."""

    ca_path: str = ""
    cert_path: str = ""
    key_path: str = ""
    # The flags that set the three paths, for messages.
    flags: tuple[str, str, str] = ("tls ca_path", "tls cert_path", "tls key_path")

    def problem(self) -> str | None:
        ca, cert, key = self.flags
        if bool(self.cert_path) != bool(self.key_path):
            return f"{cert} and {key} go together"
        if self.cert_path and not self.ca_path:
            return f"{cert} (mutual TLS) needs {ca}: the CA the server's certificate chains to"
        return None


@dataclass(frozen=True, slots=True)
class ShardConfig:
    shard_id: str
    listen: str
    database_url: str
    partition_count: int
    log_level: str
    # The address others reach this shard at (default: the listen host and bound port).
    advertise: str = ""
    # A shard whose heartbeat is older than this is considered dead and its partitions move.
    # Must exceed a few heartbeat periods (0.5 s) plus a database hiccup.
    membership_lease_s: float = 3.0
    # Where availability changes are published (streams + read view); none: not published.
    redis_url: str = ""
    # The period of the structured stats line (throughput, flushes, loop stalls, gauges).
    stats_interval_s: float = 10.0
    # A checkpoint at least this often while anything changed (OwnerLimits).
    checkpoint_interval_s: float = 30.0
    # A location none of whose feeds is heard from for this long is stale (OwnerLimits).
    feed_stale_after_s: float = 300.0
    auth: AuthConfig = AuthConfig()
    tls: ServerTLSConfig = ServerTLSConfig()
    tracing: TracingConfig = TracingConfig()
    # host:port of the Prometheus endpoint (GET /metrics); empty: none (common/metrics.py).
    metrics_listen: str = ""


@dataclass(frozen=True, slots=True)
class RouterConfig:
    listen: str
    database_url: str
    partition_count: int
    log_level: str
    membership_lease_s: float = 3.0
    # The read view and event streams (EVENTUAL reads, Watch); none: STRONG reads only.
    redis_url: str = ""
    stats_interval_s: float = 10.0
    # Hot keys (DESIGN section 10; shard_router/router/rebalancer.py and detector.py). The
    # rebalancer's period (0: none), and the detection: a key is split into this many
    # buckets past this many one-line reserves a second at this router (0: never split by
    # itself), measured over windows of this length, and merged after this many cool ones.
    rebalance_interval_s: float = 0.5
    hot_key_threshold_per_s: float = 1000.0
    hot_key_buckets: int = 3
    hot_key_window_s: float = 2.0
    hot_key_cool_windows: int = 30
    auth: AuthConfig = AuthConfig()
    # The token the router presents to the shards (a file, read again when it changes); the
    # shards check it as they check any caller's.
    shard_token_file: str = ""
    tls: ServerTLSConfig = ServerTLSConfig()
    # The router's hop to the shards: what it trusts and presents.
    shard_tls: ChannelTLSConfig = ChannelTLSConfig()
    tracing: TracingConfig = TracingConfig()
    metrics_listen: str = ""


# A help text that already names its default: "(default: x)", "Default: x", "; default x",
# "(default none)", or a required option's "(required unless ...)".
_SAYS_DEFAULT = re.compile(r"\(default\b|\bdefault:|; default\b|\(required\b", re.IGNORECASE)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already says it.

    Unlike argparse's own formatter this also covers options without a help text, shows an
    empty or absent default as ``none`` and a flag's as ``off``.
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        """Wrapped as argparse does, but never inside a word: a command stays copyable."""
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.fill(
            text,
            width,
            initial_indent=indent,
            subsequent_indent=indent,
            break_on_hyphens=False,
            break_long_words=False,
        )

    def _split_lines(self, text: str, width: int) -> list[str]:
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False)

    def _format_action(self, action: argparse.Action) -> str:
        if action.option_strings and not action.help and action.default is not argparse.SUPPRESS:
            action = copy.copy(action)  # argparse shows no help line at all without a text
            action.help = _default_text(action)
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").strip()
        if not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        if _SAYS_DEFAULT.search(text):
            return text
        return f"{text} {_default_text(action)}"


def _default_text(action: argparse.Action) -> str:
    if action.nargs == 0:  # store_true and the like
        return f"(default: {'on' if action.default else 'off'})"
    if action.default is None or action.default in ("", []):
        return "(default: none)"
    return "(default: %(default)s)"


def router_config(options: argparse.Namespace) -> RouterConfig:
    from inventory_core import PARTITION_COUNT

    return RouterConfig(
        listen=options.listen,
        database_url=options.database_url,
        partition_count=PARTITION_COUNT,
        log_level=options.log_level,
        membership_lease_s=options.membership_lease_s,
        redis_url=options.redis_url,
        stats_interval_s=options.stats_interval_s,
        rebalance_interval_s=options.rebalance_interval_s,
        hot_key_threshold_per_s=options.hot_key_threshold_per_s,
        hot_key_buckets=options.hot_key_buckets,
        hot_key_window_s=options.hot_key_window_s,
        hot_key_cool_windows=options.hot_key_cool_windows,
        auth=auth_config(options),
        shard_token_file=options.shard_token_file,
        tls=server_tls_config(options),
        shard_tls=channel_tls_config(options, SHARD_TLS_FLAGS),
        tracing=tracing_config(options),
        metrics_listen=options.metrics_listen,
    )


def add_router_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        default=env("ROUTER_LISTEN", "127.0.0.1:50051"),
        help="host:port of the public API [INVENTORY_ROUTER_LISTEN]",
    )
    add_database_argument(parser)
    add_redis_argument(parser)
    add_lease_argument(parser)
    add_log_level_argument(parser)
    add_stats_interval_argument(parser)
    add_hot_key_arguments(parser)
    add_auth_arguments(parser)
    add_tracing_arguments(parser)
    add_metrics_argument(parser)
    parser.add_argument(
        "--shard-token-file",
        default=env("SHARD_TOKEN_FILE", ""),
        help="a file holding the token (role router) the router presents to the shards, "
        "read again when it changes [INVENTORY_SHARD_TOKEN_FILE] (default: none: shards "
        "run with --no-auth)",
    )
    add_tls_arguments(parser)
    add_channel_tls_arguments(parser, SHARD_TLS_FLAGS, "the shards")


def add_hot_key_arguments(parser: argparse.ArgumentParser) -> None:
    """The router's hot keys: its rebalancer and its detection (DESIGN section 10)."""
    parser.add_argument(
        "--rebalance-interval-s",
        type=_non_negative_float,
        default=env("REBALANCE_INTERVAL_S", "0.5"),
        help="how often split keys' units are spread over their buckets; 0: never "
        "[INVENTORY_REBALANCE_INTERVAL_S]",
    )
    parser.add_argument(
        "--hot-key-threshold-per-s",
        type=_non_negative_float,
        default=env("HOT_KEY_THRESHOLD_PER_S", "1000"),
        help="one-line reserves a second of one key, at this router, that split it: 1000 "
        "is about a quarter of what one owner admits of one key on 2 cores (README); 0: "
        "split only by hand (HotKeys.SplitKey) [INVENTORY_HOT_KEY_THRESHOLD_PER_S]",
    )
    parser.add_argument(
        "--hot-key-buckets",
        type=int,
        choices=range(1, 16),
        metavar="1-15",
        default=int(env("HOT_KEY_BUCKETS", "3")),
        help="buckets besides the home of a key split by itself [INVENTORY_HOT_KEY_BUCKETS]",
    )
    parser.add_argument(
        "--hot-key-window-s",
        type=_positive_float,
        default=env("HOT_KEY_WINDOW_S", "2.0"),
        help="the window keys' rates are measured over [INVENTORY_HOT_KEY_WINDOW_S]",
    )
    parser.add_argument(
        "--hot-key-cool-windows",
        type=int,
        default=int(env("HOT_KEY_COOL_WINDOWS", "30")),
        help="windows in a row below a quarter of the threshold after which a split key "
        "merges back [INVENTORY_HOT_KEY_COOL_WINDOWS]",
    )


def add_auth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--auth-keys",
        default=env("AUTH_KEYS", ""),
        metavar="JWKS_FILE",
        help="the public keys (JWKS) that verify callers' tokens; the file is read again "
        "when it changes, so keys rotate without a restart [INVENTORY_AUTH_KEYS] (default: "
        "none: required unless --no-auth)",
    )
    add_no_auth_argument(parser, "(local experiments only; logged as a warning)")


def add_no_auth_argument(parser: argparse.ArgumentParser, more: str) -> None:
    parser.add_argument(
        "--no-auth",
        action="store_true",
        default=env("NO_AUTH", "") not in ("", "0", "false"),
        help=f"serve every caller without a token {more} [INVENTORY_NO_AUTH]",
    )


def add_metrics_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-listen",
        default=env("METRICS_LISTEN", ""),
        metavar="HOST:PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics [INVENTORY_METRICS_LISTEN] "
        "(default: none: no endpoint, nothing counted)",
    )


def auth_config(options: argparse.Namespace) -> AuthConfig:
    return AuthConfig(keys_path=options.auth_keys, no_auth=options.no_auth)


# TLS (shard_router.common.tls): a server's own certificate, and a caller's trust and
# certificate for one hop. Every file is read again when it changes (no restart).
SHARD_TLS_FLAGS = ("--shard-tls-ca", "--shard-tls-cert", "--shard-tls-key")
CLIENT_TLS_FLAGS = ("--tls-ca", "--tls-client-cert", "--tls-client-key")


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """A server's own certificate, and the CAs of its callers' (mutual TLS)."""
    _add_pem_arguments(
        parser,
        (
            (
                "--tls-cert",
                "this server's certificate (chain); with --tls-key it speaks TLS only",
                " (default: none: plaintext)",
            ),
            ("--tls-key", "the private key of --tls-cert", ""),
            (
                "--tls-client-ca",
                "mutual TLS: callers must present a certificate that chains to these CAs",
                " (default: none: no client certificate asked for)",
            ),
        ),
    )


def add_channel_tls_arguments(
    parser: argparse.ArgumentParser, flags: tuple[str, str, str], server: str
) -> None:
    """The three flags of one caller's hop (``flags``: the CA's, the cert's, the key's)."""
    texts = (
        (f"TLS to {server}: the CAs to trust", " (default: none: plaintext)"),
        (f"mutual TLS: the certificate presented to {server}", ""),
        ("the private key of that certificate", ""),
    )
    _add_pem_arguments(parser, [(flag, *text) for flag, text in zip(flags, texts, strict=True)])


def _add_pem_arguments(
    parser: argparse.ArgumentParser, flags: Sequence[tuple[str, str, str]]
) -> None:
    """A PEM file's path per (flag, help, default's text); its variable named after it."""
    for flag, text, default in flags:
        variable = flag.removeprefix("--").replace("-", "_").upper()
        parser.add_argument(
            flag,
            default=env(variable, ""),
            metavar="PEM_FILE",
            help=f"{text} [{ENVIRONMENT_PREFIX}{variable}]{default}",
        )


def server_tls_config(options: argparse.Namespace) -> ServerTLSConfig:
    return ServerTLSConfig(options.tls_cert, options.tls_key, options.tls_client_ca)


def channel_tls_config(
    options: argparse.Namespace, flags: tuple[str, str, str]
) -> ChannelTLSConfig:
    ca, cert, key = (getattr(options, f.removeprefix("--").replace("-", "_")) for f in flags)
    return ChannelTLSConfig(ca, cert, key, flags)


def add_tracing_arguments(parser: argparse.ArgumentParser) -> None:
    """Traces (shard_router.common.tracing): off unless a collector is named."""
    parser.add_argument(
        "--otlp-endpoint",
        default=env("OTLP_ENDPOINT", os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")),
        metavar="URL",
        help="the OpenTelemetry collector (OTLP over gRPC, e.g. http://127.0.0.1:4317) that "
        "receives this process's spans [INVENTORY_OTLP_ENDPOINT, else the standard "
        "OTEL_EXPORTER_OTLP_ENDPOINT] (default: none: tracing off)",
    )
    parser.add_argument(
        "--trace-sample-ratio",
        type=_ratio,
        default=env("TRACE_SAMPLE_RATIO", str(TRACE_SAMPLE_RATIO_DEFAULT)),
        help="the share of the traces started here that are recorded; a call that comes with "
        "a trace follows its caller's choice [INVENTORY_TRACE_SAMPLE_RATIO]",
    )


def tracing_config(options: argparse.Namespace) -> TracingConfig:
    return TracingConfig(
        otlp_endpoint=options.otlp_endpoint.strip(), sample_ratio=options.trace_sample_ratio
    )


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, got {text}")
    return value


def add_redis_argument(parser: argparse.ArgumentParser, embedded: bool = False) -> None:
    if env("REDIS_URL", ""):
        shown = "(default: from INVENTORY_REDIS_URL)"  # never print a password
    elif embedded:
        shown = "(default: an embedded Redis with its data in DATA_DIR/redis)"
    else:
        shown = "(default: none: no events, STRONG reads only)"
    parser.add_argument(
        "--redis-url",
        default=env("REDIS_URL", ""),
        help=f"Redis for availability events and the read view [INVENTORY_REDIS_URL] {shown}",
    )


def add_lease_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--membership-lease-s",
        type=float,
        default=env("MEMBERSHIP_LEASE_S", "3.0"),  # a string default goes through `type`
        help="heartbeat age after which a shard counts as dead [INVENTORY_MEMBERSHIP_LEASE_S]",
    )


def add_log_level_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default=env("LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="level of the JSON logs [INVENTORY_LOG_LEVEL]",
    )


def add_stats_interval_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stats-interval-s",
        type=_positive_float,
        default=env("STATS_INTERVAL_S", "10.0"),
        help="period of the JSON stats line (throughput, flushes, worst loop stall) "
        "[INVENTORY_STATS_INTERVAL_S]",
    )


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def env(name: str, default: str) -> str:
    return os.environ.get(ENVIRONMENT_PREFIX + name, default)


def add_shard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shard-id",
        default=env("SHARD_ID", "shard-0"),
        help="stable identity of this shard on the ring [INVENTORY_SHARD_ID]",
    )
    parser.add_argument(
        "--listen",
        default=env("LISTEN", "127.0.0.1:50061"),
        help="host:port to serve gRPC on [INVENTORY_LISTEN]",
    )
    parser.add_argument(
        "--advertise",
        default=env("ADVERTISE", ""),
        help="address routers use to reach this shard [INVENTORY_ADVERTISE] "
        "(default: the --listen host and the bound port)",
    )
    add_lease_argument(parser)
    add_database_argument(parser)
    add_redis_argument(parser)
    add_log_level_argument(parser)
    add_stats_interval_argument(parser)
    add_auth_arguments(parser)
    add_tls_arguments(parser)
    add_tracing_arguments(parser)
    add_metrics_argument(parser)
    parser.add_argument(
        "--checkpoint-interval-s",
        type=_positive_float,
        default=env("CHECKPOINT_INTERVAL_S", "30.0"),
        help="checkpoint at least this often while anything changed; also every 20,000 "
        "records, which bounds the ledger tail a recovery replays "
        "[INVENTORY_CHECKPOINT_INTERVAL_S]",
    )
    parser.add_argument(
        "--feed-stale-after-s",
        type=_positive_float,
        default=env("FEED_STALE_AFTER_S", "300.0"),
        help="a location none of whose feeds (events or heartbeats) is heard from for this "
        "long is stale: shoppers see its availability degraded until a feed is heard from "
        "again. Heartbeats are recorded at most once a minute, so below 120 s a gateway "
        "that only sends heartbeats goes stale between them [INVENTORY_FEED_STALE_AFTER_S]",
    )


def add_database_argument(
    parser: argparse.ArgumentParser, required: bool = True, embedded: bool = False
) -> None:
    if env("DATABASE_URL", ""):
        shown = "(default: from INVENTORY_DATABASE_URL)"  # never print a password
    elif embedded:
        shown = "(default: an embedded PostgreSQL with its data in DATA_DIR/postgres)"
    else:
        shown = "(required unless INVENTORY_DATABASE_URL is set)" if required else ""
    parser.add_argument(
        "--database-url",
        default=env("DATABASE_URL", ""),
        required=required and not env("DATABASE_URL", ""),
        help=f"PostgreSQL DSN [INVENTORY_DATABASE_URL] {shown}".strip(),
    )


def shard_config(options: argparse.Namespace) -> ShardConfig:
    from inventory_core import PARTITION_COUNT

    return ShardConfig(
        shard_id=options.shard_id,
        listen=options.listen,
        database_url=options.database_url,
        partition_count=PARTITION_COUNT,
        log_level=options.log_level,
        advertise=options.advertise,
        membership_lease_s=options.membership_lease_s,
        redis_url=options.redis_url,
        stats_interval_s=options.stats_interval_s,
        checkpoint_interval_s=options.checkpoint_interval_s,
        feed_stale_after_s=options.feed_stale_after_s,
        auth=auth_config(options),
        tls=server_tls_config(options),
        tracing=tracing_config(options),
        metrics_listen=options.metrics_listen,
    )
