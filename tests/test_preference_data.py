"""Preference data as users have it (companion/data/preference.py): TRL's standard and
conversational forms, in .json / .jsonl / .parquet files, Hugging Face datasets (in memory,
save_to_disk, the json and parquet builders) and the errors, the same in every container."""

import json
import sys

import pytest
from PIL import Image

from companion.data.files import content_sha256
from companion.data.llava import open_image
from companion.preference import load_preferences
from companion.rlhf import RLHFRecipe, _data_config, preference_records


def _standard(i=0, **change):
    record = {"id": f"r{i}", "prompt": f"<image>\nHow many circles? ({i})",
              "chosen": "There is one circle.", "rejected": "There are two circles.",
              "images": [f"images/{i}.png"]}
    record.update(change)
    return record


def _conversational(i=0, image=None, **change):
    record = {"id": f"r{i}",
              "prompt": [{"role": "user", "content": [{"type": "image"},
                                                      {"type": "text",
                                                       "text": f"How many circles? ({i})"}]}],
              "chosen": [{"role": "assistant",
                          "content": [{"type": "text", "text": "There is one circle."}]}],
              "rejected": [{"role": "assistant",
                            "content": [{"type": "text", "text": "There are two circles."}]}],
              "images": [image if image is not None else f"images/{i}.png"]}
    record.update(change)
    return record


def _image(colour):
    return Image.new("RGB", (8, 6), colour)


def _write_lines(path, records, bom=False):
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- files

def test_standard_form_reads_the_same_from_json_jsonl_and_a_bom(tmp_path):
    records = [_standard(i, chosen="Un cercle, déjà.") for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(records), encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps(records), encoding="utf-8-sig")
    _write_lines(tmp_path / "c.jsonl", records)
    _write_lines(tmp_path / "d.jsonl", records, bom=True)
    for name in ("a.json", "b.json", "c.jsonl", "d.jsonl"):
        assert load_preferences(tmp_path / name) == records, name


def test_a_json_file_holding_json_lines_says_so(tmp_path):
    path = _write_lines(tmp_path / "prefs.json", [_standard(0), _standard(1)])
    with pytest.raises(ValueError, match=r"prefs.json: holds JSON Lines.*prefs.jsonl"):
        load_preferences(path)
    (tmp_path / "bad.jsonl").write_text(json.dumps(_standard()) + "\n{\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2 is not valid JSON"):
        load_preferences(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("text", ["[]", ""])
def test_an_empty_file_has_no_records(tmp_path, text):
    path = tmp_path / ("prefs.json" if text else "prefs.jsonl")
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path.name}: no records"):
        load_preferences(path)


def test_conversational_form_becomes_one_human_turn(tmp_path):
    record = _conversational(7, extra="kept")
    record["rejected"] = [{"role": "assistant", "content": "There are two circles."}]
    record["prompt"] = [{"role": "user", "content": [{"type": "image", "text": None},
                                                     {"type": "text", "text": "How many?"}]},
                        {"role": "user", "content": "Answer in a sentence."}]
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps([record]), encoding="utf-8")
    assert load_preferences(path) == [{
        "id": "r7", "prompt": "<image>\nHow many?\nAnswer in a sentence.",
        "chosen": "There is one circle.", "rejected": "There are two circles.",
        "images": ["images/7.png"], "extra": "kept"}]
    text_prompt = _conversational(prompt=[{"role": "user", "content": "<image>\nHow many?"}])
    assert load_preferences([text_prompt])[0]["prompt"] == "<image>\nHow many?"


