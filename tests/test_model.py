"""The Transformer against transformers' Gemma 3 on tiny random weights."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma_lab import testing
from gemma_lab.checkpoints.hf import read_hf
from gemma_lab.checkpoints.rules import CheckpointError, build_model
from gemma_lab.config import GEMMA3_1B, GEMMA3_27B, PRESETS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def tiny_hf_config(**overrides):
    kwargs = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=8,
        sliding_window_pattern=2,
        max_position_embeddings=256,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        attn_implementation="eager",
    )
    kwargs.update(overrides)
    return transformers.Gemma3TextConfig(**kwargs)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(tiny_hf_config()).eval()
    # Random norm offsets, so that a wrong norm convention shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    folder = tmp_path_factory.mktemp("tiny_gemma3")
    model.save_pretrained(folder)
    return model, folder


def test_tiny_config_reads_every_architecture_detail(tiny_hf):
    _, folder = tiny_hf
    config, _, _ = read_hf(folder)
    assert config.sliding_window == 8
    assert config.query_pre_attn_scalar == 24
    assert config.global_rope_scale == 8.0
    assert config.global_layers == (1, 3)
    assert (config.num_heads, config.num_kv_heads) == (4, 2)


def test_logits_match_transformers_on_tiny_random_weights(tiny_hf):
    model_hf, folder = tiny_hf
    config, params, unmatched = read_hf(folder)
    model = build_model(config, params, source=str(folder), unmatched=unmatched)

    tokens = np.random.default_rng(0).integers(0, 300, size=(2, 40))
    with torch.no_grad():
        expected = model_hf(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(model(jnp.asarray(tokens)))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_loading_into_a_different_layer_count_lists_the_keys(tiny_hf):
    _, folder = tiny_hf
    config, params, _ = read_hf(folder)
    fewer = type(config)(**{**config.__dict__, "num_layers": 3})
    with pytest.raises(CheckpointError) as err:
        build_model(fewer, params, source=str(folder))
    message = str(err.value)
    assert "in the file but not the model" in message
    assert "layers.3.attn.q_proj.kernel" in message


def test_shape_mismatch_names_both_shapes(tiny_hf):
    _, folder = tiny_hf
    config, params, _ = read_hf(folder)
    wider = type(config)(**{**config.__dict__, "mlp_dim": 128})
    expected = r"file \(64, 96\), model \(64, 128\)"
    with pytest.raises(CheckpointError, match=expected):
        build_model(wider, params, source=str(folder))


def test_unmatched_stored_names_are_an_error(tiny_hf):
    _, folder = tiny_hf
    config, params, _ = read_hf(folder)
    with pytest.raises(CheckpointError, match="extra.weight"):
        build_model(config, params, source="x", unmatched=["extra.weight"])


def test_global_layers_of_the_1b_preset():
    assert GEMMA3_1B.global_layers == (5, 11, 17, 23)


def test_presets_use_published_query_scalars_and_rope_scaling():
    assert GEMMA3_27B.query_pre_attn_scalar == 168
    assert PRESETS["gemma3-270m"].global_rope_scale == 1.0
    assert PRESETS["gemma3-4b"].global_rope_scale == 8.0


def test_cache_free_forward_equals_chunked_forward_with_cache():
    model = testing.tiny_model()
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 512, (2, 30)))
    full = model(tokens)

    cache = model.init_cache(2, 32)
    outs = []
    for start, stop in [(0, 13), (13, 14), (14, 30)]:
        pos = jnp.broadcast_to(jnp.arange(start, stop), (2, stop - start))
        out = model.forward(tokens[:, start:stop], pos, cache=cache)
        cache = out.cache
        outs.append(out.logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)


@pytest.mark.parametrize("bad", [-3, 512, 10**6])
def test_token_ids_outside_the_vocabulary_are_rejected(bad):
    model = testing.tiny_model()
    tokens = jnp.array([[2, 10, bad, 11]], jnp.int32)
    with pytest.raises(ValueError, match=rf"\[0, 512\).*{bad}"):
        model(tokens)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 512\)"):
        model.forward(tokens, return_logits=False)


def test_padding_ids_and_traced_ids_are_not_checked():
    model = testing.tiny_model()
    tokens = jnp.array([[2, 10, -1]], jnp.int32)
    positions = jnp.array([[0, 1, -1]], jnp.int32)
    assert np.isfinite(model(tokens, positions)[:, :2]).all()

    @nnx.jit
    def logits(model, tokens):
        return model(tokens)

    assert logits(model, jnp.array([[2, 10, 11]], jnp.int32)).shape[1] == 3
