"""proxy_protocol_from in the config (#22): CIDRs like penalty_exempt, off when empty, one-line errors that name
the file and key, and never every address."""

from ipaddress import ip_network

import pytest

from bastion.config import Config, load_config, render_config
from bastion.errors import ConfigError


def test_off_by_default_and_round_trips(tmp_path):
    assert load_config(tmp_path, environ={}).proxy_protocol_from == ()
    config = Config(home=tmp_path, proxy_protocol_from=(ip_network("10.0.0.5/32"), ip_network("fd00:1::/64")))
    (tmp_path / "config.toml").write_text(render_config(config))
    assert load_config(tmp_path, environ={}) == config


def test_environment_takes_a_comma_separated_list(tmp_path):
    config = load_config(tmp_path, environ={"BASTION_PROXY_PROTOCOL_FROM": "10.0.0.5/32, 10.0.0.6/32"})
    assert config.proxy_protocol_from == (ip_network("10.0.0.5/32"), ip_network("10.0.0.6/32"))


@pytest.mark.parametrize("text, words", [
    ('proxy_protocol_from = ["10.0.0.5/33"]\n', "network '10.0.0.5/33' is not valid"),
    ('proxy_protocol_from = ["10.0.0.5/24"]\n', "has host bits set"),
    ('proxy_protocol_from = "10.0.0.5/32"\n', None),  # one string is a list of one, as in the environment
    ("proxy_protocol_from = [5]\n", "must be a list of CIDR strings"),
    ('proxy_protocol_from = ["0.0.0.0/0"]\n', "must name the load balancers, not every address"),
    ('proxy_protocol_from = ["::/0"]\n', "must name the load balancers, not every address"),
])
def test_bad_values_name_the_file_and_key(tmp_path, text, words):
    (tmp_path / "config.toml").write_text(text)
    if words is None:
        assert load_config(tmp_path, environ={}).proxy_protocol_from == (ip_network("10.0.0.5/32"),)
        return
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path, environ={})
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'config.toml'}: proxy_protocol_from ") and words in message
    assert "\n" not in message