SYSTEM = {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize("change, message", [
    ({"prompt": [SYSTEM]},
     r"key 'prompt', message 0: role 'system'; expected 'user' \(the prompt is one user turn"),
    ({"prompt": []}, "key 'prompt': an empty list of messages"),
    ({"prompt": [{"role": "user", "content": [{"type": "text", "text": "How many?"}]}]},
     r"key 'prompt': needs exactly one image: one \{'type': 'image'\} part .* found 0"),
    ({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}]},
     "needs exactly one image.* found 2"),
    ({"prompt": [{"role": "user", "content": [{"type": "video"}]}]},
     "key 'prompt', message 0: content part 0 is .*'video'"),
    ({"prompt": [{"role": "user", "content": 3}]},
     "key 'prompt', message 0: content is int"),
    ({"prompt": [{"role": "user"}]}, r"key 'prompt', message 0: expected \{'role'"),
    ({"chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "key 'chosen': expected a list with one assistant message, got 2"),
    ({"rejected": [{"role": "user", "content": "No."}]},
     "key 'rejected', message 0: role 'user'; expected 'assistant'"),
    ({"chosen": [{"role": "assistant", "content": [{"type": "image"}]}]},
     "key 'chosen', message 0: content part 0 is an image; a reply is text only"),
])
def test_bad_conversational_records_name_the_record_and_key(change, message):
    with pytest.raises(ValueError, match=message) as caught:
        load_preferences([_conversational(0), _conversational(1, **change)])
    assert "preference data, record 1 (id 'r1')" in str(caught.value)


# ----------------------------------------------------------------------------- datasets

@pytest.fixture
def hf():
    """The optional Hugging Face ``datasets`` library (these tests skip without it)."""
    return pytest.importorskip("datasets")


def _dataset(hf, form, n=3):
    """A tiny TRL preference dataset; rows 0 and 2 share one picture."""
    pictures = [_image("red"), _image("blue"), _image("red")]
    make = _standard if form == "standard" else _conversational
    rows = [make(i) for i in range(n)]
    for row, picture in zip(rows, pictures):
        row["images"] = [picture]
    return hf.Dataset.from_list(rows)


@pytest.mark.parametrize("form", ["standard", "conversational"])
def test_a_dataset_saved_to_disk_loads_back_in_both_forms(hf, tmp_path, form):
    folder = tmp_path / "prefs"
    _dataset(hf, form).save_to_disk(str(folder))
    cache = tmp_path / "image-cache"
    records = load_preferences(folder, image_cache=cache)
    assert [r["prompt"] for r in records] == [f"<image>\nHow many circles? ({i})"
                                              for i in range(3)]
    assert {r["chosen"] for r in records} == {"There is one circle."}
    paths = [r["images"][0] for r in records]
    assert paths[0] == paths[2] != paths[1]  # named by content: one question, one file
    assert sorted(p.name for p in cache.iterdir()) == sorted({p.split("/")[-1] for p in paths})
    assert open_image(tmp_path, paths[1]).tobytes() == _image("blue").tobytes()
    assert load_preferences(folder, image_cache=cache) == records  # written once, found again


def test_a_dataset_in_memory_and_from_the_json_and_parquet_builders(hf, tmp_path):
    cache = tmp_path / "image-cache"
    dataset = _dataset(hf, "conversational")
    expected = load_preferences(dataset, image_cache=cache)
    dataset.to_parquet(str(tmp_path / "prefs.parquet"))
    assert load_preferences(tmp_path / "prefs.parquet", image_cache=cache) == expected
    builder = hf.load_dataset("parquet", data_files=str(tmp_path / "prefs.parquet"),
                                    split="train", cache_dir=str(tmp_path / "hf"))
    assert load_preferences(builder, image_cache=cache) == expected
    _write_lines(tmp_path / "prefs.jsonl", [_conversational(i) for i in range(3)])
    from_json = hf.load_dataset("json", data_files=str(tmp_path / "prefs.jsonl"),
                                      split="train", cache_dir=str(tmp_path / "hf"))
    assert load_preferences(from_json) == load_preferences(tmp_path / "prefs.jsonl")
    assert load_preferences(from_json)[0]["images"] == ["images/0.png"]  # paths stay paths


def test_a_dataset_dict_gives_its_splits(hf, tmp_path):
    rows = [_standard(i) for i in range(4)]
    splits = hf.DatasetDict({"train": hf.Dataset.from_list(rows[:3]),
                                   "test": hf.Dataset.from_list(rows[3:])})
    splits.save_to_disk(str(tmp_path / "prefs"))
    records = load_preferences(tmp_path / "prefs")
    assert [r["split"] for r in records] == ["train", "train", "train", "heldout"]
    broken = hf.DatasetDict({"train": hf.Dataset.from_list(rows[:1]),
                                   "test": hf.Dataset.from_list([_standard(9, images=[])])})
    with pytest.raises(ValueError, match=r"dataset\['test'\], record 0 \(id 'r9'\), key "
                                         "'images'"):
        load_preferences(broken)
    odd = hf.DatasetDict({"dev": hf.Dataset.from_list(rows)})
    with pytest.raises(ValueError, match="dataset: split 'dev'; expected train, test"):
        load_preferences(odd)


def test_the_same_error_from_every_container(hf, tmp_path):
    rows = [_standard(0), _standard(1, images=["a.png", "b.png"])]
    dataset = hf.Dataset.from_list(rows)
    (tmp_path / "p.json").write_text(json.dumps(rows), encoding="utf-8")
    _write_lines(tmp_path / "p.jsonl", rows)
    dataset.to_parquet(str(tmp_path / "p.parquet"))
    dataset.save_to_disk(str(tmp_path / "p"))
    sources = [rows, dataset, *(tmp_path / n for n in ("p.json", "p.jsonl", "p.parquet", "p"))]
    messages = set()
    for source in sources:
        with pytest.raises(ValueError) as caught:
            load_preferences(source)
        messages.add(str(caught.value).split(", record 1", 1)[1])
        assert ", record 1 (id 'r1'), key 'images'" in str(caught.value)
    assert len(messages) == 1, messages
    with pytest.raises(ValueError, match="dataset: no records"):
        load_preferences(dataset.select([]))


def test_a_folder_that_is_not_a_dataset_and_other_types(hf, tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="not one written by Dataset.save_to_disk"):
        load_preferences(tmp_path / "folder")
    with pytest.raises(TypeError, match="a dict; expected a path, a list of records"):
        load_preferences({"prompt": "x"})


def test_without_datasets_the_error_says_how_to_install_it(hf, tmp_path, monkeypatch):
    _dataset(hf, "standard").save_to_disk(str(tmp_path / "prefs"))
    (tmp_path / "prefs.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    for source in (tmp_path / "prefs", tmp_path / "prefs.parquet", object()):
        with pytest.raises(ImportError, match=r"pip install -e '\.\[data\]'"):
            load_preferences(source)
    assert load_preferences([_standard()]) == [_standard()]  # plain files need no datasets


# ----------------------------------------------------------------------------- the 3.3 notebooks

def test_preference_json_takes_a_dataset_folder_keyed_by_its_content(hf, tmp_path):
    folder = tmp_path / "data" / "prefs"
    _dataset(hf, "conversational", n=3).save_to_disk(str(folder))
    recipe = RLHFRecipe(preference_json=str(folder))
    assert recipe.image_root == tmp_path / "data"  # relative paths: next to the dataset folder
    records = preference_records(tmp_path / "cache", recipe)
    assert {r["split"] for r in records} <= {"train", "heldout"} and len(records) == 3
    stored = {r["images"][0] for r in records}
    assert {str(p) for p in (tmp_path / "cache" / "preference-images").iterdir()} == stored
    key = _data_config(recipe)
    assert key["sha256"] == content_sha256(folder) and _data_config(recipe) == key
    edited = _dataset(hf, "conversational", n=3).map(
        lambda row: {"chosen": [{"role": "assistant",
                                 "content": [{"type": "text", "text": "One."}]}]})
    edited.save_to_disk(str(tmp_path / "edited"))
    assert _data_config(RLHFRecipe(preference_json=str(tmp_path / "edited")))["sha256"] != \
        key["sha256"]


def test_content_sha256_of_a_folder_sees_names_and_bytes(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    (tmp_path / "a" / "x").write_bytes(b"12")
    (tmp_path / "b" / "y").write_bytes(b"12")  # same bytes, another name
    (tmp_path / "c" / "x").write_bytes(b"13")  # same name, other bytes
    digests = {content_sha256(tmp_path / n) for n in ("a", "b", "c")}
    assert len(digests) == 3
    (tmp_path / "f").write_bytes(b"12")
    import hashlib
    assert content_sha256(tmp_path / "f") == hashlib.sha256(b"12").hexdigest()  # files as before
