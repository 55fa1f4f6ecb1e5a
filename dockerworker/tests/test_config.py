"""Configuration from the environment: the contract's names suffice, extras are checked."""

from __future__ import annotations

import logging

import pytest

from dockerworker.config import ConfigError, load

WORKER_ID = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
CONTRACT_ONLY = {
    "WORKER_ID": WORKER_ID,
    "AMQP_HOST": "amqp://guest:guest@mq:5672",
    "AMQP_XCHG": "pipeline.messages",
    "CODE_URL": f"http://userworkers:3000/{WORKER_ID}/source",
    "CODE_ENTRYPOINT": "main.main",
    "ENDPOINT_DEVICES": "http://core:3000/devices",
}


def test_the_contract_names_alone_give_a_working_configuration_with_defaults():
    config = load(CONTRACT_ONLY)

    assert config.worker_id == WORKER_ID
    assert config.queue == f"worker_{WORKER_ID}"
    assert config.routing_key == WORKER_ID
    assert config.exchange == "pipeline.messages"
    assert config.entrypoint == "main.main"
    assert config.devices_endpoint == "http://core:3000/devices"
    assert (config.health_port, config.prefetch, config.max_attempts) == (8080, 64, 5)
    assert config.code_sha256 is None and config.revision is None
    assert config.code_dir == "/tmp/usercode"
    assert config.process_timeout_s == 60.0


def test_the_extras_workerctl_adds_are_read():
    config = load(
        {
            **CONTRACT_ONLY,
            "WORKER_REVISION": "12",
            "CODE_SHA256": "AB" * 32,
            "WORKER_HEALTH_PORT": "9000",
            "WORKER_PREFETCH": "16",
            "WORKER_MAX_ATTEMPTS": "2",
            "WORKER_RETRY_DELAY_MS": "250",
            "WORKER_CODE_DIR": "/var/code",
            "WORKER_PROCESS_TIMEOUT_S": "0",
        }
    )

    assert config.revision == "12"
    assert config.code_sha256 == "ab" * 32
    assert (config.health_port, config.prefetch, config.max_attempts, config.retry_delay_ms) == (9000, 16, 2, 250)
    assert config.code_dir == "/var/code"
    assert config.process_timeout_s == 0  # no limit


def test_empty_values_count_as_unset():
    config = load({**CONTRACT_ONLY, "CODE_ENTRYPOINT": "", "AMQP_XCHG": "", "ENDPOINT_DEVICES": ""})

    assert (config.entrypoint, config.exchange, config.devices_endpoint) == ("main.main", "pipeline.messages", None)


def test_a_bare_broker_host_becomes_an_amqp_url():
    assert load({**CONTRACT_ONLY, "AMQP_HOST": "mq:5672"}).amqp_url == "amqp://guest:guest@mq:5672"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"WORKER_ID": ""}, "WORKER_ID must be set"),
        ({"WORKER_ID": "not-a-uuid"}, "WORKER_ID must be a UUID"),
        ({"AMQP_HOST": ""}, "AMQP_HOST must be set"),
        ({"AMQP_HOST": "http://mq"}, "amqp://"),
        ({"CODE_URL": ""}, "CODE_URL must be set"),
        ({"CODE_ENTRYPOINT": "nodot"}, "module.function"),
        ({"CODE_SHA256": "abc"}, "64 hex digits"),
        ({"WORKER_HEALTH_PORT": "http"}, "must be an integer"),
        ({"WORKER_PREFETCH": "0"}, "between 1"),
        ({"WORKER_SHUTDOWN_GRACE_S": "-1"}, "must not be negative"),
        ({"AMQP_XCHG": "pipeline messages\u00e9"}, "AMQP_XCHG must be at most 127"),
        ({"AMQP_XCHG": "x" * 128}, "AMQP_XCHG must be at most 127"),
    ],
)
def test_a_malformed_environment_is_a_config_error_that_names_the_variable(change, message):
    with pytest.raises(ConfigError, match=message):
        load({**CONTRACT_ONLY, **change})


def test_the_harness_does_not_need_a_code_url():
    env = {**CONTRACT_ONLY}
    del env["CODE_URL"]

    assert load(env, need_code_url=False).code_url is None


@pytest.mark.parametrize(
    "value, level", [(None, logging.INFO), ("debug", logging.DEBUG), ("WARNING", logging.WARNING), ("error", logging.ERROR)]
)
def test_the_log_level_is_named_and_info_by_default(value, level):
    env = {**CONTRACT_ONLY, **({"WORKER_LOG_LEVEL": value} if value else {})}

    assert load(env).log_level == level


def test_an_unknown_log_level_is_a_configuration_error():
    with pytest.raises(ConfigError, match="WORKER_LOG_LEVEL must be one of debug, info, warning, error"):
        load({**CONTRACT_ONLY, "WORKER_LOG_LEVEL": "verbose"})
