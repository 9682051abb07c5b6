import asyncio

import pytest

from bastion.service import event_loop
from bastion.config import Config, load_config, render_config


async def _running_loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


@pytest.mark.parametrize("name, module", [("uvloop", "uvloop"), ("asyncio", "asyncio.unix_events")])
def test_runs_on_the_named_loop(name, module):
    assert event_loop.run(_running_loop_module(), name) == module


def test_choice_survives_render_and_load(tmp_path):
    config = Config(home=tmp_path, event_loop="asyncio")
    (tmp_path / "config.toml").write_text(render_config(config))
    assert load_config(tmp_path, environ={}).event_loop == "asyncio"
    assert load_config(tmp_path, environ={"BASTION_EVENT_LOOP": "uvloop"}).event_loop == "uvloop"
