import optree
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from funcbnn.tree import (
    check_same_structure,
    combine,
    leaf_names,
    partition,
    randn_like,
    ravel,
    stack,
    tree_add,
    tree_scale,
    tree_size,
    tree_sub,
    tree_vdot,
    unstack,
)

shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)
dtypes = st.sampled_from([torch.float32, torch.float64])


@st.composite
def trees(draw):
    """Nested dict/tuple trees of tensors with mixed shapes (0-d included) and dtypes."""
    n = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    leaves = [torch.randn(draw(shapes), generator=g, dtype=draw(dtypes)) for _ in range(n)]
    if draw(st.booleans()):
        return {f"k{i}": leaf for i, leaf in enumerate(leaves)}
    return {"a": tuple(leaves[:1]), "b": {f"k{i}": leaf for i, leaf in enumerate(leaves[1:])}}


def assert_trees_equal(a, b):
    assert optree.tree_structure(a) == optree.tree_structure(b)
    for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert torch.equal(x, y)


@given(trees())
def test_ravel_unravel_round_trips(t):
    flat, unravel = ravel(t)
    assert flat.dim() == 1 and flat.numel() == tree_size(t)
    assert_trees_equal(unravel(flat), t)


@given(trees(), st.integers(1, 4))
def test_stack_unstack_round_trips(t, n):
    copies = [tree_scale(t, float(i + 1)) for i in range(n)]
    stacked = stack(copies)
    for leaf, ref in zip(optree.tree_leaves(stacked), optree.tree_leaves(t)):
        assert leaf.shape == (n, *ref.shape)
    for got, want in zip(unstack(stacked), copies):
        assert_trees_equal(got, want)


@given(trees())
def test_partition_combine_round_trips(t):
    names = leaf_names(t)
    chosen = set(names[::2])
    selected, rest = partition(t, lambda name, _: name in chosen)
    assert len(optree.tree_leaves(selected)) == len(chosen)
    assert len(optree.tree_leaves(rest)) == len(names) - len(chosen)
    assert_trees_equal(combine(selected, rest), t)


def test_partition_accepts_a_bool_tree(tree):
    mask = {"fc.weight": True, "fc.bias": False, "log_scale": True}
    selected, rest = partition(tree, mask)
    assert selected["fc.bias"] is None and rest["fc.weight"] is None
    assert torch.equal(combine(rest, selected)["fc.bias"], tree["fc.bias"])


def test_tree_arithmetic_matches_leafwise_ops(tree):
    other = tree_scale(tree, 2.0)
    for name in tree:
        assert torch.allclose(tree_add(tree, other)[name], 3 * tree[name])
        assert torch.allclose(tree_sub(other, tree)[name], tree[name])
    assert torch.allclose(tree_vdot(tree, tree), sum((v**2).sum() for v in tree.values()))


def test_randn_like_is_reproducible_and_keeps_dtype(tree):
    t64 = {k: v.double() for k, v in tree.items()}
    a = randn_like(t64, 5, generator=torch.Generator().manual_seed(3))
    b = randn_like(t64, 5, generator=torch.Generator().manual_seed(3))
    assert_trees_equal(a, b)
    assert a["fc.weight"].shape == (5, 3, 2) and a["log_scale"].shape == (5,)
    assert a["fc.bias"].dtype == torch.float64


def test_mismatched_structure_and_shapes_name_the_leaf(tree):
    with pytest.raises(ValueError, match="structure"):
        check_same_structure(tree, {"fc.weight": tree["fc.weight"]}, "other")
    bad = dict(tree, **{"fc.bias": torch.zeros(4)})
    with pytest.raises(ValueError, match="fc.bias"):
        check_same_structure(tree, bad, "other")


def test_bad_inputs_are_rejected(tree):
    with pytest.raises(ValueError, match="non-empty"):
        stack([])
    with pytest.raises(ValueError, match="num_samples"):
        randn_like(tree, 0)
    with pytest.raises(ValueError, match="leading dimension"):
        unstack({"a": torch.zeros(2, 3), "b": torch.zeros(3)})
    _, unravel = ravel(tree)
    with pytest.raises(ValueError, match="10 elements"):
        unravel(torch.zeros(3))
