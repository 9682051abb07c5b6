"""Config: file < environment < flag, and errors that name where the bad value came from."""

from ipaddress import ip_network

import pytest

from bastion.config import Config, load_config, render_config, split_listen
from bastion.errors import ConfigError


def test_defaults_when_home_is_empty(tmp_path):
    config = load_config(tmp_path, environ={})
    assert config.listen == "0.0.0.0:22"
    assert ip_network("10.0.0.0/8") in config.internal_networks
    assert config.home == tmp_path


def test_default_home_comes_from_environment(tmp_path):
    assert load_config(None, environ={"BASTION_HOME": str(tmp_path)}).home == tmp_path


def test_file_then_environment_then_flag(tmp_path):
    (tmp_path / "config.toml").write_text('listen = "127.0.0.1:2222"\nconnect_timeout = 3\nmax_auth_tries = 2\n')
    env = {"BASTION_CONNECT_TIMEOUT": "4", "BASTION_LISTEN": "127.0.0.1:2223"}
    config = load_config(tmp_path, overrides={"listen": "127.0.0.1:2224"}, environ=env)
    assert config.listen == "127.0.0.1:2224"
    assert config.connect_timeout == 4.0
    assert config.max_auth_tries == 2


def test_rendered_config_loads_back_equal(tmp_path):
    config = Config(home=tmp_path, listen="[::]:2200", connect_timeout=7,
                    penalty_exempt=(ip_network("10.0.0.0/8"), ip_network("2001:db8::/32")))
    (tmp_path / "config.toml").write_text(render_config(config))
    assert load_config(tmp_path, environ={}) == config


@pytest.mark.parametrize(
    "text, message",
    [
        ("listen = 22\n", "listen must be a string"),
        ('listen = "nowhere"\n', "must be HOST:PORT"),
        ('internal_networks = ["10.0.0.1/8"]\n', "internal_networks"),
        ('penalty_exempt = ["10.0.0.0/33"]\n', "penalty_exempt"),
        ("max_auth_tries = 0\n", "max_auth_tries must be a whole number"),
        ("connect_timeout = -1\n", "connect_timeout must be a number of seconds"),
        ("colour = 1\n", "unknown key 'colour'"),
        ('event_loop = "trio"\n', "event_loop must be one of uvloop, asyncio"),
        ("listen = \n", "invalid TOML"),
    ],
)
def test_bad_file_names_file_and_key(tmp_path, text, message):
    (tmp_path / "config.toml").write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path, environ={})
    assert str(tmp_path / "config.toml") in str(error.value)
    assert message in str(error.value)


def test_bad_environment_names_the_variable(tmp_path):
    with pytest.raises(ConfigError, match="environment BASTION_MAX_AUTH_TRIES"):
        load_config(tmp_path, environ={"BASTION_MAX_AUTH_TRIES": "many"})


@pytest.mark.parametrize(
    "text, expected",
    [("0.0.0.0:22", ("0.0.0.0", 22)), ("[::]:2222", ("::", 2222)), (":2222", ("0.0.0.0", 2222))],
)
def test_split_listen(text, expected):
    assert split_listen(text) == expected


@pytest.mark.parametrize("text", ["host", "host:", "host:99999", "host:-1"])
def test_split_listen_rejects(text):
    with pytest.raises(ValueError):
        split_listen(text)
