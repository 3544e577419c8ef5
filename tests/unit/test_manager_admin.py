"""The manager's admin calls that decide before touching any worker (no processes)."""
import pathlib

import pytest

from manager_svc.manager import Manager
from roundhouse import catalogue
from roundhouse.errors import ModelNotFound, ModelPinned

pytestmark = pytest.mark.unit

CAT = catalogue.from_mapping(
    {"models": [{"name": "m", "aliases": ["chat"], "path": "nowhere", "max_model_len": 64, "pinned": True, "default_max_tokens": 8}]},
    pathlib.Path("/"),
)


async def test_evicting_a_pinned_model_is_refused_by_name_or_alias():
    manager = Manager(CAT, "nats://unused")
    for name in ("m", "chat"):
        with pytest.raises(ModelPinned, match="unpin it first"):
            await manager.evict_by_hand(name)


async def test_unknown_model_is_not_found():
    with pytest.raises(ModelNotFound):
        Manager(CAT, "nats://unused").entry("other")
