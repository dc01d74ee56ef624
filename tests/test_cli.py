"""Tests of the `gemma-lab` command on the real 270M (loaded once).

Option checks and prompt lengths run on the tiny model with a stand-in
tokenizer, one id per character.
"""

import io

import pytest

from gemma_lab import cli, testing


@pytest.fixture()
def tiny_load(monkeypatch):
    """Makes the command load the tiny model (context 256)."""
    model = testing.tiny_model()
    monkeypatch.setattr(
        cli, "load", lambda path, **kwargs: (model, testing.CharTokenizer())
    )


@pytest.fixture()
def no_load(monkeypatch):
    """Fails the test if the command loads a model."""

    def load(path, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "load", load)


@pytest.fixture()
def offline_load(real_model, monkeypatch):
    """Makes the command reuse the session's model instead of reloading."""
    monkeypatch.setattr(cli, "load", lambda path, **kwargs: real_model)


def test_generate_prints_the_greedy_continuation(offline_load):
    out = io.StringIO()
    status = cli.main(
        ["generate", "--max-new-tokens", "8", "The capital of France is"],
        stdout=out,
    )
    assert status == 0 and "France" in out.getvalue()


def test_generate_with_the_same_seed_prints_the_same_sample(offline_load):
    argv = ["generate", "--max-new-tokens", "6", "--temperature", "1.0"]
    outs = [io.StringIO(), io.StringIO()]
    for out in outs:
        cli.main([*argv, "--seed", "4", "Once upon a time"], stdout=out)
    assert outs[0].getvalue() == outs[1].getvalue()


def test_generate_rejects_zero_new_tokens(capsys):
    assert cli.main(["generate", "--max-new-tokens", "0", "x"]) == 2
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err


def test_chat_answers_resets_and_exits(offline_load):
    out = io.StringIO()
    lines = io.StringIO("Hi\n/reset\nHello\n/exit\nnever read\n")
    argv = ["chat", "--max-new-tokens", "4", "--max-len", "1024"]
    assert cli.main(argv, stdin=lines, stdout=out) == 0
    assert "(conversation reset)" in out.getvalue()
    assert lines.read() == "never read\n"  # /exit stopped the reading.


@pytest.mark.parametrize(
    "option, value, message",
    [
        (
            "--temperature",
            "-1",
            "--temperature must be a finite number >= 0, got -1.0",
        ),
        ("--top-k", "0", "--top-k must be >= 1, got 0"),
        ("--top-p", "2", "--top-p must lie in (0, 1], got 2.0"),
    ],
)
def test_generate_rejects_bad_sampling_options(capsys, option, value, message):
    assert cli.main(["generate", option, value, "Hi"]) == 2
    assert message in capsys.readouterr().err


