"""ldm.util: config instantiation and its error messages, and the small helpers."""
from __future__ import annotations

import pytest
import torch

from ldm import util
from ldm.util import ConfigError, config_source, get_obj_from_str, instantiate_from_config
from tests.helpers.objects import Base, Child


def test_builds_target_with_params_and_extra_arguments():
    obj = instantiate_from_config({"target": "tests.helpers.objects.Base", "params": {"width": 3}}, depth=5)
    assert isinstance(obj, Base) and (obj.width, obj.depth) == (3, 5)
    assert instantiate_from_config({"target": "tests.helpers.objects.make_pair", "params": {"first": 7}}) == (7, 2)


def test_special_targets_yield_none():
    assert instantiate_from_config("__is_first_stage__") is None
    assert instantiate_from_config("__is_unconditional__") is None


def test_missing_target_key_lists_the_keys():
    with pytest.raises(ConfigError, match=r"no 'target'.*params"):
        instantiate_from_config({"params": {"width": 1}})


def test_unknown_module_names_dotted_path_and_config_file(tmp_path):
    cfg = tmp_path / "model.yaml"
    cfg.write_text("model:\n  target: ldm.no_such_module.Thing\n")
    with config_source(cfg), pytest.raises(ConfigError) as e:
        instantiate_from_config({"target": "ldm.no_such_module.Thing"})
    assert "ldm.no_such_module.Thing" in str(e.value) and str(cfg) in str(e.value)


def test_unknown_attribute_suggests_close_names():
    with pytest.raises(ConfigError, match=r"has no attribute 'Chlid'.*did you mean Child"):
        get_obj_from_str("tests.helpers.objects.Chlid")


def test_not_a_dotted_path():
    with pytest.raises(ConfigError, match="not a dotted path"):
        get_obj_from_str("Base")


def test_unpublished_module_says_so():
    with pytest.raises(ConfigError, match="never published"):
        get_obj_from_str("ldm.data.openimages.FullOpenImagesTrain")


def test_wrong_key_names_key_class_and_closest_valid_names(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("target: tests.helpers.objects.Base\n")
    with config_source(cfg), pytest.raises(ConfigError) as e:
        instantiate_from_config({"target": "tests.helpers.objects.Base", "params": {"width": 1, "widht": 2}})
    msg = str(e.value)
    assert "params.widht" in msg and "'width'" in msg and "Base" in msg and str(cfg) in msg


def test_missing_required_key_is_named():
    with pytest.raises(ConfigError, match=r"missing required key 'params.width'"):
        instantiate_from_config({"target": "tests.helpers.objects.Base", "params": {"depth": 2}})


def test_kwargs_are_followed_up_the_mro():
    obj = instantiate_from_config({"target": "tests.helpers.objects.Child",
                                   "params": {"dropout": 0.5, "width": 4, "depth": 2}})
    assert isinstance(obj, Child) and (obj.dropout, obj.width, obj.depth) == (0.5, 4, 2)
    accepted, _, open_ = util.accepted_arguments(Child)
    assert accepted == {"dropout", "width", "depth"} and not open_
    with pytest.raises(ConfigError, match=r"params.depht.*did you mean 'depth'"):
        instantiate_from_config({"target": "tests.helpers.objects.Child", "params": {"width": 4, "depht": 2}})


def test_legacy_prefix_maps_to_our_module_when_legacy_package_is_absent(monkeypatch):
    monkeypatch.setitem(util.LEGACY_TARGET_PREFIXES, "taming_absent_pkg.objects.", "tests.helpers.objects.")
    assert get_obj_from_str("taming_absent_pkg.objects.Base") is Base


def test_small_helpers():
    assert util.exists(0) and not util.exists(None)
    assert util.default(None, lambda: 3) == 3 and util.default(2, 3) == 2
    x = torch.arange(24.0).reshape(2, 3, 4)
    torch.testing.assert_close(util.mean_flat(x), x.reshape(2, -1).mean(1))
    assert util.count_params(torch.nn.Linear(3, 2)) == 3 * 2 + 2
    assert util.as_list(1) == [1] and util.as_list((1, 2)) == [1, 2] and util.as_list("ab") == ["ab"]
