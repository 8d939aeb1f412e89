"""LLaVA's conversation JSON (the seed's instruction format): read, validate, write.

A file is a JSON list of records (``.json``), or the same records one per line (JSON Lines,
``.jsonl``)::

    [{"id": "000123",
      "image": "images/000123.png",              # optional; relative to an image folder
      "conversations": [
          {"from": "human", "value": "<image>\\nWhat is in this picture?"},
          {"from": "gpt",   "value": "a large red circle at the top left."},
          {"from": "human", "value": "Where is it?"},
          {"from": "gpt",   "value": "It is at the top left."}]}]

Roles alternate ``human``, ``gpt``, ``human``, ``gpt`` ... (``assistant`` is accepted as a
synonym of ``gpt``). A record with an image has exactly one ``<image>`` placeholder, in its
first human turn; a text-only record has none. Keys other than these (the shapes world adds
``task``, ``scene_id`` and ``checks``) are kept as they are, so load → save is a round trip.

A data set needs at least one record, ids (where given) are unique, since every later error
names a record by its id, and an ``"image"`` path stays inside the image folder (no absolute
path, no ``..`` that climbs out of it) unless ``allow_outside_folder=True``.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path, PureWindowsPath

from PIL import Image, UnidentifiedImageError

from companion.data.files import DataFileError, read_json_records

IMAGE_PLACEHOLDER = "<image>"
HUMAN_ROLES = ("human",)
ASSISTANT_ROLES = ("gpt", "assistant")
KNOWN_ROLES = HUMAN_ROLES + ASSISTANT_ROLES
MAX_LISTED_PROBLEMS = 20


class LlavaFormatError(ValueError):
    """A LLaVA JSON file (or list of records) that does not follow the format.

    Attributes: ``path`` (file name, or ``"<memory>"``), ``index`` (record index or None when
    the problem is the whole file), ``record_id`` (the record's ``"id"`` or None), ``problem``
    (what is wrong and what to do) and ``problems``: every ``(index, record_id, problem)``
    found; the first one fills the single attributes.
    """

    def __init__(self, path, index: int | None, record_id, problem: str,
                 problems: Sequence[tuple[int | None, object, str]] | None = None):
        self.path = str(path)
        self.index = index
        self.record_id = record_id
        self.problem = problem
        self.problems = list(problems) if problems else [(index, record_id, problem)]
        super().__init__(self._message())

    def _message(self) -> str:
        lines = [_locate(self.path, index, record_id) + problem
                 for index, record_id, problem in self.problems[:MAX_LISTED_PROBLEMS]]
        if len(lines) == 1:
            return lines[0]
        more = len(self.problems) - MAX_LISTED_PROBLEMS
        text = f"{len(self.problems)} problems in {self.path}:\n" + "\n".join(
            f"  - {line}" for line in lines)
        return text + (f"\n  ... and {more} more" if more > 0 else "")


def _locate(path: str, index: int | None, record_id) -> str:
    """``data.json, record 3 (id "000123"): `` -- the prefix of every problem line."""
    if index is None:
        return f"{path}: "
    where = f"{path}, record {index}"
    if record_id is not None:
        where += f" (id {json.dumps(record_id, ensure_ascii=False)})"
    return where + ": "


def _type_name(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value),
                                                                      type(value).__name__)


def normalize_role(value: str) -> str:
    """LLaVA role → chat-template role: ``human`` → ``user``, ``gpt``/``assistant`` →
    ``assistant``."""
    if value in HUMAN_ROLES or value == "user":
        return "user"
    if value in ASSISTANT_ROLES:
        return "assistant"
    raise ValueError(f"unknown role {value!r}; expected \"human\", \"gpt\" or \"assistant\"")


def iter_turns(record: dict) -> Iterator[dict]:
    """The record's turns as chat messages ``{"role": "user"|"assistant", "content": str}``."""
    for turn in record["conversations"]:
        yield {"role": normalize_role(turn["from"]), "content": turn["value"]}


def leaves_folder(relative: str) -> bool:
    """True when the image path ``relative`` points outside the folder it is resolved against:
    an absolute path (``/etc/passwd``, ``C:\\x``, ``\\\\server\\x``) or one whose ``..`` climb
    out of it (``../../etc/passwd``). Decided on the text alone, so symlinks inside the folder
    and folders that do not exist yet are judged alike."""
    text = relative.replace("\\", "/")
    if posixpath.isabs(text) or PureWindowsPath(relative).drive:
        return True
    return posixpath.normpath(text).split("/")[0] == ".."


def _record_problems(record, image_folder: Path | None, check_images: bool,
                     allow_outside_folder: bool = False) -> list[str]:
    """Every problem of one record, each a sentence that says what to do."""
    if not isinstance(record, dict):
        return [f"is {_type_name(record)}; expected an object with a \"conversations\" list."]
    problems = []
    image = record.get("image")
    has_image = "image" in record and image is not None
    if has_image and not isinstance(image, str):
        problems.append(f"\"image\" is {_type_name(image)}; expected a relative path string "
                        "such as \"images/000123.png\".")
    elif has_image and not allow_outside_folder and leaves_folder(image):
        problems.append(f"\"image\" {json.dumps(image, ensure_ascii=False)} points outside the "
                        "image folder; write it relative to image_folder (and pass image_folder="
                        "a folder that holds every image), or, if you trust the file, pass "
                        "allow_outside_folder=True.")
    elif has_image and check_images and image_folder is not None:
        resolved = Path(image_folder) / image
        if not resolved.is_file():
            problems.append(f"image file not found: {resolved} (\"{image}\" resolved against "
                            f"the image folder {image_folder}); check image_folder or the "
                            "\"image\" path.")

    if "conversations" not in record:
        return problems + ["has no \"conversations\" key; each record needs a list of "
                           "{\"from\": ..., \"value\": ...} turns."]
    turns = record["conversations"]
    if not isinstance(turns, list):
        return problems + [f"\"conversations\" is {_type_name(turns)}; expected a list of turns."]
    if not turns:
        return problems + ["\"conversations\" is empty; add a human turn and its gpt answer, "
                           "or drop the record."]

    previous = None  # role class of the previous well-formed turn: "human" or "gpt"
    for position, turn in enumerate(turns):
        where = f"conversations[{position}]"
        if not isinstance(turn, dict):
            problems.append(f"{where} is {_type_name(turn)}; expected an object with \"from\" "
                            "and \"value\".")
            continue
        missing = [key for key in ("from", "value") if key not in turn]
        if missing:
            names = " and no ".join(f"\"{key}\"" for key in missing)
            problems.append(f"{where} has no {names} key; each turn needs \"from\" (human or "
                            "gpt) and \"value\" (its text).")
            continue
        role, value = turn["from"], turn["value"]
        if role not in KNOWN_ROLES:
            problems.append(f"{where}[\"from\"] is {json.dumps(role, ensure_ascii=False)}; "
                            "expected \"human\", \"gpt\" or \"assistant\". Fix the role or drop "
                            "the record.")
        else:
            kind = "human" if role in HUMAN_ROLES else "gpt"
            expected = "human" if position % 2 == 0 else "gpt"
            if kind != expected:
                if position == 0:
                    problems.append(f"{where}[\"from\"] is \"{role}\"; a conversation starts "
                                    "with a \"human\" turn.")
                else:
                    problems.append(f"{where}[\"from\"] is \"{role}\" after a \"{previous}\" "
                                    "turn; roles must alternate human, gpt, human, gpt, ...")
            previous = kind
        if not isinstance(value, str):
            problems.append(f"{where}[\"value\"] is {_type_name(value)}; expected a string.")
            continue
        if not value.strip():
            problems.append(f"{where}[\"value\"] is empty; write the turn's text or drop the turn.")
        count = value.count(IMAGE_PLACEHOLDER)
        if position == 0:
            if has_image and count == 0:
                problems.append(f"has an image ({json.dumps(image, ensure_ascii=False)}) but "
                                f"{where}[\"value\"] has no \"{IMAGE_PLACEHOLDER}\"; put "
                                f"\"{IMAGE_PLACEHOLDER}\\n\" before the first question.")
            elif has_image and count > 1:
                problems.append(f"{where}[\"value\"] contains \"{IMAGE_PLACEHOLDER}\" {count} "
                                "times; a record has one image, so write it once.")
            elif not has_image and count:
                problems.append(f"has no \"image\" but {where}[\"value\"] contains "
                                f"\"{IMAGE_PLACEHOLDER}\"; add the \"image\" path or remove the "
                                "placeholder.")
        elif count:
            problems.append(f"{where}[\"value\"] contains \"{IMAGE_PLACEHOLDER}\"; only the first "
                            "human turn may hold the image placeholder.")
    last = turns[-1]
    if len(turns) % 2 == 1 and isinstance(last, dict) and last.get("from") in HUMAN_ROLES:
        problems.append(f"ends with a \"human\" turn (conversations[{len(turns) - 1}]) that has "
                        "no answer; add the gpt reply or drop the turn.")
    return problems


def _id_key(record_id) -> str:
    """A hashable, type-aware key for an id (``1`` and ``"1"`` differ)."""
    return json.dumps(record_id, sort_keys=True, ensure_ascii=False, default=repr)


def validate_llava_records(records, *, path="<memory>", image_folder=None,
                           check_images: bool = True, allow_outside_folder: bool = False
                           ) -> None:
    """Check ``records`` against the LLaVA conversation format; raise on any problem.

    Image files are looked for only when ``check_images`` and ``image_folder`` is given; an
    image path that leaves the image folder is refused unless ``allow_outside_folder``. An
    empty list and repeated ids are refused too. All problems are collected; the raised
    :class:`LlavaFormatError` lists them (up to 20).
    """
    if not isinstance(records, list):
        raise LlavaFormatError(path, None, None,
                               f"top level is {_type_name(records)}; expected a JSON list of "
                               "records, each {\"image\": ..., \"conversations\": [...]}.")
    if not records:
        raise LlavaFormatError(path, None, None,
                               "no records: the data set is empty. Point at the file that holds "
                               "the records, or add at least one.")
    folder = Path(image_folder) if image_folder is not None else None
    found = []
    first_with_id: dict[str, int] = {}
    for index, record in enumerate(records):
        record_id = record.get("id") if isinstance(record, dict) else None
        for problem in _record_problems(record, folder, check_images, allow_outside_folder):
            found.append((index, record_id, problem))
        if record_id is None:
            continue
        first = first_with_id.setdefault(_id_key(record_id), index)
        if first != index:
            problem = (f"repeats the id of record {first}; ids name records in every later "
                       "error, so give each record its own id.")
            found.append((index, record_id, problem))
    if found:
        index, record_id, problem = found[0]
        raise LlavaFormatError(path, index, record_id, problem, found)


def load_llava_json(path, image_folder=None, check_images: bool = True,
                    allow_outside_folder: bool = False) -> list[dict]:
    """Read and validate a LLaVA file (``.json`` list or ``.jsonl`` lines); return its records
    unchanged.

    The format follows the extension (:func:`companion.data.files.read_json_records`; a
    byte-order mark is tolerated). ``image_folder`` is where ``"image"`` paths are resolved:
    by default the file's own folder; a path outside it is refused unless
    ``allow_outside_folder``. Bad JSON, a wrong layout, no records, a repeated id or a
    missing image raises :class:`LlavaFormatError` naming the file, the record and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"LLaVA JSON file not found: {path}. Pass the path of a JSON list of records (.json) "
            "or of JSON Lines (.jsonl), e.g. the data.json written by "
            "companion.world.export_llava_dataset(...).")
    try:
        records = read_json_records(path)
    except DataFileError as error:
        raise LlavaFormatError(path, None, None, error.problem) from None
    folder = Path(image_folder) if image_folder is not None else path.parent
    validate_llava_records(records, path=str(path), image_folder=folder, check_images=check_images,
                           allow_outside_folder=allow_outside_folder)
    return records


def save_llava_json(records, path, *, image_folder=None, check_images: bool = False,
                    allow_outside_folder: bool = False) -> Path:
    """Validate ``records`` and write them to ``path`` atomically (UTF-8, indent 2).

    The JSON goes to a temporary file in the same folder which then replaces ``path``
    (``os.replace``), so a crash mid-write leaves the previous file intact. Keys keep the
    order they have in the records, so the bytes are deterministic.
    """
    path = Path(path)
    folder = image_folder if image_folder is not None else path.parent
    validate_llava_records(records, path=str(path), image_folder=folder, check_images=check_images,
                           allow_outside_folder=allow_outside_folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as file:
            json.dump(records, file, ensure_ascii=False, indent=2)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes it private; a data file is readable
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path


def open_image(image_folder, relative: str, where: str = "record"):
    """The RGB image at ``image_folder / relative`` (a record's ``"image"``, or a preference
    record's ``images[0]``), with an error naming the record and the file if it cannot be
    read."""
    path = Path(image_folder) / relative
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: image {path} not found; image paths are relative to "
                                "the image folder (pass image_folder=...)") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{where}: image {path} cannot be read as an image ({error}); "
                         "replace the file or drop the record") from None
