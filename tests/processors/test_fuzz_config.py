"""Bad input to SparsityConfig, diffattn.apply and diffattn.sparse_processors, fuzzed: each gets a
UserError whose message names the bad value (never another exception, never silence)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diffattn
from diffattn import Dense, Neighborhood, UserError
from diffattn.processors import SparsityConfig
from diffattn.processors.presets import list_presets

from ..adapters.tiny_pipelines import tiny_wan_pipeline

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

#: Values of the wrong type for any config field.
wrong_types = st.one_of(
    st.none(), st.floats(allow_nan=False), st.text(max_size=4), st.binary(max_size=3),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)


def raises_naming(value, *args, **kwargs):
    """Call ``args[0](*args[1:], **kwargs)`` and check it raises a UserError that names ``value``."""
    function, *rest = args
    with pytest.raises(UserError) as caught:
        function(*rest, **kwargs)
    assert repr(value) in str(caught.value) or str(value) in str(caught.value), str(caught.value)


@FAST
@given(st.one_of(wrong_types, st.integers(), st.booleans()))
def test_pattern_must_be_a_pattern(value):
    raises_naming(value, SparsityConfig, pattern=value)


@FAST
@given(field=st.sampled_from(["dense_steps", "dense_last_steps"]),
       value=st.one_of(st.integers(max_value=-1), st.booleans(), wrong_types))
def test_step_counts_must_be_non_negative_ints(field, value):
    raises_naming(value, SparsityConfig, pattern=Dense(), **{field: value})


@FAST
@given(st.one_of(st.integers().filter(lambda n: n not in (32, 64, 128, 256)), st.booleans(), wrong_types))
def test_block_size_must_be_a_supported_size(value):
    raises_naming(value, SparsityConfig, pattern=Dense(), block_size=value)


@FAST
@given(st.one_of(st.text(max_size=8).filter(lambda s: s not in ("warn", "raise")), st.integers(), st.none(),
                 st.booleans()))
def test_on_unsupported_must_be_warn_or_raise(value):
    raises_naming(value, SparsityConfig, pattern=Dense(), on_unsupported=value)


@FAST
@given(st.one_of(st.text(max_size=8).filter(lambda s: s not in ("auto", "cpu", "triton", "reference")),
                 st.integers(), st.none()))
def test_backend_must_be_known(value):
    raises_naming(value, SparsityConfig, pattern=Dense(), backend=value)


@FAST
@given(st.one_of(st.floats(allow_nan=False), st.none(), st.lists(st.floats(allow_nan=False), min_size=1, max_size=2),
                 st.tuples(st.booleans())))
def test_dense_layers_must_be_indices_or_filters(value):
    raises_naming(value, SparsityConfig, pattern=Dense(), dense_layers=value)


@FAST
@given(st.one_of(st.integers(), st.text(max_size=3), st.lists(st.integers(min_value=1), min_size=4, max_size=5)))
def test_tile_shape_must_be_three_positive_ints(value):
    raises_naming(value, SparsityConfig, pattern=Neighborhood(kernel_size=(1, 3, 3)), tile_shape=value)


@FAST
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
def test_unknown_override_fields_are_named(name):
    raises_naming(name, SparsityConfig(pattern=Dense()).with_overrides, **{f"x_{name}": 1})


@FAST
@given(st.one_of(wrong_types, st.integers(), st.builds(object), st.just(torch.nn.Linear(2, 2))))
def test_apply_and_sparse_processors_refuse_objects_that_are_not_pipelines(value):
    with pytest.raises(UserError, match=type(value).__name__):
        diffattn.apply(value, Dense())
    with pytest.raises(UserError, match=type(value).__name__):
        diffattn.sparse_processors(value, Dense())


@pytest.fixture(scope="module")
def pipe():
    return tiny_wan_pipeline(num_layers=1)


@FAST
@given(name=st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_0123456789", min_size=1, max_size=16).filter(
    lambda s: s not in {preset.name for preset in list_presets("wan")}))
def test_unknown_preset_names_are_named(pipe, name):
    raises_naming(name, diffattn.apply, pipe, name)
    raises_naming(name, diffattn.sparse_processors, pipe.transformer, name)
    assert not hasattr(pipe.transformer, "_diffattn_installed")


@FAST
@given(st.one_of(st.integers(), st.floats(allow_nan=False), st.none(), st.lists(st.integers(), max_size=2),
                 st.builds(dict)))
def test_config_of_a_wrong_type_is_named(pipe, value):
    raises_naming(value, diffattn.apply, pipe, value)
    raises_naming(value, diffattn.sparse_processors, pipe.transformer, value)


@FAST
@given(st.one_of(st.integers(max_value=-1), st.booleans()))
def test_overrides_through_apply_are_validated(pipe, value):
    raises_naming(value, diffattn.apply, pipe, Dense(), dense_steps=value)
