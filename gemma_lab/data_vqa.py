"""easy-vqa as examples: images of one shape, questions, one-word answers.

The PyPI package `easy-vqa` (MIT) ships 64 x 64 PNG images, each showing one
shape (circle, rectangle or triangle) in one of eight colours, with questions
such as "what color is the shape?" or "does the image not contain a
triangle?". Every *answer* is one word from a closed list of 13 (`answers()`):
a shape, a colour, "yes" or "no". The train split holds 38,575 questions on
4,000 images, the test split 9,673 questions on 1,000 images.

An *example* (`VQAExample`) is one question with its answer and the path of
its image. The package stores its files next to its code, so paths are read
from the installed package and nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class VQAExample:
    """One easy-vqa question.

    Attributes:
        question: lower-case question text, e.g. "what is the blue shape?".
        answer: one word from `answers()`.
        image_id: image number within its split.
        image_path: the PNG file inside the installed package.
    """

    question: str
    answer: str
    image_id: int
    image_path: pathlib.Path


def _easy_vqa():
    try:
        import easy_vqa
    except ImportError as error:
        raise ImportError(
            "easy-vqa is not installed; `pip install easy-vqa` (or "
            '"gemma-lab[notebooks]") provides the images and questions.'
        ) from error
    return easy_vqa


def answers() -> list[str]:
    """The 13 possible answers, in the package's order."""
    return list(_easy_vqa().get_answers())


def load_split(split: str) -> list[VQAExample]:
    """All questions of one split, in the package's order.

    Args:
        split: "train" or "test".

    Returns:
        One `VQAExample` per question.

    Raises:
        ValueError: on another `split`.
        ImportError: if easy-vqa is not installed.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; expected one of {SPLITS}.")
    package = _easy_vqa()
    if split == "train":
        texts, replies, ids = package.get_train_questions()
        paths = package.get_train_image_paths()
    else:
        texts, replies, ids = package.get_test_questions()
        paths = package.get_test_image_paths()
    return [
        VQAExample(text, reply, int(i), pathlib.Path(paths[i]))
        for text, reply, i in zip(texts, replies, ids, strict=True)
    ]


def sample_examples(
    examples: Sequence[VQAExample], count: int, *, seed: int
) -> list[VQAExample]:
    """`count` distinct examples chosen at random by `seed`.

    Raises:
        ValueError: if `count` is not in [1, len(examples)].
    """
    if not 1 <= count <= len(examples):
        raise ValueError(
            f"count={count}; expected 1 <= count <= {len(examples)}."
        )
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(examples), size=count, replace=False)
    return [examples[i] for i in sorted(chosen)]


def examples_of_images(
    examples: Sequence[VQAExample], num_images: int, *, seed: int
) -> list[VQAExample]:
    """Every question about `num_images` images chosen at random by `seed`.

    Sampling images rather than questions keeps the number of images to
    encode small while still covering every kind of question.

    Raises:
        ValueError: if `num_images` is not in [1, number of images].
    """
    image_ids = sorted({example.image_id for example in examples})
    if not 1 <= num_images <= len(image_ids):
        raise ValueError(
            f"num_images={num_images}; expected 1 <= num_images <= "
            f"{len(image_ids)}."
        )
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(image_ids, size=num_images, replace=False))
    return [example for example in examples if example.image_id in chosen]


def unique_images(
    examples: Sequence[VQAExample],
) -> tuple[list[pathlib.Path], np.ndarray]:
    """The distinct images of some examples and each example's index in them.

    Returns:
        (paths in first-seen order, [len(examples)] int32 index into paths).
    """
    index_of: dict[pathlib.Path, int] = {}
    rows = [
        index_of.setdefault(example.image_path, len(index_of))
        for example in examples
    ]
    return list(index_of), np.asarray(rows, np.int32)


def load_image(path: str | pathlib.Path) -> np.ndarray:
    """One image as a [H, W, 3] uint8 array (64 x 64 for easy-vqa)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


COLOURS = ("red", "green", "blue", "teal", "yellow", "brown", "gray", "black")
"""The eight colour answers."""

SHAPES = ("circle", "rectangle", "triangle")
"""The three shape answers."""


def image_captions(examples: Sequence[VQAExample]) -> list[str]:
    """A two-word caption ("red circle") per distinct image, from answers.

    The words are read off the questions about each image: a colour or
    shape answer names its word directly, and a yes/no question about a
    colour or shape names it when the answer says it is present ("yes"
    without a negation, "no" with one). A word no question reveals is left
    out, so a caption may have one word or none.

    Args:
        examples: questions with answers, e.g. a training split.

    Returns:
        One caption per image, in the order of `unique_images(examples)`:
        the colour, then the shape, separated by a space.
    """
    paths, rows = unique_images(examples)
    colours: list[str | None] = [None] * len(paths)
    shapes: list[str | None] = [None] * len(paths)
    for example, row in zip(examples, rows, strict=True):
        word = _named_word(example)
        if word in COLOURS:
            colours[row] = word
        elif word in SHAPES:
            shapes[row] = word
    return [
        " ".join(word for word in pair if word)
        for pair in zip(colours, shapes, strict=True)
    ]


