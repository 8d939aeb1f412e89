"""Preference data as users have it: TRL's field names, in files or Hugging Face datasets.

The rest of the package reads one record form (what :func:`validate_preference_records`
checks)::

    {"prompt": "<image>\\nHow many circles?",   # one human turn, one <image> placeholder
     "chosen": "There is one circle.", "rejected": "There are two.",
     "images": ["images/0.png"]}                 # one image path (relative to the image folder)

plus any other keys, kept as they are (``id``, ``split``, the world's ``scene_id``...).

:func:`read_preferences` turns what users have into that form:

- **TRL's standard form**: ``prompt``, ``chosen`` and ``rejected`` are strings (the prompt
  holds ``<image>`` where the image goes);
- **TRL's conversational form**: ``prompt`` is a list of ``{"role": "user", "content": ...}``
  messages and ``chosen`` / ``rejected`` a list with one ``{"role": "assistant", ...}``
  message; a ``content`` is a string or a list of parts ``{"type": "text", "text": ...}`` and
  ``{"type": "image"}``. Parts are joined with newlines and an image part becomes ``<image>``
  (so ``[image, text]`` reads ``"<image>\\nWhat?"``, the world's own layout). The internal form
  holds one human turn, so system and assistant messages in a prompt are refused;
- **images** (the ``images`` column, a list of one image) as a path, or as a PIL image
  (a ``datasets`` ``Image`` feature decodes to one).

A PIL image has no path, and every later step (the split by question, the image folder, the
encoder's ``open_image``) works on paths. So each one is written once as a PNG named by the
SHA-256 of its pixels into ``image_cache`` and the record gets that file's absolute path:
records stay plain JSON-serialisable values, the same picture in two rows is one question
when the data are split, and a second notebook reading the same data set finds the files
already written instead of holding every image in memory twice.

Containers: a list of records, a ``.json`` list or ``.jsonl`` lines (read here, BOM
tolerated), a ``.parquet`` file, a folder written by ``Dataset.save_to_disk``, or a
``datasets.Dataset`` / ``DatasetDict`` in memory (e.g. from ``load_dataset("json", ...)``,
``load_dataset("parquet", ...)`` or ``load_from_disk``). The last three need the optional
``datasets`` library (``pip install -e '.[data]'``). A ``DatasetDict``'s ``train`` split is
training data and its ``test`` / ``validation`` / ``heldout`` split held out. Every
container ends in the same validation, with the same errors (file, record and key named).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from companion.data.files import DataFileError, import_datasets, read_json_records

PREFERENCE_KEYS = ("prompt", "chosen", "rejected", "images")
IMAGE_PLACEHOLDER = "<image>"
SPLIT_NAMES = {"train": "train", "test": "heldout", "validation": "heldout",
               "heldout": "heldout"}


def _at(where: str, index: int, record) -> str:
    """``prefs.json, record 3 (id 'a7')``: where every record's error starts."""
    at = f"{where}, record {index}"
    if isinstance(record, dict) and record.get("id") is not None:
        at += f" (id {record['id']!r})"
    return at


