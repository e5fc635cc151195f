"""Search-space files (no Ray): every registered method has one, it parses, names only real Config
fields, and every value in it builds a valid config (``make_config(preset, point)``)."""

from __future__ import annotations

import random

import pytest
import yaml

from medood import methods
from medood import search_spaces as spaces

ALL = [n for n in methods.names() if methods.get(n).trainable]  # the training-free floors have nothing to tune


def fields_of(name: str) -> list[str]:
    return sorted(methods.get(name).config_fields())


@pytest.mark.parametrize("name", ALL)
def test_every_registered_method_has_a_space_file_with_real_fields(name):
    assert spaces.path_for(name).is_file(), f"no medood/search_spaces/{name}.yaml"
    search = spaces.load(name)
    valid = set(fields_of(name))
    assert search.space and search.ablations
    assert set(search.space) <= valid
    for ablation in search.ablations.values():
        assert ablation.settings and ablation.description and ablation.source
        for setting in ablation.settings:
            assert set(setting.overrides) <= valid, (ablation.name, setting.label)
            assert set(setting.paper) <= set(spaces.PAPER_METRICS)


@pytest.mark.parametrize("name", ALL)
def test_space_values_build_valid_configs_on_every_preset(name):
    search = spaces.load(name)
    for preset in methods.get(name).presets:
        spaces.check_values(search, preset, samples=32)


@pytest.mark.parametrize("name", ALL)
def test_every_ablation_point_is_valid_on_the_paper_preset(name):
    cls = methods.get(name)
    for ablation in spaces.load(name).ablations.values():
        for setting in ablation.settings:
            cls.make_config("paper", setting.overrides)  # raises on a bad value
        good, _ = spaces.valid_settings(ablation, name, "tiny")
        assert good, f"ablation {ablation.name!r} has no setting the tiny preset can run"


def test_squid_covers_the_thesis_ablations():
    search = spaces.load("squid")
    grid = search.ablation("patch_grid")
    assert [s.overrides["grid"] for s in grid.settings] == [1, 2, 4, 8]  # Fig. 4.6: 1x1 .. 8x8
    good, bad = spaces.valid_settings(grid, "squid", "tiny")
    assert [s.overrides["grid"] for s in good] == [1, 2, 4]
    assert [s.label for s, _ in bad] == ["grid=8"] and "divisible" in bad[0][1]
    components = search.ablation("components")  # Table 4.4
    assert components.form == "rows" and len(components.settings) == 8
    assert components.setting("Full SQUID").paper == {"auroc": 0.876}
    assert components.setting("w/o Space-aware Memory").overrides == {"space_aware": False}
    assert {"aggregator", "shortcut", "inpainting_level"} == set(search.ablation("extensive").swept)  # Table 4.5
    assert {"top_k", "memory_size"} <= set(search.ablations)


def test_mae_classifier_covers_the_paper_ablations():
    search = spaces.load("mae_classifier")
    ratios = [s.overrides["mask_ratio"] for s in search.ablation("mask_ratio").settings]
    assert ratios[0] == 0.0 and ratios[-1] == 0.9 and 0.75 in ratios  # Fig. 5
    k = search.ablation("pseudo_abnormal_k")  # Table 2c
    assert [s.overrides["k_range"] for s in k.settings] == [(1, 10), (5, 10), (1, 5)]
    assert [s.paper["auroc"] for s in k.settings] == [0.899, 0.889, 0.901]
    inputs = search.ablation("classifier_input")  # Table 2b
    assert [s.overrides["classifier_input"] for s in inputs.settings] == ["abs_diff", "l2_diff", "reconstruction"]
    assert methods.get("mae_classifier").make_config("tiny", k.settings[1].overrides).k_range == (5, 10)


def test_unknown_field_is_an_error_naming_the_valid_fields():
    fields = fields_of("squid")
    with pytest.raises(ValueError, match=r"'gird' is not a field of squid's Config; valid fields: .*grid"):
        spaces.parse({"space": {"gird": {"choice": [1, 2]}}}, "squid", fields)
    with pytest.raises(ValueError, match=r"ablations.a.rows\[0\].set: 'topk' is not a field"):
        spaces.parse({"ablations": {"a": {"rows": [{"name": "x", "set": {"topk": 1}}]}}}, "squid", fields)
    with pytest.raises(ValueError, match=r"ablations.b.grid: 'memsize' is not a field"):
        spaces.parse({"ablations": {"b": {"grid": {"memsize": [1]}}}}, "squid", fields)


@pytest.mark.parametrize(
    ("axis", "message"),
    [
        ({"normal": [0, 1]}, "unknown distribution 'normal'; known: choice, grid"),
        ({"loguniform": [0.0, 1.0]}, "loguniform needs low > 0"),
        ({"uniform": [2.0, 1.0]}, "needs low < high"),
        ({"quniform": [0.0, 1.0]}, r"quniform takes \[low, high, q\]"),
        ({"randint": [1.5, 4]}, "randint takes integers"),
        ({"choice": []}, "takes a non-empty list"),
    ],
)
def test_malformed_distributions_are_refused(axis, message):
    with pytest.raises(ValueError, match=message):
        spaces.parse({"space": {"lr": axis}}, "squid", fields_of("squid"))


def test_bad_values_are_caught_before_any_trial(tmp_path):
    path = tmp_path / "squid.yaml"
    path.write_text(yaml.safe_dump({"method": "squid", "space": {"shrinkage": {"choice": ["gumbel", "topk"]}}}))
    search = spaces.load("squid", path)
    with pytest.raises(ValueError, match="shrinkage: topk.*unknown shrinkage 'topk'; known: gumbel"):
        spaces.check_values(search, "tiny")
    with pytest.raises(ValueError, match="unknown ablation 'nope' for method 'squid'; known: none"):
        search.ablation("nope")
    with pytest.raises(ValueError, match="no setting labelled 'grid=3'"):
        spaces.parse(
            {"ablations": {"g": {"grid": {"grid": [1, 2]}, "paper": {"grid=3": {"auroc": 0.5}}}}}, "squid", fields_of("squid")
        )


def test_samples_follow_the_distributions():
    search = spaces.parse(
        {
            "space": {
                "lr": {"loguniform": [1.0e-4, 1.0e-2]},
                "top_k": {"randint": [1, 4]},
                "shortcut_probability": {"quniform": [0.5, 1.0, 0.25]},
                "grid": {"grid": [1, 2]},
                "memory_size": 64,
            }
        },
        "squid",
        fields_of("squid"),
    )
    assert search.swept == ("lr", "top_k", "shortcut_probability", "grid")
    assert search.grid_points() == [{"grid": 1}, {"grid": 2}]
    rng = random.Random(0)
    for _ in range(50):
        point = search.sample(rng)
        assert 1e-4 <= point["lr"] <= 1e-2 and point["top_k"] in (1, 2, 3)
        assert point["shortcut_probability"] in (0.5, 0.75, 1.0) and point["memory_size"] == 64
