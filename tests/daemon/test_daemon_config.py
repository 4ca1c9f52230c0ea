"""Configuration: flags over environment over defaults, and one-line errors."""

from __future__ import annotations

import pytest

from esper_telemetry import defaults as contract
from esper_telemetry.daemon.cli import main
from esper_telemetry.daemon.config import SETTINGS, Config, ConfigError, parse_args

# Every variable the daemon reads, as operators write them (deploy files, README).
VARIABLES = {
    "ESPER_ZMQ_LISTEN_ADDRESS",
    "ESPER_WEB_LISTEN_ADDRESS",
    "ESPER_ZMQ_MAX_MESSAGE_BYTES",
    "ESPER_ZMQ_RECEIVE_BUFFER_BYTES",
    "ESPER_ZMQ_CURVE_SECRET_KEY_FILE",
    "ESPER_ZMQ_CURVE_AUTHORIZED_KEYS_DIR",
    "ESPER_WEB_CONFIG_FILE",
    "ESPER_WEB_TELEMETRY_PATH",
    "ESPER_WEB_WRITE_TIMEOUT_SECONDS",
    "ESPER_WEB_MAX_CONNECTIONS",
    "ESPER_WEB_MAX_SERIES",
    "ESPER_RUN_TTL_SECONDS",
    "ESPER_RUN_ENDED_RETENTION_SECONDS",
    "ESPER_RUN_EVICT_AFTER_SECONDS",
    "ESPER_LIMITS_MAX_RUNS",
    "ESPER_LIMITS_MAX_GROUPS_PER_RUN",
    "ESPER_LIMITS_MAX_RANKS_PER_RUN",
    "ESPER_LIMITS_MEMORY_BYTES",
    "ESPER_QUEUE_SIZE",
    "ESPER_SHARD_WINDOW_SECONDS",
    "ESPER_SHUTDOWN_TIMEOUT_SECONDS",
    "ESPER_SHUTDOWN_LINGER_SECONDS",
    "ESPER_LOG_LEVEL",
    "ESPER_LOG_FORMAT",
    "ESPER_WINDOW_SECONDS",
    "ESPER_SPIKE_FACTOR",
}


def test_each_setting_is_one_row_whose_variable_is_named_after_its_flag():
    assert [row.env for row in SETTINGS if row.flag == "--limits.max-runs"] == [
        "ESPER_LIMITS_MAX_RUNS"
    ]
    assert {row.env for row in SETTINGS} == VARIABLES and len(SETTINGS) == len(VARIABLES)
    assert len({row.flag for row in SETTINGS}) == len(SETTINGS)


def test_defaults_are_the_rows_and_the_endpoints_are_the_contracts():
    c = parse_args([], environ={})
    assert c == Config()
    for row in SETTINGS:
        if not row.repeatable:
            assert getattr(c, row.name) == row.parse(row.default), row.flag
    # Where collectors connect and where top looks, by default, is where the daemon listens.
    assert c.zmq_listen_addresses == (contract.DEFAULT_ENDPOINT,)
    assert c.web_listen_address == ("127.0.0.1", contract.DEFAULT_WEB_PORT)
    assert c.telemetry_path == contract.DEFAULT_WEB_TELEMETRY_PATH
    # A collector's largest message is half what the daemon takes by default.
    assert c.zmq_max_message_bytes == 2 * contract.COLLECTOR_MESSAGE_BYTES
    assert c.zmq_max_message_bytes <= contract.MAX_MESSAGE_BYTES
    assert c.log_level == "info" and c.check_config is False


