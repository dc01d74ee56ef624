"""Loading errors, the on-disk cache, and the GGUF conventions."""

import numpy as np
import pytest

import gemma_lab
from gemma_lab.checkpoints import cache
from gemma_lab.checkpoints.gguf import GGUF_RULES, open_gguf
from gemma_lab.checkpoints.rules import CheckpointError, rename


def test_missing_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        gemma_lab.load(missing)


@pytest.mark.parametrize("path", ["", "  "])
def test_empty_checkpoint_path_is_rejected(path, tmp_path, monkeypatch):
    # From a folder that holds a checkpoint, "" must not load it.
    (tmp_path / "tokenizer.model").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="path must name a .gguf file"):
        gemma_lab.load(path)


@pytest.mark.parametrize("name", ["dtype", "param_dtype"])
def test_unknown_dtype_is_rejected_before_loading(name, tmp_path):
    # The missing file would raise later: the dtype check comes first.
    with pytest.raises(ValueError, match=f"^{name} must be one of float32"):
        gemma_lab.load(tmp_path / "nope.gguf", **{name: "float17"})


def test_truncated_gguf_is_a_clear_error(tmp_path, gguf_path):
    broken = tmp_path / "broken.gguf"
    with open(gguf_path, "rb") as f:
        broken.write_bytes(f.read(1 << 20))
    with pytest.raises(CheckpointError, match="broken.gguf"):
        gemma_lab.load(broken, use_cache=False)


def test_non_gguf_file_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(CheckpointError, match="junk.gguf"):
        open_gguf(junk)


def test_folder_without_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        gemma_lab.load(tmp_path)


def test_gguf_norms_are_stored_with_one_added():
    params, unmatched = rename(
        {"blk.3.attn_norm.weight": np.array([1.0, 1.5], np.float32)},
        GGUF_RULES,
    )
    assert unmatched == []
    np.testing.assert_array_equal(
        params["layers.3.pre_attention_norm.scale"], [0.0, 0.5]
    )


def test_gguf_projections_are_transposed_to_in_out():
    weight = np.arange(6, dtype=np.float32).reshape(2, 3)  # [out, in]
    params, _ = rename({"blk.0.attn_q.weight": weight}, GGUF_RULES)
    assert params["layers.0.attn.q_proj.kernel"].shape == (3, 2)


def test_unknown_tensor_names_are_reported_not_dropped():
    _, unmatched = rename({"blk.0.mystery.weight": np.zeros(2)}, GGUF_RULES)
    assert unmatched == ["blk.0.mystery.weight"]


def test_real_gguf_config_comes_from_metadata(real_model):
    model, _ = real_model
    config = model.config
    assert (config.width, config.num_layers, config.vocab_size) == (
        640,
        18,
        262_144,
    )
    assert config.sliding_window == 512
    assert config.global_layers == (5, 11, 17)


def test_cache_write_is_atomic_and_readable(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA_LAB_CACHE", str(tmp_path))
    arrays = {"a": np.arange(4, dtype=np.float32)}
    cache.store_cached("abc", "v1", arrays, {"k": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["abc.safetensors"]
    loaded, info = cache.load_cached("abc", "v1")
    np.testing.assert_array_equal(loaded["a"], arrays["a"])
    assert info == {"k": 1}
    assert cache.load_cached("abc", "v2") is None


def test_corrupt_cache_entry_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA_LAB_CACHE", str(tmp_path))
    (tmp_path / "abc.safetensors").write_bytes(b"garbage")
    assert cache.load_cached("abc", "v1") is None


def test_text_and_vision_tables_share_one_pair_of_transforms():
    from gemma_lab.checkpoints import hf_siglip, onnx_vit, rules

    vision = [hf_siglip.SIGLIP_RULES, onnx_vit.DINOV2_ONNX_RULES]
    tables = [rules.HF_RULES, rules.GGUF_RULES, *vision]
    transforms = {t.__name__: t for table in tables for *_, t in table}
    assert transforms["same"] is rules.same
    assert transforms["transpose"] is rules.transpose
    assert len({t for table in tables for *_, t in table}) == len(transforms)