def validate_preference_records(records, where: str = "preference data") -> list[dict]:
    """Check TRL-style preference records; raise ValueError naming the record and key."""
    if not isinstance(records, list):
        raise ValueError(f"{where}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise ValueError(f"{where}: no records")
    for index, record in enumerate(records):
        at = _at(where, index, record)
        if not isinstance(record, dict):
            raise ValueError(f"{at}: expected an object, got {type(record).__name__}")
        for key in PREFERENCE_KEYS:
            if key not in record:
                raise ValueError(f"{at}: missing key {key!r} (a preference record needs "
                                 f"{', '.join(PREFERENCE_KEYS)})")
        for key in ("prompt", "chosen", "rejected"):  # a reply may be empty, a prompt not
            if not isinstance(record[key], str) or (key == "prompt" and not record[key].strip()):
                raise ValueError(f"{at}, key {key!r}: expected a{' non-empty' * (key == 'prompt')}"
                                 f" string, got {record[key]!r}")
        images = record["images"]
        if (not isinstance(images, list) or len(images) != 1
                or not isinstance(images[0], str)):
            raise ValueError(f"{at}, key 'images': expected a list with one image path, got "
                             f"{images!r}")
        if record["prompt"].count(IMAGE_PLACEHOLDER) != 1:
            raise ValueError(f"{at}, key 'prompt': needs exactly one '<image>' placeholder, "
                             f"found {record['prompt'].count(IMAGE_PLACEHOLDER)}")
    return records


# ----------------------------------------------------------------------------- TRL's forms

def _content_text(content, at: str, images_allowed: bool) -> str:
    """A message's ``content`` (a string, or a list of text and image parts) as text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{at}: content is {type(content).__name__}; expected a string or a "
                         "list of {'type': 'text', 'text': ...} / {'type': 'image'} parts")
    texts = []
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image" and images_allowed:
            texts.append(IMAGE_PLACEHOLDER)
        elif kind == "image":
            raise ValueError(f"{at}: content part {number} is an image; a reply is text only")
        else:
            raise ValueError(f"{at}: content part {number} is {part!r}; expected "
                             "{'type': 'text', 'text': '...'} or {'type': 'image'}")
    return "\n".join(texts)


def _messages_text(messages, at: str, key: str) -> str:
    """The text of a conversational ``prompt`` (user messages) or reply (one assistant
    message)."""
    wanted = "user" if key == "prompt" else "assistant"
    if key != "prompt" and len(messages) != 1:
        raise ValueError(f"{at}, key {key!r}: expected a list with one assistant message, got "
                         f"{len(messages)} messages")
    if not messages:
        raise ValueError(f"{at}, key 'prompt': an empty list of messages; expected the user's "
                         "turn")
    texts = []
    for number, message in enumerate(messages):
        where = f"{at}, key {key!r}, message {number}"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: expected {{'role': ..., 'content': ...}}, got "
                             f"{message!r}")
        if message["role"] != wanted:
            extra = (" (the prompt is one user turn here: fold a system prompt into the user's "
                     "text, and drop earlier turns)" if key == "prompt" else "")
            raise ValueError(f"{where}: role {message['role']!r}; expected {wanted!r}{extra}")
        texts.append(_content_text(message["content"], where, images_allowed=key == "prompt"))
    return "\n".join(texts)


def store_image(image, image_cache) -> str:
    """Write the PIL ``image`` (as RGB) into ``image_cache`` as ``<sha256 of pixels>.png``
    unless it is there already; return the file's absolute path."""
    rgb = image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()
    folder = Path(image_cache).resolve()
    path = folder / f"{digest}.png"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{digest}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(handle, "wb") as file:
                rgb.save(file, format="PNG")
            os.replace(temporary, path)  # whole files only, even with two writers
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise
    return str(path)


def default_image_cache() -> Path:
    """Where PIL images go when no ``image_cache`` is given (shared, keyed by content)."""
    return Path(tempfile.gettempdir()) / "companion-preference-images"


def to_preference_record(record, at: str, image_cache=None):
    """``record`` in the internal form: conversational fields as text, PIL images as files
    (see the module's docstring). Anything else is left for the validation to report."""
    if not isinstance(record, dict):
        return record
    record = dict(record)
    for key in ("prompt", "chosen", "rejected"):
        if isinstance(record.get(key), list):
            record[key] = _messages_text(record[key], at, key)
            if key == "prompt" and record[key].count(IMAGE_PLACEHOLDER) != 1:
                raise ValueError(f"{at}, key 'prompt': needs exactly one image: one "
                                 "{'type': 'image'} part (or '<image>' in its text), found "
                                 f"{record[key].count(IMAGE_PLACEHOLDER)}")
    images = record.get("images")
    if isinstance(images, (list, tuple)):
        images = list(images)
        for number, image in enumerate(images):
            if hasattr(image, "convert") and hasattr(image, "tobytes"):  # a PIL image
                images[number] = store_image(image, image_cache or default_image_cache())
        record["images"] = images
    return record


# ----------------------------------------------------------------------------- containers

def _dataset_rows(dataset, where: str, datasets) -> list[tuple[str, dict]]:
    """``(where, row)`` of each row of a Dataset, or of every split of a DatasetDict (each
    row then gets the split's ``split`` unless it has one)."""
    if isinstance(dataset, datasets.DatasetDict):
        rows = []
        for name, part in dataset.items():
            if name not in SPLIT_NAMES:
                raise ValueError(f"{where}: split {name!r}; expected train, test, validation "
                                 "or heldout (train is trained on, the others held out); save "
                                 "one split alone to use it all for training")
            rows += [(f"{where}[{name!r}]", {"split": SPLIT_NAMES[name], **row})
                     for row in part]
        return rows
    if isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        return [(where, dict(row)) for row in dataset]
    raise TypeError(f"{where}: a {type(dataset).__name__}; expected a path, a list of records, "
                    "or a datasets.Dataset / DatasetDict")


def _path_rows(path: Path) -> list[tuple[str, dict]]:
    where = str(path)
    if path.is_dir():
        datasets = import_datasets(f"reading the dataset folder {path}")
        try:
            dataset = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise ValueError(f"{path}: a folder, but not one written by Dataset.save_to_disk; "
                             "pass that folder, or a .json, .jsonl or .parquet file") from None
        return _dataset_rows(dataset, where, datasets)
    if path.suffix.lower() == ".parquet":
        datasets = import_datasets(f"reading the Parquet file {path}")
        import pyarrow.parquet  # comes with the optional datasets (the `data` extra)

        # read in memory (no copy in the datasets cache); the schema keeps the Image feature
        table = datasets.table.InMemoryTable(pyarrow.parquet.read_table(path))
        return _dataset_rows(datasets.Dataset(table), where, datasets)
    try:
        records = read_json_records(path)
    except DataFileError as error:
        raise ValueError(str(error)) from None
    if not isinstance(records, list):
        validate_preference_records(records, where)  # names the wrong top level
    return [(where, record) for record in records]


def read_preferences(source, image_cache=None, where: str | None = None) -> list[dict]:
    """Validated preference records in the internal form, from any accepted container (a
    path as ``str``/``Path``, a list of records, a ``datasets.Dataset`` or ``DatasetDict``;
    see the module's docstring). ``image_cache``: where PIL images are written (default: a
    folder in the system's temporary directory)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no preference file here; make one with "
                                    "label_preferences and save_preferences, or pass the path of "
                                    "a TRL-style .json / .jsonl / .parquet file or a "
                                    "Dataset.save_to_disk folder")
        rows = _path_rows(path)
        where = where or str(path)
    elif isinstance(source, list):
        where = where or "preference data"
        rows = [(where, record) for record in source]
    else:
        datasets = import_datasets("reading a Hugging Face dataset")
        where = where or "dataset"
        rows = _dataset_rows(source, where, datasets)
    records, counts = [], {}
    for row_where, record in rows:
        index = counts.get(row_where, 0)  # the row's index within its split
        counts[row_where] = index + 1
        records.append(to_preference_record(record, _at(row_where, index, record), image_cache))
    if not counts:
        validate_preference_records([], where)  # no records
    for name in counts:  # each split under its own name, so an index is the row's in it
        validate_preference_records([r for (w, _), r in zip(rows, records) if w == name], name)
    return records
