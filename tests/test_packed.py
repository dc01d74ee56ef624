"""Exact 8-bit copies of weights: the block split, the checks, the model."""

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma_lab import lora, packed
from gemma_lab.checkpoints.gguf import open_gguf
from gemma_lab.checkpoints.gguf_blocks import PACKABLE, split_blocks
from gemma_lab.layers import greedy_tokens
from gemma_lab.packed import PackedMatrix, unpack
from gemma_lab.testing import tiny_model

Q = gguf.GGMLQuantizationType


def _random_packed(rng, rows, cols, group, with_offset):
    """Random integers and block scales with few significant bits, as the
    float16 scales of GGUF blocks have, so products are exact."""
    values = rng.integers(-127, 128, (rows, cols), dtype=np.int8)
    scale = np.float32(2.0**-18) * rng.integers(1, 2048, (rows, cols // group))
    offset = None
    if with_offset:
        offset = np.float32(2.0**-10) * rng.integers(0, 64, scale.shape)
    return PackedMatrix(values, scale.astype(np.float32), offset)


def _pack_model(model, seed=0):
    """Gives every Linear and the embedding exactly packable weights, and
    attaches their packed copies."""
    rng = np.random.default_rng(seed)
    found = {}
    for path, module in nnx.iter_modules(model):
        name = ".".join(str(k) for k in path)
        if hasattr(module, "kernel"):
            cols, rows = module.kernel[...].shape
            matrix = _random_packed(rng, rows, cols, 16, len(found) % 2 == 0)
            module.kernel[...] = unpack(matrix).T
            found[name] = matrix
        elif hasattr(module, "embedding"):
            rows, cols = module.embedding[...].shape
            matrix = _random_packed(rng, rows, cols, 32, False)
            module.embedding[...] = unpack(matrix)
            found[name] = matrix
    packed.attach(model, found)
    return found


def test_unpack_applies_scale_and_offset_per_block():
    matrix = PackedMatrix(
        values=np.array([[1, 2, 3, 4], [-1, 0, 5, 7]], np.int8),
        scale=np.array([[0.5, 2.0], [1.0, 0.25]], np.float32),
        offset=np.array([[0.0, 1.0], [2.0, 0.0]], np.float32),
    )
    expected = [[0.5, 1.0, 5.0, 7.0], [-3.0, -2.0, 1.25, 1.75]]
    np.testing.assert_array_equal(np.asarray(unpack(matrix)), expected)


def test_check_packed_names_the_bad_part():
    good = _random_packed(np.random.default_rng(0), 4, 32, 16, True)
    with pytest.raises(ValueError, match="values has dtype int32"):
        packed.check_packed(
            PackedMatrix(good.values.astype(np.int32), good.scale, good.offset)
        )
    with pytest.raises(ValueError, match=r"scale has shape \(4, 3\)"):
        packed.check_packed(
            PackedMatrix(good.values, np.ones((4, 3), np.float32))
        )


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (4, 4)])
def test_products_over_a_few_tokens_read_the_packed_copy(shape):
    model = tiny_model()
    found = _pack_model(model)
    assert sorted(packed.packed_paths(model)) == sorted(found)
    plain = nnx.clone(model)
    packed.detach(plain)
    assert packed.packed_paths(plain) == []

    tokens = jnp.arange(5, 5 + np.prod(shape)).reshape(shape)
    want = plain(tokens)
    np.testing.assert_allclose(model(tokens), want, rtol=1e-5, atol=1e-5)
    # The copies are really read: projections read theirs for one token,
    # the output head for up to FEW_ROWS tokens. Corrupting them changes
    # few-token logits only.
    copy = (
        model.layers[0].mlp.up_proj.packed
        if tokens.size == 1
        else model.embedder.packed
    )
    copy.values[...] = jnp.zeros_like(copy.values[...])
    assert not np.allclose(model(tokens), want, atol=1e-3)
    longer = jnp.arange(5, 5 + packed.FEW_ROWS + 1)[None]
    np.testing.assert_array_equal(model(longer), plain(longer))