def test_environment_is_used_when_no_flag_and_flags_win():
    env = {
        "ESPER_ZMQ_LISTEN_ADDRESS": "tcp://0.0.0.0:7000, ipc:///tmp/x.sock",
        "ESPER_WEB_LISTEN_ADDRESS": ":9999",
        "ESPER_WEB_TELEMETRY_PATH": "/m",
        "ESPER_RUN_TTL_SECONDS": "12.5",
        "ESPER_LIMITS_MAX_RUNS": "7",
        "ESPER_LIMITS_MAX_GROUPS_PER_RUN": "8",
        "ESPER_LIMITS_MAX_RANKS_PER_RUN": "9",
        "ESPER_QUEUE_SIZE": "10",
        "ESPER_SHARD_WINDOW_SECONDS": "3",
        "ESPER_SHUTDOWN_TIMEOUT_SECONDS": "4",
        "ESPER_SHUTDOWN_LINGER_SECONDS": "5",
        "ESPER_LOG_LEVEL": "DEBUG",
    }
    c = parse_args([], environ=env)
    assert c.zmq_listen_addresses == ("tcp://0.0.0.0:7000", "ipc:///tmp/x.sock")
    assert (*c.web_listen_address, c.telemetry_path) == ("", 9999, "/m")
    assert (c.run_ttl_s, c.max_runs, c.max_groups_per_run, c.max_ranks_per_run) == (12.5, 7, 8, 9)
    assert (c.queue_size, c.shard_window_s, c.shutdown_timeout_s, c.shutdown_linger_s) == (
        10,
        3.0,
        4.0,
        5.0,
    )
    assert c.log_level == "debug"
    c = parse_args(
        [
            "--zmq.listen-address=tcp://127.0.0.1:1",
            "--zmq.listen-address",
            "tcp://[::1]:2",
            "--queue.size=99",
            "--web.listen-address=[::1]:80",
            "--log.level=warn",
        ],
        environ=env,
    )
    assert c.zmq_listen_addresses == ("tcp://127.0.0.1:1", "tcp://[::1]:2")
    assert (c.queue_size, *c.web_listen_address, c.log_level) == (99, "::1", 80, "warn")
    assert c.max_runs == 7  # not given as a flag: still the environment's


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--zmq.listen-address=udp://1.2.3.4:5"], "--zmq.listen-address"),
        (["--zmq.listen-address=tcp://host"], "--zmq.listen-address"),
        (["--zmq.listen-address=tcp://h:70000"], "port out of range"),
        (["--zmq.listen-address=tcp://h:1", "--zmq.listen-address=tcp://h:1"], "twice"),
        (["--web.listen-address=localhost"], "--web.listen-address"),
        (["--web.listen-address=::1:80"], "[ADDR]:PORT"),
        (["--web.telemetry-path=metrics"], "--web.telemetry-path"),
        (["--web.telemetry-path=/-/ready"], "--web.telemetry-path"),
        (["--run.ttl-seconds=0"], "--run.ttl-seconds"),
        (["--run.ttl-seconds=nan"], "--run.ttl-seconds"),
        (["--limits.max-runs=0"], "--limits.max-runs"),
        (["--queue.size=lots"], "--queue.size"),
        (["--log.level=loud"], "--log.level"),
        (["--no-such-flag"], "unrecognized"),
    ],
)
def test_invalid_configuration_is_one_clear_line(argv, needle, capsys):
    with pytest.raises(ConfigError) as exc:
        parse_args(argv, environ={})
    assert needle in str(exc.value) and "\n" not in str(exc.value)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "invalid configuration" in err


def test_check_config_exits_zero_without_binding(capsys):
    # The default ports may well be in use here: --check-config must not touch them.
    assert main(["--check-config", "--queue.size=5"]) == 0
    assert "valid" in capsys.readouterr().err


def test_bad_environment_is_reported_under_the_variable_name(monkeypatch, capsys):
    # The user wrote the variable, not the flag: the error must point at what they wrote.
    monkeypatch.setenv("ESPER_LIMITS_MAX_GROUPS_PER_RUN", "-3")
    assert main(["--check-config"]) == 2
    err = capsys.readouterr().err
    assert "ESPER_LIMITS_MAX_GROUPS_PER_RUN" in err and "--limits.max-groups-per-run" not in err


@pytest.mark.parametrize("argv", [["--web.listen-addres=:1"], ["--queue.siz=5"], ["--check"]])
def test_abbreviated_flags_are_refused(argv):
    with pytest.raises(ConfigError, match="unrecognized"):
        parse_args(argv, environ={})
