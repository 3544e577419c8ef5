"""What every service's entry shares: the --event-loop flag and its env twin."""
import argparse

import pytest

from roundhouse import entry

pytestmark = pytest.mark.unit


def parser(env: dict[str, str], default: str = "asyncio") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="svc")
    entry.event_loop_flag(p, lambda name, d: env.get(name, d), default)
    return p


def test_the_flag_its_env_twin_and_the_service_default():
    assert parser({}).parse_args([]).event_loop == "asyncio"
    assert parser({}, "uvloop").parse_args([]).event_loop == "uvloop"
    assert parser({"EVENT_LOOP": "uvloop"}).parse_args([]).event_loop == "uvloop"
    assert parser({"EVENT_LOOP": "uvloop"}).parse_args(["--event-loop", "asyncio"]).event_loop == "asyncio"


@pytest.mark.parametrize("env, argv", [({}, ["--event-loop", "trio"]), ({"EVENT_LOOP": "uv-loop"}, [])])
def test_an_unknown_loop_is_refused_naming_the_choices(env, argv, capsys):
    with pytest.raises(SystemExit) as e:
        parser(env).parse_args(argv)
    assert e.value.code == 2
    assert "must be one of uvloop, asyncio" in capsys.readouterr().err