def test_matmul_unpacks_chunk_by_chunk_exactly():
    rng = np.random.default_rng(3)
    rows = 2 * packed.CHUNK_ROWS
    matrix = _random_packed(rng, rows, 64, 32, True)
    x = jnp.asarray(rng.standard_normal((3, 2, 64)), jnp.float32)
    got = packed.matmul(x, matrix)
    assert got.shape == (3, 2, rows)
    want = np.asarray(x, np.float64) @ np.asarray(unpack(matrix), np.float64).T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("extra", [100, 1 - packed.CHUNK_ROWS])
def test_products_cover_rows_past_the_last_full_chunk(extra):
    # 2 chunks + 100 rows, and one row past a single chunk.
    rng = np.random.default_rng(7)
    rows = 2 * packed.CHUNK_ROWS + extra
    matrix = _random_packed(rng, rows, 32, 16, False)
    np.asarray(matrix.scale)[rows - 1] *= 2.0**10  # the last row, made long
    x = rng.standard_normal((3, 32)).astype(np.float32)
    x[1] = np.asarray(unpack(matrix))[rows - 1]  # picks the last row
    want = np.asarray(x, np.float64) @ np.asarray(unpack(matrix), np.float64).T
    got = packed.matmul(jnp.asarray(x), matrix)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    picks = packed.argmax_matmul(jnp.asarray(x, jnp.bfloat16), matrix)
    want_picks = greedy_tokens(
        packed.matmul(jnp.asarray(x, jnp.bfloat16), matrix)
    )
    np.testing.assert_array_equal(picks, want_picks)
    picks = packed.argmax_matmul(jnp.asarray(x), matrix)
    assert np.asarray(picks).tolist() == np.argmax(want, -1).tolist()
    assert int(picks[1]) == rows - 1


def test_products_name_an_input_of_the_wrong_width():
    matrix = _random_packed(np.random.default_rng(4), 64, 32, 16, False)
    for rows in (1, 3):
        x = jnp.ones((rows, 31))
        with pytest.raises(ValueError, match=r"last axis of 32 .*\(64, 32\)"):
            packed.product(x, matrix)


def test_attach_rejects_a_copy_that_is_not_exact():
    model = tiny_model()
    kernel = model.layers[0].attn.q_proj.kernel[...]
    rows, cols = kernel.T.shape
    matrix = _random_packed(np.random.default_rng(1), rows, cols, 16, False)
    with pytest.raises(ValueError, match="does not equal the module's weight"):
        packed.attach(model, {"layers.0.attn.q_proj": matrix})
    with pytest.raises(ValueError, match="no such module"):
        packed.attach(model, {"layers.0.attn.nope": matrix})
    assert packed.packed_paths(model) == []


