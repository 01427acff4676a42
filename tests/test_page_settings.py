"""PageSettings: validation, round trip, and the keyword overrides build_pages/make_plan take."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from circuits.figures.pages import RENDER_KEYS, PageSettings, split_overrides


def test_false_dataset_means_none() -> None:
    # build_atlas(..., dataset=False) is how the docs spell "no dataset examples"
    assert PageSettings(dataset=False).dataset is None
    assert split_overrides(None, {"dataset": False}).dataset is None


@pytest.mark.parametrize("bad", [{"top_k": 0}, {"top_k": True}, {"factor_threshold": 1.5},
                                 {"dataset": "imagenet"}, {"render": {"stepz": 3}}])
def test_bad_values_are_refused(bad) -> None:
    with pytest.raises(ValueError):
        PageSettings(**bad)


def test_unknown_override_lists_valid_keys() -> None:
    with pytest.raises(TypeError, match="top_k"):
        split_overrides(None, {"topk": 3})


def test_render_keys_go_into_render() -> None:
    s = split_overrides(PageSettings(render={"seed": 1}), {"steps": 16, "top_k": 4})
    assert s.top_k == 4 and s.render == {"seed": 1, "steps": 16}
    assert "steps" in RENDER_KEYS


@given(top_k=st.integers(1, 500), threshold=st.floats(0, 1), n=st.integers(1, 8),
       dataset=st.sampled_from([None, "auto", "fashion-mnist-test"]))
def test_round_trip(top_k: int, threshold: float, n: int, dataset) -> None:
    s = PageSettings(top_k=top_k, factor_threshold=threshold, n_factors=n, dataset=dataset,
                     render={"steps": 8})
    assert PageSettings.from_dict(s.to_dict()) == s
    assert hash(PageSettings.from_dict(s.to_dict())) == hash(s)


def test_render_settings_adopted() -> None:
    from circuits.featurevis import RenderSettings

    s = PageSettings(render=RenderSettings(steps=64, seed=3))
    assert s.render["steps"] == 64 and s.render_settings == RenderSettings(steps=64, seed=3)
    assert PageSettings(render={"steps": 32}).render_settings.steps == 32
    assert set(RENDER_KEYS) == set(RenderSettings.field_names())
    with pytest.raises(ValueError, match="steps"):  # a bad value fails when the settings are made
        PageSettings(render={"steps": -1})
