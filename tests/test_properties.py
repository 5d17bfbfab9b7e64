"""Properties every registered method keeps on any layer the engine can give it (hypothesis).

Every method in `kvmerger.METHODS` (new ones included automatically), in every mode listed in
`VARIANTS`, goes through the engine's shared path (`compress_layer`: the non-finite check, the
method, the slot-count check) on random layers: lengths 1-300, budgets from one slot to all slots,
float32 / bfloat16 / float16, key and value scales 1e-6 to 1e4, random-walk, random, identical and
zero keys, zero values now and then, and query states from which the method's attention statistics
are computed. Asserted:

* finite input: exactly `target_slots` slots for methods that keep the budget, finite keys, values
  and biases (only padding slots may carry a -inf bias), positions that are prompt indices in
  sequence order, the input dtype kept, and the inputs left bit for bit as they were;
* NaN or inf anywhere in the keys, values or query states: `NonFiniteCacheError` naming the layer,
  before the method runs, the inputs untouched.

Reproducible: derandomized, no example database. Sized to run in well under a minute on two busy
CPU cores (see `EXAMPLES`).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvmerger import METHODS, NonFiniteCacheError
from tests.conftest import standalone_scores
from kvmerger.engine.session import compress_layer
from kvmerger.methods.base import CompressionMethod

# Modes that change what a method computes; every other method runs with its defaults.
VARIANTS: dict[str, list[dict]] = {
    "kvmerger": [{"mode": "exact"}, {"mode": "paper"}, {"size_bias": True}, {"mode": "paper", "size_bias": True}],
    "fitted-kvmerger": [{}, {"slot_keys": "pivot"}],
}
FIXED_BUDGET = {"full": 1.0}  # the full cache accepts no other budget
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KEY_PATTERNS = ["walk", "random", "identical", "zero"]
EXAMPLES = {"finite": 250, "non_finite": 50}  # per method; see the module docstring for the total
SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
LAYERS = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Thousands of tiny tensor operations: a second OpenMP thread only adds synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@st.composite
def layers(draw, name: str):
    """(method, keys, values, query, layer index): one random layer for method `name`."""
    length = draw(st.one_of(st.integers(1, 3), st.integers(4, 32), st.integers(33, 300)))
    budget = FIXED_BUDGET.get(name) or draw(
        st.one_of(st.sampled_from([1e-6, 1.0, 1.0 / length, 1.0 - 1e-6]), st.floats(0.01, 1.0))
    )
    method = METHODS[name](budget=budget, **draw(st.sampled_from(VARIANTS.get(name, [{}]))))
    dtype = draw(st.sampled_from(DTYPES))
    batch, kv_heads, group, dim = draw(st.sampled_from([(1, 1, 1, 4), (1, 2, 2, 8), (2, 2, 1, 8)]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    shape = (batch, kv_heads, length, dim)
    keys = key_pattern(draw(st.sampled_from(KEY_PATTERNS)), shape, generator)
    keys = keys * 10.0 ** draw(st.floats(-6, 4))
    values = unit_scale(torch.randn(shape, generator=generator)) * 10.0 ** draw(st.floats(-6, 4))
    if draw(st.integers(0, 9)) == 0:
        values = torch.zeros(shape)
    query = torch.randn(batch, kv_heads * group, length, dim, generator=generator)
    query = query * draw(st.sampled_from([0.1, 2.0, 20.0]))
    layer_idx = draw(st.integers(0, LAYERS - 1))
    event(f"T {'1-3' if length <= 3 else '4-32' if length <= 32 else '33-300'}")
    event(str(dtype).removeprefix("torch."))
    return method, keys.to(dtype), values.to(dtype), query.to(dtype), layer_idx


def key_pattern(pattern: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Keys of largest |entry| 1 (0 for zero keys), so that a scale up to 1e4 fits float16."""
    if pattern == "zero":
        return torch.zeros(shape)
    if pattern == "identical":
        return unit_scale(torch.randn(*shape[:2], 1, shape[-1], generator=generator)).expand(shape).clone()
    noise = torch.randn(shape, generator=generator)
    return unit_scale(noise.cumsum(2) if pattern == "walk" else noise)


def unit_scale(x: torch.Tensor) -> torch.Tensor:
    return x / x.abs().amax().clamp_min(1e-30)


def bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so that NaN compares equal to the same NaN."""
    return x.view({2: torch.int16, 4: torch.int32}[x.element_size()]).clone()


def run_engine(method: CompressionMethod, keys, values, query, layer_idx):
    scores = standalone_scores(query, keys, keys.shape[-1] ** -0.5)
    return compress_layer(method, keys, values, scores, layer_idx, LAYERS)


@pytest.mark.parametrize("name", sorted(METHODS))
@settings(max_examples=EXAMPLES["finite"], **SETTINGS)
@given(data=st.data())
def test_finite_layers_give_exact_slots_and_finite_caches(name, data):
    method, keys, values, query, layer_idx = data.draw(layers(name))
    before = [bits(x) for x in (keys, values, query)]
    length = keys.shape[-2]
    output, report = run_engine(method, keys, values, query, layer_idx)

    slots = output.keys.shape[-2]
    slot_bytes = keys.shape[-1] * keys.element_size() + values.shape[-1] * values.element_size()
    if method.keeps_budget():
        assert slots == method.target_slots(length, slot_bytes) == report.slots_after
    assert 1 <= slots <= length
    assert output.keys.dtype == keys.dtype and output.values.dtype == values.dtype
    assert torch.isfinite(output.keys).all() and torch.isfinite(output.values).all()
    padding = torch.zeros_like(output.positions, dtype=torch.bool)
    if output.set_sizes is not None:
        padding = output.set_sizes == 0
        assert (output.set_sizes[~padding] >= 1).all() and (output.set_sizes.sum(-1) <= length).all()
    if output.bias is not None:
        assert torch.isfinite(output.bias[~padding]).all() and (output.bias[padding] == float("-inf")).all()
    real = output.positions.masked_fill(padding, 0)
    assert ((real >= 0) & (real < length)).all() and (output.positions[padding] == -1).all()
    ordered = output.positions.masked_fill(padding, length)  # padding sits after the real slots
    assert (ordered[..., 1:] > ordered[..., :-1]).logical_or(ordered[..., 1:] == length).all()
    for original, tensor in zip(before, (keys, values, query)):
        assert torch.equal(original, bits(tensor)), f"{name} modified its inputs"


@pytest.mark.parametrize("name", sorted(METHODS))
@settings(max_examples=EXAMPLES["non_finite"], **SETTINGS)
@given(
    data=st.data(),
    where=st.sampled_from(["keys", "values", "query"]),
    bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
)
def test_non_finite_layers_get_the_clear_error(name, data, where, bad):
    method, keys, values, query, layer_idx = data.draw(layers(name))
    tensors = {"keys": keys, "values": values, "query": query}
    target = tensors[where]
    flat = target.view(-1)
    for index in data.draw(st.lists(st.integers(0, flat.numel() - 1), min_size=1, max_size=3)):
        flat[index] = bad
    before = {key: bits(x) for key, x in tensors.items()}
    with pytest.raises(NonFiniteCacheError, match=f"layer {layer_idx}") as error:
        run_engine(method, keys, values, query, layer_idx)
    assert error.value.layer == layer_idx and 0 < error.value.share <= 1
    message = str(error.value)
    assert "\n" not in message and "torch.isfinite" in message
    if target.dtype == torch.float16:
        assert "float16 overflow" in message and "bfloat16 or float32" in message
    for key, x in tensors.items():
        assert torch.equal(before[key], bits(x)), f"{name} modified its {key}"