def test_merging_an_adapter_drops_the_stale_copy():
    model = tiny_model()
    _pack_model(model)
    lora.apply_lora(model, rank=2, targets=("up_proj",))
    for adapter in lora.adapters(model).values():
        adapter.lora_b[...] = 0.1 * jnp.ones_like(adapter.lora_b[...])
    tokens = jnp.array([[9]])
    adapted = model(tokens)
    lora.merge(model)
    assert all("up_proj" not in path for path in packed.packed_paths(model)), (
        "merged kernels must not keep their old packed copies"
    )
    np.testing.assert_allclose(model(tokens), adapted, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def reader(gguf_path):
    return open_gguf(gguf_path)


def test_split_blocks_gives_ggufs_own_weights(reader):
    """One tensor of every packable type in the real file, value for value."""
    done = set()
    for tensor in reader.tensors:
        kind = gguf.GGMLQuantizationType(tensor.tensor_type)
        if kind not in PACKABLE or kind in done or len(tensor.shape) != 2:
            continue
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if kind == gguf.GGMLQuantizationType.Q8_0:
            shape, data = (4096, shape[1]), tensor.data[:4096]
        else:
            data = tensor.data
        matrix = split_blocks(data, kind, shape)
        want = gguf.quants.dequantize(data, kind).reshape(shape)
        np.testing.assert_array_equal(np.asarray(unpack(matrix)), want)
        assert (matrix.offset is not None) == (kind.name == "Q4_K")
        done.add(kind)
    assert {k.name for k in done} == {"Q8_0", "Q5_0", "Q4_K", "Q6_K"}


def test_split_blocks_rejects_other_types_and_short_data():
    with pytest.raises(ValueError, match="cannot be packed"):
        split_blocks(
            np.zeros(64, np.uint8), gguf.GGMLQuantizationType.F16, (1, 32)
        )
    with pytest.raises(ValueError, match="do not hold"):
        split_blocks(
            np.zeros(34, np.uint8), gguf.GGMLQuantizationType.Q8_0, (2, 32)
        )


def test_argmax_matmul_picks_as_greedy_tokens_over_the_whole_row():
    rng = np.random.default_rng(5)
    chunk = packed.CHUNK_ROWS
    matrix = _random_packed(rng, 2 * chunk, 32, 16, True)
    values, scale = np.asarray(matrix.values), np.asarray(matrix.scale)
    offset = np.asarray(matrix.offset)
    # Rows 100 and chunk + 900 are equal: a tie across chunks, the first wins.
    for part in (values, scale, offset):
        part[chunk + 900] = part[100]
    x = rng.standard_normal((4, 32)).astype(np.float32)
    x[0] = np.asarray(unpack(matrix))[100]
    got = packed.argmax_matmul(jnp.asarray(x), matrix)
    want = greedy_tokens(packed.matmul(jnp.asarray(x), matrix))
    np.testing.assert_array_equal(got, want)
    assert int(got[0]) == 100

    # A NaN weight in a later chunk makes every row pick its row.
    scale[chunk + 400, 1] = np.nan
    got = packed.argmax_matmul(jnp.asarray(x), matrix)
    assert np.asarray(got).tolist() == [chunk + 400] * 4


def test_real_model_decodes_from_packed_copies(real_model):
    model, _ = real_model
    paths = packed.packed_paths(model)
    assert "embedder" in paths and len(paths) == 1 + 7 * model.config.num_layers
    rows = [m for _, m in nnx.iter_modules(model) if getattr(m, "rows", None)]
    assert len(rows) == 7 * model.config.num_layers
    plain = nnx.clone(model)
    packed.detach(plain)
    tokens = jnp.array([[2, 818, 5279, 529]])
    cache = plain.forward(tokens, cache=plain.init_cache(1, 16)).cache
    step, pos = jnp.array([[7]]), jnp.array([[4]])
    got = model.forward(step, pos, cache=cache).logits
    want = plain.forward(step, pos, cache=cache).logits
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
    assert int(got.argmax()) == int(want.argmax())


def test_real_model_greedy_picks_for_a_few_rows_equal_the_logits_argmax(
    real_model,
):
    model, _ = real_model
    hidden = jnp.asarray(np.random.default_rng(6).standard_normal((8, 640)))
    want = np.argmax(np.asarray(model.logits(hidden)), axis=-1)
    np.testing.assert_array_equal(model.greedy_tokens(hidden), want)
    np.testing.assert_array_equal(model.greedy_tokens(hidden[:1]), want[:1])


def test_detach_and_merging_drop_the_kernel_rows():
    from gemma_lab.layers import attach_rows

    model = tiny_model()
    attach_rows(model)
    mlp = model.layers[0].mlp
    lora.apply_lora(model, rank=2, targets=("up_proj",))
    adapter = lora.adapters(model)["layers.0.mlp.up_proj"]
    adapter.lora_b[...] = 0.1 * jnp.ones_like(adapter.lora_b[...])
    tokens = jnp.array([[9, 4], [3, 1]])  # 4 tokens: the rows' products
    adapted = model(tokens)
    lora.merge(model)
    assert mlp.up_proj.base.rows is None and mlp.gate_proj.rows is not None
    np.testing.assert_allclose(model(tokens), adapted, rtol=1e-4, atol=1e-4)
    packed.detach(model)
    assert mlp.gate_proj.rows is None
