"""LoRA adapters: identity at start, merge, save and load."""

import os
import re
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gemma_lab
from gemma_lab import lora, testing

TOKENS = jnp.array([[2, 10, 11, 12, 13, 40, 7, 9]], jnp.int32)


def _randomise_adapters(model, seed=1):
    """Gives every B matrix random values, as training would."""
    rngs = nnx.Rngs(seed)
    for module in lora.adapters(model).values():
        shape = module.lora_b[...].shape
        module.lora_b[...] = 0.05 * nnx.initializers.normal(1.0)(
            rngs.params(), shape
        )


def test_fresh_adapters_give_the_base_logits():
    base = testing.tiny_model()(TOKENS)
    model = lora.apply_lora(testing.tiny_model(), rank=4)
    np.testing.assert_array_equal(model(TOKENS), base)


def test_apply_lora_wraps_only_the_named_targets():
    model = lora.apply_lora(
        testing.tiny_model(), rank=2, targets=("q_proj", "down_proj")
    )
    names = {p.rsplit(".", 1)[-1] for p in lora.adapters(model)}
    assert names == {"q_proj", "down_proj"}
    assert len(lora.adapters(model)) == 2 * testing.TINY_CONFIG.num_layers


def test_adapter_matches_a_naive_low_rank_update():
    model = lora.apply_lora(testing.tiny_model(), rank=4, alpha=8.0)
    _randomise_adapters(model)
    layer = model.layers[0].attn.q_proj
    x = np.random.default_rng(0).normal(size=(2, 3, 64)).astype(np.float32)
    kernel = np.asarray(layer.base.kernel[...])
    a, b = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
    expected = x @ kernel + (8.0 / 4) * (x @ a) @ b
    np.testing.assert_allclose(layer(jnp.asarray(x)), expected, atol=1e-5)