def _named_word(example: VQAExample) -> str | None:
    """The colour or shape an example shows to be in its image, if any."""
    if example.answer not in ("yes", "no"):
        return example.answer
    words = example.question.rstrip("?").split()
    negated = "not" in words or "no" in words
    if (example.answer == "yes") == negated:
        return None
    named = [word for word in words if word in COLOURS + SHAPES]
    return named[0] if named else None


def names_present(example: VQAExample) -> bool:
    """Whether a yes/no example asks about a colour or shape that is there.

    "Is there a red shape?" answered "yes" and "Is there not a circle?"
    answered "no" are both about something present; most easy-vqa yes/no
    questions ask about something absent.
    """
    return example.answer in ("yes", "no") and _named_word(example) is not None


def balance_presence(examples: Sequence[VQAExample]) -> list[VQAExample]:
    """The examples, with yes/no questions about present things repeated.

    In easy-vqa about five of six yes/no questions name a colour or shape
    that is absent, so a model that never looks at the image already
    answers most of them right. Repeating the questions about present
    things until both kinds are about equally many removes that shortcut.
    The copies are appended after the original examples, so
    `unique_images` lists the images in the same order.

    Args:
        examples: questions with answers, e.g. a training split.

    Returns:
        A new list: `examples`, then the extra copies.
    """
    present = [example for example in examples if names_present(example)]
    absent = sum(
        example.answer in ("yes", "no") and not names_present(example)
        for example in examples
    )
    repeats = absent // len(present) - 1 if present else 0
    return [*examples, *(present * max(repeats, 0))]


def presence_twins(
    examples: Sequence[VQAExample], *, seed: int
) -> list[VQAExample]:
    """Yes/no questions, each followed by a twin with the opposite answer.

    The twin names another word of the same kind: when the question's
    colour (or shape) is in the image, a colour that is not, chosen by
    `seed`; when it is not, the image's own colour. So the two questions
    differ in one word and only the image tells them apart, which leaves
    no answer that the question's wording alone predicts. The image's words
    come from `image_captions`; questions whose word of that kind is not
    known get no twin and are left out.

    Args:
        examples: questions with answers, e.g. a training split.
        seed: picks the absent words.

    Returns:
        [question, twin, question, twin, ...] for the yes/no questions.
    """
    examples = list(examples)
    captions = image_captions(examples)
    _, rows = unique_images(examples)
    rng = np.random.default_rng(seed)
    pairs = []
    for example, row in zip(examples, rows, strict=True):
        if example.answer not in ("yes", "no"):
            continue
        words = example.question.rstrip("?").split()
        named = [w for w in words if w in COLOURS + SHAPES]
        if not named:
            continue
        word = named[0]
        kind = COLOURS if word in COLOURS else SHAPES
        truth = next((w for w in captions[row].split() if w in kind), None)
        if truth is None:
            continue
        if word == truth:
            other = str(rng.choice([w for w in kind if w != truth]))
        else:
            other = truth
        twin = dataclasses.replace(
            example,
            question=re.sub(rf"\b{word}\b", other, example.question),
            answer="no" if example.answer == "yes" else "yes",
        )
        pairs += [example, twin]
    return pairs


def rationale_answers(examples: Sequence[VQAExample]) -> list[str | None]:
    """Training targets that say what the image shows before yes or no.

    A yes/no question names one colour ("is there a blue shape?") or one
    shape ("is there not a circle?"); its target first names the image's
    own word of that kind in the question's phrasing, then the answer:
    "a red shape: no", "a circle: no". The model then decides by comparing
    two phrases of text, the question's and its own, rather than a word
    with the image's soft tokens. Colour and shape answers stay one word.
    `final_answer` reads the answer back out of such a reply.

    Args:
        examples: questions with answers, e.g. a training split; the
            image's words come from `image_captions(examples)`.

    Returns:
        One target per example; None for a yes/no question whose image's
        word of the named kind no question reveals.
    """
    examples = list(examples)
    captions = image_captions(examples)
    _, rows = unique_images(examples)
    targets: list[str | None] = []
    for example, row in zip(examples, rows, strict=True):
        if example.answer not in ("yes", "no"):
            targets.append(example.answer)
            continue
        named = [
            word
            for word in example.question.rstrip("?").split()
            if word in COLOURS + SHAPES
        ]
        kind = COLOURS if named and named[0] in COLOURS else SHAPES
        truth = next((w for w in captions[row].split() if w in kind), None)
        if not named or truth is None:
            targets.append(None)
        elif kind is COLOURS:
            targets.append(f"a {truth} shape: {example.answer}")
        else:
            targets.append(f"a {truth}: {example.answer}")
    return targets


def final_answer(reply: str) -> str:
    """The answer in a reply: the text after its last colon, stripped.

    >>> final_answer("a red shape: no")
    'no'
    >>> final_answer(" circle ")
    'circle'
    """
    return reply.rpartition(":")[2].strip()