def test_missing_checkpoint_is_a_one_line_error(capsys, tmp_path):
    missing = str(tmp_path / "none.gguf")
    assert cli.main(["generate", "--checkpoint", missing, "Hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gemma-lab: error: checkpoint") and missing in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["generate", "--max-new-tokens", "8", "--max-len", "8", "Hi"],
            "--max-len must be >= --max-new-tokens + 1 = 9, got 8",
        ),
        (
            ["generate", "--max-new-tokens", "8", "--max-len", "9",
             "--truncate", "Hi"],
            "--max-len must be >= --max-new-tokens + 2 = 10, got 9",
        ),
        (
            ["chat", "--max-new-tokens", "300", "--max-len", "256"],
            "--max-len must be >= --max-new-tokens + 1 = 301, got 256",
        ),
        (
            ["generate", "--max-new-tokens", "99999999", "x"],
            "--max-new-tokens must be <= --max-len - 1 = 2047 (--max-len "
            "defaults to 2048), got 99999999",
        ),
        (
            ["chat", "--max-new-tokens", "99999999"],
            "--max-new-tokens must be <= --max-len - 1 = 2047",
        ),
        (
            ["generate", "--top-k", "99999999999", "x"],
            "--top-k must be <= the model's vocabulary size 262144, got "
            "99999999999",
        ),
    ],
)  # fmt: skip
def test_max_len_without_room_is_rejected_before_loading(
    no_load, capsys, argv, message
):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_prompt_over_max_len_is_a_one_line_error(tiny_load, capsys):
    argv = ["generate", "--max-new-tokens", "4", "--max-len", "64"]
    out = io.StringIO()
    assert cli.main([*argv, "x" * 100], stdout=out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and out.getvalue() == ""
    assert "the prompt has 101 tokens, over the 60 that --max-len 64" in err
    assert "pass --truncate" in err


def test_default_max_len_is_the_tiny_models_context(tiny_load, capsys):
    out = io.StringIO()
    argv = ["generate", "--max-new-tokens", "4", "x" * 300]
    assert cli.main(argv, stdout=out) == 2
    assert "--max-len 256 leaves" in capsys.readouterr().err


def test_new_tokens_over_the_default_max_len_are_named(tiny_load, capsys):
    # The tiny model's context (256) lowers the default after loading.
    assert cli.main(["generate", "--max-new-tokens", "300", "x"]) == 2
    err = capsys.readouterr().err
    assert "--max-new-tokens must be <= --max-len - 1 = 255" in err


def test_top_k_over_a_checkpoints_vocabulary_names_the_flag(tiny_load, capsys):
    argv = ["generate", "--checkpoint", "tiny.gguf", "--top-k", "100000"]
    assert cli.main([*argv, "x"]) == 2
    assert "--top-k must be <= the model's vocabulary size" in (
        capsys.readouterr().err
    )


def test_truncate_keeps_the_newest_prompt_tokens(tiny_load, monkeypatch):
    seen = {}
    stream = cli.Sampler.stream

    def spy(self, prompt, **kwargs):
        pieces = stream(self, prompt, **kwargs)
        seen.update(kwargs, pieces=pieces)
        return pieces

    monkeypatch.setattr(cli.Sampler, "stream", spy)
    argv = ["generate", "--max-new-tokens", "4", "--max-len", "64"]
    out = io.StringIO()
    assert cli.main([*argv, "--truncate", "x" * 100], stdout=out) == 0
    assert seen["max_len"] == 64 and seen["truncate"] is True
    assert seen["pieces"].result.lengths == [64 - 4 + 3]


def test_max_len_over_the_models_context_is_an_error(tiny_load, capsys):
    argv = ["generate", "--max-len", "4096", "Hi"]
    assert cli.main(argv) == 2
    assert "--max-len must be <= the model's context 256, got 4096" in (
        capsys.readouterr().err
    )


UNDECODABLE = b"caf\xe9".decode("utf-8", "surrogateescape")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--temperature", "nan", "Hi"], "--temperature must be"),
        (["generate", "--temperature", "inf", "Hi"], "--temperature must be"),
        (["generate", "--stop", "", "Hi"], "--stop must be a non-empty"),
        (["generate", "--max-len", "100000000", "Hi"], "--max-len must be <="),
        (["chat", "--max-len", "100000"], "--max-len must be <= the model's"),
        (["generate", "--seed", "9" * 23, "Hi"], "--seed must lie in"),
        (["chat", "--seed", "-1"], "--seed must lie in [0, 2**32), got -1"),
        (["chat", "--system", "   "], "--system must be a non-blank text"),
        (["generate", UNDECODABLE], "the prompt: text is not valid UTF-8"),
    ],
)
def test_bad_options_are_rejected_before_loading(
    no_load, capsys, argv, message
):
    assert cli.main(argv, stdin=io.StringIO("")) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_chat_reports_a_bad_message_on_stderr_and_continues(tiny_load, capsys):
    lines = io.StringIO(f"{UNDECODABLE}\n{'x' * 100}\nHi\n")
    out = io.StringIO()
    argv = ["chat", "--max-new-tokens", "4", "--max-len", "64"]
    assert cli.main(argv, stdin=lines, stdout=out) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "not valid UTF-8" in err[0]
    assert "over --max-len 64; type /reset" in err[1]
    assert "error" not in out.getvalue()
