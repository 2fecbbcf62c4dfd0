"""One VQA question, the error for malformed data, and the one place images are decoded."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from PIL import Image, UnidentifiedImageError

__all__ = ["HF_PREFIX", "DEFAULT_SPLIT", "DatasetError", "ImageSource", "Question", "open_image"]

#: A path to an image file, an image, or a function that makes one.
ImageSource = Union[str, Path, Image.Image, Callable[[], Image.Image]]

#: ``--dataset hf:NAME`` loads ``NAME`` with the ``datasets`` library.
HF_PREFIX = "hf:"
#: The split of the built-in datasets when none is given. (``hf:`` datasets have none: their
#: only split, or the caller must choose.)
DEFAULT_SPLIT = "test"


class DatasetError(ValueError):
    """Malformed data: a bad row of an ``hf:`` dataset (the message names the dataset, split,
    row and column), found when it loads, or an image that cannot be read, found when its
    batch runs."""


@dataclass(frozen=True)
class Question:
    """One question of a dataset.

    Attributes:
        id: unique within its dataset; results, resuming and the ``random`` method's
            per-question seed are keyed on it.
        question: the question text (the prompt is built from it by the harness).
        answers: the human answers (10 for VQAv2 / OK-VQA, 1 for easy-VQA).
        image: a path, a PIL image, or a zero-argument function returning one.
        image_key: which image it asks about, where the dataset says (questions on one image
            share it); a validation split carved from training data goes by it.
    """

    id: str
    question: str
    answers: tuple[str, ...]
    image: ImageSource
    image_key: str | None = None

    def load_image(self) -> Image.Image:
        """The image, in RGB.

        Raises:
            DatasetError: the image file cannot be read (a function that makes the image
                raises its own, more precise, ``DatasetError``).
        """
        image = self.image
        if callable(image) and not isinstance(image, Image.Image):
            image = image()
        if isinstance(image, (str, Path)):
            try:
                return open_image(image)
            except (OSError, ValueError) as error:
                raise DatasetError(f"question {self.id!r}: cannot read image {str(image)!r}: {error}") from None
        return image.convert("RGB")


def open_image(source: str | Path | bytes | bytearray) -> Image.Image:
    """Decode an image file (a path or its bytes) into RGB, loaded now so that a broken file fails here.

    Raises:
        ValueError: not an image PIL can read (the message says so, without PIL's object reprs).
        OSError: the file cannot be opened (no such file, permission).
    """
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        with Image.open(stream) as opened:
            return opened.convert("RGB")
    except UnidentifiedImageError:
        raise ValueError("not an image file that PIL can read") from None
    except (SyntaxError, Image.DecompressionBombError) as error:  # PIL raises SyntaxError for some corrupt headers
        raise ValueError(f"corrupt image data ({error})") from None
