"""Every `data:` dataset of the reference configs resolves and accepts its params (or is named unpublished)."""
import inspect

import pytest
from omegaconf import OmegaConf

from ldm.util import ConfigError, get_obj_from_str
from tests.helpers.paths import REFERENCE_CONFIGS

REF = REFERENCE_CONFIGS


def _dataset_sections():
    for path in sorted(REF.rglob("*.yaml")):
        data = OmegaConf.to_container(OmegaConf.load(path)).get("data") or {}
        for split, section in (data.get("params") or {}).items():
            if isinstance(section, dict) and "target" in section:
                yield pytest.param(section["target"], section.get("params") or {},
                                   id=f"{path.relative_to(REF)}:{split}")


SECTIONS = list(_dataset_sections())


def test_the_reference_configs_have_data_sections():
    assert len(SECTIONS) >= 30


@pytest.mark.parametrize("target, params", SECTIONS)
def test_data_targets_resolve_and_accept_their_params(target, params):
    try:
        cls = get_obj_from_str(target)
    except ConfigError as e:
        assert "never published" in str(e)
        assert target.split(".")[2] in ("openimages", "previews", "landscapes")
        return
    assert cls.__module__.startswith("ldm.data.")
    inspect.signature(cls).bind(**params)  # raises TypeError on an unknown or missing parameter
