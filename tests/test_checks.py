"""funcbnn.checks against brute force: the sum-first finite check raises exactly when an element is NaN or inf."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from funcbnn import checks
from funcbnn.checks import NonFiniteError, check_finite, check_generator, guarded_call, set_finite_checks

VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([3e38, -3e38, 6e4, float("nan"), float("inf"), -float("inf")]),
)


@given(st.lists(VALUES, min_size=1, max_size=40), st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
       st.booleans())
def test_check_finite_raises_exactly_when_an_element_is_not_finite(values, dtype, as_tree):
    t = torch.tensor(values, dtype=torch.float64).to(dtype)  # the cast may itself overflow to inf: judge after it
    bad = not bool(torch.isfinite(t).all())  # brute force
    tree = {"a": torch.ones(3), "b": [t]} if as_tree else t
    if bad:
        with pytest.raises(NonFiniteError) as info:
            check_finite(tree, "arg")
        nans, infs = int(t.isnan().sum()), int(t.isinf().sum())
        assert f"({nans} NaN, {infs} inf)" in str(info.value)
        assert ("in leaf 'b.0'" in str(info.value)) == as_tree
    else:
        check_finite(tree, "arg")  # an overflowing sum of finite values is not an error


def test_complex_integer_and_empty_leaves():
    check_finite(torch.tensor([1 + 2j, 3e38 + 3e38j], dtype=torch.complex64), "c")
    with pytest.raises(NonFiniteError):
        check_finite(torch.tensor([complex(float("nan"), 0.0)]), "c")
    check_finite({"ints": torch.arange(5), "empty": torch.zeros(0), "flags": torch.ones(2, dtype=torch.bool)}, "t")


def test_named_tuple_fields_are_named():
    import funcbnn

    state = funcbnn.diag_gaussian().init({"w": torch.ones(2)})
    state = state._replace(rho={"w": torch.tensor([0.0, float("inf")])})
    with pytest.raises(NonFiniteError, match="in leaf 'rho.w'"):
        check_finite(state, "state")


def test_set_finite_checks_is_a_call_and_a_context_manager_and_thread_local():
    import threading

    nan = torch.tensor([float("nan")])
    with set_finite_checks(False):
        check_finite(nan, "x")
        seen = []
        worker = threading.Thread(target=lambda: seen.append(checks.finite_checks_enabled()))
        worker.start()
        worker.join()
        assert seen == [True]  # another thread keeps its own mode
    assert checks.finite_checks_enabled()
    set_finite_checks(False)
    try:
        check_finite(nan, "x")
    finally:
        set_finite_checks(True)
    with pytest.raises(NonFiniteError):
        check_finite(nan, "x")
    with pytest.raises(TypeError, match="enabled must be a bool"):
        set_finite_checks(0)


def test_check_generator_and_guarded_call():
    assert check_generator(None) is None
    with pytest.raises(TypeError, match=r"manual_seed\(3\)"):
        check_generator(3)
    layer = torch.nn.Linear(4, 2)
    with pytest.raises(checks.ModelInputError, match=r"could not run on x \(a tensor of shape \(3, 5\)") as info:
        with guarded_call(torch.ones(3, 5), dict(layer.named_parameters())):
            layer(torch.ones(3, 5))
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's own message stays in the chain
    with pytest.raises(ValueError, match="ours"):  # errors that are not the model's pass through
        with guarded_call(torch.ones(1), {}):
            raise ValueError("ours")


def test_set_finite_checks_as_a_decorator_switches_only_while_the_function_runs():
    @set_finite_checks(False)
    def unchecked():
        check_finite(torch.tensor([float("nan")]), "x")  # no error inside
        return checks.finite_checks_enabled()

    assert checks.finite_checks_enabled()  # defining it changed nothing
    assert unchecked() is False
    assert checks.finite_checks_enabled()
    with pytest.raises(NonFiniteError):
        check_finite(torch.tensor([float("nan")]), "x")


def test_meta_inputs_are_named_by_the_model_call_not_crashed_on_by_the_check():
    import funcbnn
    from funcbnn import vi

    apply_fn, params, _ = funcbnn.functionalize(torch.nn.Linear(3, 2))
    x, y = torch.randn(8, 3, device="meta"), torch.zeros(8, dtype=torch.long, device="meta")
    assert checks.all_finite(x)  # nothing to read on the meta device
    post = funcbnn.diag_gaussian(init_std=0.1)
    with pytest.raises(checks.ModelInputError, match="on meta"):
        vi.fit(apply_fn, post, funcbnn.priors.gaussian(1.0), post.init(params), (x, y))
