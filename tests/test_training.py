"""Masked loss, the training step, checkpoints and resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma_lab import lora, testing, training

CONFIG = training.TrainConfig(
    steps=6,
    batch_size=4,
    grad_accum=2,
    seq_len=24,
    max_targets=16,
    learning_rate=1e-2,
    warmup_steps=1,
    eval_every=3,
    checkpoint_every=3,
)


def _sequences(num=24, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        length = int(rng.integers(10, 20))
        ids = rng.integers(3, 500, length).tolist()
        out.append(([2, *ids], int(rng.integers(4, length - 3))))
    return out


def _adapted(seed=0):
    return lora.apply_lora(testing.tiny_model(seed), rank=4)


def test_make_batch_masks_exactly_the_response_labels():
    batch = training.make_batch([([2, 5, 6, 7, 8], 3)], seq_len=7)
    np.testing.assert_array_equal(batch.labels[0, :4], [5, 6, 7, 8])
    # Labels 7 and 8 (at positions 2 and 3) are the response ids.
    np.testing.assert_array_equal(batch.loss_mask[0], [0, 0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(batch.positions[0], [0, 1, 2, 3, 4, -1, -1])


def test_response_loss_equals_a_naive_full_logits_loss():
    model = testing.tiny_model()
    batch = training.make_batch(_sequences(4), seq_len=24)
    loss = training.response_loss(model, batch, max_targets=8)

    logits = model(jnp.asarray(batch.tokens), jnp.asarray(batch.positions))
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -np.take_along_axis(
        np.asarray(log_probs), batch.labels[..., None], -1
    )[..., 0]
    expected = (nll * batch.loss_mask).sum() / batch.loss_mask.sum()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_changing_labels_at_prompt_positions_keeps_the_loss():
    model = testing.tiny_model()
    batch = training.make_batch(_sequences(4), seq_len=24)
    noise = np.random.default_rng(1).integers(3, 500, batch.labels.shape)
    labels = np.where(batch.loss_mask, batch.labels, noise.astype(np.int32))
    changed = training.Batch(
        batch.tokens, batch.positions, labels, batch.loss_mask
    )
    assert not np.array_equal(changed.labels, batch.labels)
    np.testing.assert_array_equal(
        training.response_loss(model, batch, max_targets=8),
        training.response_loss(model, changed, max_targets=8),
    )


def test_one_step_changes_only_adapter_params():
    model = _adapted()
    before = nnx.state(model, nnx.Not(lora.LoRAParam))
    before = jax.tree.map(np.array, before)
    adapters_before = jax.tree.map(np.array, nnx.state(model, lora.LoRAParam))

    trainer = training.Trainer(model, CONFIG)
    trainer.train_step(training._step_batch(_sequences(), CONFIG, 0))
    trainer.sync()

    after = nnx.state(model, nnx.Not(lora.LoRAParam))
    for old, new in zip(
        jax.tree.leaves(before), jax.tree.leaves(after), strict=True
    ):
        np.testing.assert_array_equal(old, new)
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(adapters_before),
            jax.tree.leaves(nnx.state(model, lora.LoRAParam)),
            strict=True,
        )
    ]
    assert any(changed)


def test_gradient_accumulation_equals_one_large_batch():
    sequences = _sequences(8)
    big = training.make_batch(sequences, seq_len=24)
    split = jax.tree.map(lambda x: x.reshape(2, 4, 24), big)
    whole = jax.tree.map(lambda x: x[None], big)
    config_a = training.TrainConfig(
        steps=2, batch_size=4, grad_accum=2, seq_len=24, warmup_steps=0
    )
    config_b = training.TrainConfig(
        steps=2, batch_size=8, grad_accum=1, seq_len=24, warmup_steps=0
    )
    a, b = training.Trainer(_adapted(), config_a), None
    b = training.Trainer(_adapted(), config_b)
    np.testing.assert_allclose(
        a.train_step(split), b.train_step(whole), rtol=1e-6
    )
    for x, y in zip(
        jax.tree.leaves(a.adapters), jax.tree.leaves(b.adapters), strict=True
    ):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_training_lowers_the_loss_and_records_evaluations():
    history = training.train(
        _adapted(),
        _sequences(),
        CONFIG,
        eval_sequences=_sequences(6, seed=3),
        progress=False,
    )
    assert history.steps == list(range(1, 7))
    assert history.eval_steps == [3, 6]
    assert history.losses[-1] < history.losses[0]


def test_resume_reproduces_the_uninterrupted_loss_curve(tmp_path):
    sequences = _sequences()
    full = training.train(_adapted(), sequences, CONFIG, progress=False)

    seen = []
    with pytest.raises(_Interrupt):
        training.train(
            _adapted(),
            sequences,
            CONFIG,
            checkpoint_dir=tmp_path,
            progress=False,
            callback=_stop_after(3, seen),
        )
    assert [p.name for p in training.checkpoints(tmp_path)] == ["step_000003"]
    resumed = training.train(
        _adapted(),
        sequences,
        CONFIG,
        checkpoint_dir=tmp_path,
        progress=False,
    )
    assert resumed.steps == [4, 5, 6]
    curve = seen + resumed.losses
    np.testing.assert_allclose(curve, full.losses, rtol=1e-6)


class _Interrupt(Exception):
    pass


def _stop_after(step, seen):
    """A callback that records losses and interrupts after `step`."""

    def callback(current, loss, eval_loss):
        seen.append(loss)
        if current == step:
            raise _Interrupt

    return callback


def test_checkpoints_leave_no_partial_folders(tmp_path):
    trainer = training.Trainer(_adapted(), CONFIG)
    training.save_checkpoint(trainer, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step_000000"]
    assert sorted(p.name for p in (tmp_path / "step_000000").iterdir()) == [
        "adapter.safetensors",
        "optimizer.npz",
        "trainer.json",
    ]


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="TrainConfig.batch_size"):
        training.TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="no adapters"):
        training.Trainer(testing.tiny_model(), CONFIG)


def test_out_of_vocabulary_ids_are_rejected_before_training():
    config = training.TrainConfig(
        steps=2, warmup_steps=0, batch_size=2, seq_len=32, eval_every=0
    )
    bad = [([2, 5, 6, 7], 2), (list(range(500, 530)), 20)]
    with pytest.raises(
        ValueError, match=r"sequences\[1\] holds token id 512, .*\[0, 512\)"
    ):
        training.train(_adapted(), bad, config, progress=False)
    with pytest.raises(ValueError, match=r"eval_sequences\[0\] .* -1"):
        training.train(
            _adapted(), bad[:1], config, eval_sequences=[([2, -1, 3], 1)]
        )


def test_responses_longer_than_max_targets_are_rejected():
    config = training.TrainConfig(
        steps=2, warmup_steps=0, batch_size=2, seq_len=32, max_targets=4
    )
    sequences = [([2, 5, 6, 7], 2), ([2, 5, 6, 7, 8, 9, 10, 11], 2)]
    with pytest.raises(
        ValueError, match=r"sequences\[1\] has a response of 6 .*max_targets=4"
    ):
        training.train(_adapted(), sequences, config, progress=False)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"learning_rate": -1.0}, ValueError, "learning_rate must be > 0"),
        (
            {"learning_rate": float("nan")},
            ValueError,
            "learning_rate must be finite",
        ),
        ({"learning_rate": "1e-3"}, TypeError, "learning_rate must be a"),
        ({"steps": 2.5, "warmup_steps": 0}, TypeError, "steps must be an int"),
        ({"batch_size": True}, TypeError, "batch_size must be an int"),
        ({"eval_every": -1}, ValueError, "eval_every must be >= 0"),
        ({"keep_checkpoints": 0}, ValueError, "keep_checkpoints must be > 0"),
        ({"end_lr_fraction": 2.0}, ValueError, r"end_lr_fraction .*\[0, 1\]"),
        ({"steps": 5, "warmup_steps": 5}, ValueError, "warmup_steps must be"),
        (
            {"seq_len": 8, "max_targets": 9},
            ValueError,
            r"max_targets must be <= seq_len=8, got 9",
        ),
        ({"seed": 2**32}, ValueError, r"seed must be in \[0, 2\*\*32\)"),
        ({"seed": -1}, ValueError, "seed must be >= 0"),
    ],
)
def test_config_types_and_ranges_are_checked(kwargs, error, match):
    with pytest.raises(error, match=f"TrainConfig.{match}"):
        training.TrainConfig(**kwargs)


def test_default_warmup_adapts_to_short_runs():
    assert training.TrainConfig(steps=5).warmup_steps == 0
    assert training.TrainConfig(steps=50).warmup_steps == 5
    assert training.TrainConfig().warmup_steps == 10
    assert training.TrainConfig(steps=8, warmup_steps=2).warmup_steps == 2
    assert training.TrainConfig(steps=5) == training.TrainConfig(
        steps=5, warmup_steps=0
    )


@pytest.mark.parametrize(
    "sequences, error, match",
    [
        (iter([([2, 5, 6], 1)]), TypeError, "sequences must be a list"),
        ([], ValueError, "sequences must not be empty"),
        ([([2, 5, 6], 1), [2, 5, 6]], ValueError, r"sequences\[1\] .*prompt"),
        ([([2, 5, 6], 1, 0)], ValueError, r"sequences\[0\] .*\(ids, prompt"),
        ([("abc", 1)], ValueError, r"sequences\[0\] has ids 'abc'"),
        ([([2, True, 6], 1)], ValueError, r"sequences\[0\] holds id True"),
        ([([2, 5.0, 6], 1)], ValueError, r"sequences\[0\] holds id 5.0"),
        ([([2, 5, 6], 1.0)], ValueError, r"prompt length 1.0 .*an int"),
        (
            [([2, 5, 6], 1), ([2, 5, 6, 7, 8], -1)],
            ValueError,
            r"sequences\[1\] has prompt length -1 .*"
            r"expected 1 <= prompt length < 5",
        ),
        ([([2, 5, 6], 3)], ValueError, "1 <= prompt length < 3"),
        ([([2, 5, 6], 0)], ValueError, "1 <= prompt length < 3"),
        ([([2] * 9, 1)], ValueError, r"9 ids, .*TrainConfig.seq_len=8"),
        ([([2, 9999, 6], 0)], ValueError, r"token id 9999, .*\[0, 512\)"),
    ],
)
def test_malformed_sequences_are_rejected_before_training(
    sequences, error, match
):
    config = training.TrainConfig(
        steps=2, warmup_steps=0, batch_size=2, seq_len=8, max_targets=8
    )
    with pytest.raises(error, match=match):
        training.train(_adapted(), sequences, config, progress=False)


def test_numpy_counts_become_python_ints():
    config = training.TrainConfig(
        steps=np.int64(20), seq_len=np.int32(16), warmup_steps=np.int64(2)
    )
    assert type(config.steps) is int and type(config.seq_len) is int
    assert type(config.warmup_steps) is int and config.warmup_steps == 2
    assert config == training.TrainConfig(steps=20, seq_len=16, warmup_steps=2)
