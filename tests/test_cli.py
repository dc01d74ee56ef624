"""Tests of the `gemma-lab` command on the real 270M (loaded once)."""

import io

import pytest

from gemma_lab import cli


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
        ("--temperature", "-1", "--temperature must be >= 0, got -1.0"),
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