def test_low_rank_product_gradients_equal_autodiff():
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (6, 5))
    a = jax.random.normal(keys[1], (5, 3))
    b = jax.random.normal(keys[2], (3, 7))
    g = jax.random.normal(keys[3], (6, 7))
    out, pull = jax.vjp(lora.low_rank_product, x, a, b)
    want_out, want_pull = jax.vjp(lambda x, a, b: (x @ a) @ b, x, a, b)
    np.testing.assert_allclose(out, want_out, rtol=1e-6)
    for got, want in zip(pull(g), want_pull(g), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_low_rank_product_rejects_inputs_that_are_not_matrices():
    with pytest.raises(ValueError, match=r"x \[N, I\]"):
        lora.low_rank_product(
            jnp.ones((2, 5, 8)), jnp.ones((8, 3)), jnp.ones((3, 6))
        )


@pytest.mark.parametrize(
    "settings",
    [
        dict(rank=2, targets=("q_proj", "k_proj", "q_proj")),
        dict(rank=True),
        dict(rank=2, alpha=0.0),
        dict(rank=2, alpha=float("nan")),
    ],
)
def test_bad_settings_are_rejected_before_any_wrapping(settings):
    model = testing.tiny_model()
    with pytest.raises(ValueError, match="rank|alpha|targets"):
        lora.apply_lora(model, **settings)
    assert not lora.adapters(model)


def test_adapters_of_a_bfloat16_model_are_bfloat16():
    model = testing.tiny_model(param_dtype=jnp.bfloat16)
    layer = lora.apply_lora(model, rank=2).layers[0].mlp.up_proj
    assert layer.lora_a[...].dtype == layer.lora_b[...].dtype == jnp.bfloat16


def test_merged_and_unmerged_adapters_give_the_same_logits():
    model = lora.apply_lora(testing.tiny_model(), rank=4)
    _randomise_adapters(model)
    table = np.asarray(model.embedder.embedding[...]).copy()
    kernel = np.asarray(model.layers[1].mlp.up_proj.base.kernel[...]).copy()
    unmerged = model(TOKENS)

    lora.merge(model)
    np.testing.assert_allclose(model(TOKENS), unmerged, atol=1e-3)
    np.testing.assert_array_equal(model.embedder.embedding[...], table)
    assert not np.array_equal(
        model.layers[1].mlp.up_proj.base.kernel[...], kernel
    )

    lora.unmerge(model)
    np.testing.assert_allclose(
        model.layers[1].mlp.up_proj.base.kernel[...], kernel, atol=1e-6
    )
    np.testing.assert_allclose(model(TOKENS), unmerged, atol=1e-5)


def test_optimizer_selects_adapters_by_type():
    model = lora.apply_lora(testing.tiny_model(), rank=4)
    trainable = nnx.state(model, lora.LoRAParam)
    count = len(jax.tree.leaves(trainable))
    assert count == 2 * 7 * testing.TINY_CONFIG.num_layers


def test_save_then_load_onto_a_fresh_base_gives_equal_logits(tmp_path):
    model = lora.apply_lora(testing.tiny_model(), rank=4)
    _randomise_adapters(model)
    path = lora.save_adapter(model, tmp_path / "a.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]

    loaded = lora.load_adapter(testing.tiny_model(), path)
    np.testing.assert_allclose(loaded(TOKENS), model(TOKENS), atol=1e-6)
    assert lora.adapter_settings(loaded) == lora.adapter_settings(model)


def test_loading_onto_another_base_is_a_clear_error(tmp_path):
    model = lora.apply_lora(testing.tiny_model(seed=0), rank=4)
    path = lora.save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(lora.AdapterMismatchError, match="trained on base"):
        lora.load_adapter(testing.tiny_model(seed=5), path)


def test_loading_onto_other_adapter_settings_is_a_clear_error(tmp_path):
    model = lora.apply_lora(testing.tiny_model(), rank=4)
    path = lora.save_adapter(model, tmp_path / "a.safetensors")
    other = lora.apply_lora(testing.tiny_model(), rank=2)
    with pytest.raises(lora.AdapterMismatchError, match="already carries"):
        lora.load_adapter(other, path)


def test_bad_rank_and_targets_are_rejected():
    with pytest.raises(ValueError, match="rank must be a positive int"):
        lora.apply_lora(testing.tiny_model(), rank=0)
    with pytest.raises(ValueError, match="targets must be"):
        lora.apply_lora(testing.tiny_model(), rank=2, targets=("qkv",))


def test_real_model_adapter_round_trip(real_model, gguf_path, tmp_path):
    """On the real 270M: identity at start, save, load onto a fresh load."""
    base, _ = real_model
    tokens = jnp.array([[2, 818, 5279, 529, 9405, 563]], jnp.int32)
    reference = base(tokens)

    # The session model is shared: adapt a copy, never the fixture itself.
    graphdef, state = nnx.split(base)
    model = lora.apply_lora(nnx.merge(graphdef, state), rank=8)
    np.testing.assert_array_equal(model(tokens), reference)
    assert lora.adapters(base) == {}

    _randomise_adapters(model)
    path = lora.save_adapter(model, tmp_path / "real.safetensors")
    fresh, _ = gemma_lab.load(gguf_path, progress=False)
    lora.load_adapter(fresh, path)
    np.testing.assert_allclose(fresh(tokens), model(tokens), atol=1e-6)


def test_merged_model_is_a_plain_copy_with_the_adapted_logits():
    model = lora.apply_lora(testing.tiny_model(), rank=4)
    _randomise_adapters(model)
    adapted = model(TOKENS)
    plain = lora.merged_model(model)
    assert lora.adapters(plain) == {}
    assert nnx.graphdef(plain) == nnx.graphdef(testing.tiny_model())
    np.testing.assert_allclose(plain(TOKENS), adapted, atol=1e-3)
    # The source model keeps its unmerged adapters and its logits.
    assert not any(m.merged for m in lora.adapters(model).values())
    np.testing.assert_array_equal(model(TOKENS), adapted)


def test_adapter_with_incomplete_metadata_is_a_clear_error(tmp_path):
    from safetensors.numpy import save_file

    model = lora.apply_lora(testing.tiny_model(), rank=4)
    path = tmp_path / "partial.safetensors"
    metadata = {"format": lora.FORMAT, "rank": "4"}
    save_file(lora.adapter_tensors(model), str(path), metadata=metadata)
    with pytest.raises(lora.AdapterMismatchError) as caught:
        lora.load_adapter(testing.tiny_model(), path)
    message = str(caught.value)
    assert str(path) in message
    assert "'alpha', 'targets', 'base'" in message


@pytest.mark.parametrize(
    "content",
    [b"", b"not a safetensors file at all!!!", None],
    ids=["empty", "garbage", "truncated"],
)
def test_unreadable_adapter_file_names_the_path(tmp_path, content):
    path = tmp_path / "broken.safetensors"
    if content is None:
        good = lora.save_adapter(
            lora.apply_lora(testing.tiny_model(), rank=2), tmp_path / "a.st"
        )
        content = good.read_bytes()[: good.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(
        lora.AdapterMismatchError, match="broken.safetensors.*not a readable"
    ):
        lora.load_adapter(testing.tiny_model(), path)


def _state_arrays(model):
    state = nnx.state(model)
    return jax.tree.structure(state), [
        np.asarray(x) for x in jax.tree.leaves(state)
    ]


def _assert_failed_load_changes_nothing(model, path, match):
    """Loading `path` raises AdapterMismatchError matching `match`, and the
    model's state (structure and every array) is as before."""
    structure, leaves = _state_arrays(model)
    with pytest.raises(lora.AdapterMismatchError, match=match):
        lora.load_adapter(model, path)
    after_structure, after_leaves = _state_arrays(model)
    assert after_structure == structure
    for old, new in zip(leaves, after_leaves, strict=True):
        np.testing.assert_array_equal(old, new)


@pytest.mark.parametrize("with_adapters", [False, True])
def test_failed_load_leaves_the_model_unchanged(tmp_path, with_adapters):
    def cut(meta, tensors, last):  # a late tensor, after others would load
        tensors[last] = tensors[last][..., :-1]

    _, bad, last = _rewritten(tmp_path, cut)
    model = testing.tiny_model()
    if with_adapters:
        lora.merge(lora.apply_lora(model, rank=4))
    _assert_failed_load_changes_nothing(model, bad, f"{last} has shape")


def test_atomic_writes_respect_the_umask(tmp_path):
    from gemma_lab.checkpoints import cache

    old = os.umask(0o022)
    try:
        adapter = lora.save_adapter(
            lora.apply_lora(testing.tiny_model(), rank=2), tmp_path / "a.st"
        )
        cache.atomic_write_bytes(b"x", tmp_path / "b.bin")
        cache.atomic_save({"w": np.zeros(2)}, tmp_path / "c.safetensors")
        os.umask(0o077)
        cache.atomic_write_bytes(b"x", tmp_path / "d.bin")
    finally:
        os.umask(old)
    modes = [
        stat.S_IMODE(p.stat().st_mode)
        for p in (adapter, tmp_path / "b.bin", tmp_path / "c.safetensors")
    ]
    assert modes == [0o644] * 3
    assert stat.S_IMODE((tmp_path / "d.bin").stat().st_mode) == 0o600


def _rewritten(tmp_path, change):
    """A saved adapter file, rewritten after change(meta, tensors)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    source = lora.apply_lora(testing.tiny_model(), rank=4)
    _randomise_adapters(source)
    good = lora.save_adapter(source, tmp_path / "good.safetensors")
    with safe_open(str(good), framework="numpy") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    last = sorted(tensors)[-1]
    change(meta, tensors, last)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    return source, bad, last


def _set(key, value):
    def change(meta, tensors, last):
        meta[key] = value

    return change


def _tensor(fn):
    def change(meta, tensors, last):
        tensors[last] = fn(tensors[last])

    return change


def _nan(x):
    x = x.copy()
    x.flat[0] = np.nan
    return x


@pytest.mark.parametrize(
    "change, match",
    [
        (_set("alpha", "nan"), r"bad.safetensors' has alpha nan"),
        (_set("alpha", "inf"), r"has alpha inf, expected a finite"),
        (_set("alpha", "0.0"), r"has alpha 0.0, expected a finite number"),
        (_set("alpha", "-8.0"), r"has alpha -8.0"),
        (_tensor(lambda x: x.astype(np.int32)), r"LAST has dtype int32"),
        (_tensor(_nan), r"LAST holds non-finite"),
        (_tensor(lambda x: x * np.inf), r"LAST holds non-finite"),
    ],
)
@pytest.mark.parametrize("with_adapters", [False, True])
def test_bad_alpha_or_tensors_leave_the_model_unchanged(
    tmp_path, change, match, with_adapters
):
    _, bad, last = _rewritten(tmp_path, change)
    model = testing.tiny_model()
    if with_adapters:
        lora.apply_lora(model, rank=4)
    match = match.replace("LAST", re.escape(last))
    _assert_failed_load_changes_nothing(model, bad, match)


def test_float16_adapter_tensors_are_cast_to_the_param_dtype(tmp_path):
    source, path, _ = _rewritten(
        tmp_path,
        lambda meta, tensors, last: tensors.update(
            {k: v.astype(np.float16) for k, v in tensors.items()}
        ),
    )
    loaded = lora.load_adapter(testing.tiny_model(), path)
    for module in lora.adapters(loaded).values():
        assert module.lora_a[...].dtype == jnp.float32
    np.testing.assert_allclose(loaded(TOKENS), source(TOKENS), atol=1e-2)
