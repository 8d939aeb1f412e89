"""LLaVA's conversation JSON: round trip, real-style files, and one test per validation error."""

import json
import os

import pytest

from companion.data import llava
from companion.data.llava import (
    LlavaFormatError, iter_turns, load_llava_json, normalize_role, save_llava_json,
    validate_llava_records,
)
from companion.world import (
    TASK_TYPES, export_llava_dataset, load_world_dataset, make_instruction_dataset, make_scenes,
    render_scene,
)


def human(value):
    return {"from": "human", "value": value}


def gpt(value):
    return {"from": "gpt", "value": value}


@pytest.fixture
def folder(tmp_path):
    """A LLaVA-style folder: one image, data.json written by the test."""
    render_scene(make_scenes(1)[0], 32).save(tmp_path / "000123.png")
    return tmp_path


def good_record(**changes):
    record = {"id": "000123", "image": "000123.png",
              "conversations": [human("<image>\nWhat is in this picture?"), gpt("A circle."),
                                human("Where is it?"), gpt("At the top.")]}
    record.update(changes)
    return record


def write(folder, records, name="data.json"):
    path = folder / name
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return path


def load_error(folder, records) -> LlavaFormatError:
    """Load a file whose record 1 is broken (record 0 is fine); return the error."""
    path = write(folder, [good_record(id="ok"), *records])
    with pytest.raises(LlavaFormatError) as caught:
        load_llava_json(path)
    error = caught.value
    message = str(error)
    assert "data.json" in message and "record 1" in message, message
    assert error.path.endswith("data.json") and error.index == 1
    return error


# ----------------------------------------------------------------------------- round trips

def test_world_dataset_round_trip(tmp_path):
    scenes = make_scenes(12, seed=4)
    records = make_instruction_dataset(scenes, tasks=TASK_TYPES, seed=4)
    folder = export_llava_dataset(scenes, records, tmp_path / "world", image_size=32)
    loaded_records, loaded_scenes = load_world_dataset(folder)
    assert loaded_records == records and loaded_scenes == scenes
    from PIL import Image
    for scene in scenes:
        with Image.open(folder / scene.image) as image:
            assert image.convert("RGB").tobytes() == render_scene(scene, 32).tobytes()
    # exporting again gives the same bytes (PNG without timestamps, JSON in a fixed order)
    again = export_llava_dataset(scenes, records, tmp_path / "again", image_size=32)
    for name in ["data.json", "scenes.json", scenes[0].image]:
        assert (folder / name).read_bytes() == (again / name).read_bytes()


def test_save_then_load_is_identical(folder):
    records = [good_record(task="counting", checks=[{"kind": "count", "value": 1}]),
               {"conversations": [human("Say «hello» — 你好"), gpt("hello")]}]
    save_llava_json(records, folder / "data.json")
    assert load_llava_json(folder / "data.json") == records
    text = (folder / "data.json").read_text(encoding="utf-8")
    assert "你好" in text and text.index('"id"') < text.index('"image"')  # keys keep their order


def test_real_llava_style_file_with_text_only_record(folder):
    records = [
        {"id": "000000033471", "image": "000123.png",
         "conversations": [{"from": "human", "value": "What are the colors of the bus?\n<image>"},
                           {"from": "gpt", "value": "The bus is white and red."}]},
        {"id": "text-only", "conversations": [human("Name a colour."), gpt("Red.")]},
        {"id": "assistant-role", "image": "000123.png",
         "conversations": [human("<image>\nHi"), {"from": "assistant", "value": "Hello."}]},
    ]
    path = write(folder, records, "llava_v1_5_mix.json")
    assert load_llava_json(path) == records  # roles are not renamed
    assert [t["role"] for t in iter_turns(records[2])] == ["user", "assistant"]


def test_image_folder_can_be_elsewhere(tmp_path, folder):
    (tmp_path / "json").mkdir()
    path = write(tmp_path / "json", [good_record()])  # its image lives in `folder`
    with pytest.raises(LlavaFormatError, match="image file not found"):
        load_llava_json(path)
    assert load_llava_json(path, image_folder=folder)[0]["id"] == "000123"
    assert load_llava_json(path, check_images=False)[0]["id"] == "000123"


def test_normalize_role():
    assert [normalize_role(r) for r in ("human", "gpt", "assistant")] == ["user", "assistant",
                                                                         "assistant"]
    with pytest.raises(ValueError, match="bot"):
        normalize_role("bot")


# ----------------------------------------------------------------------------- one error each

def test_missing_image_file(folder):
    error = load_error(folder, [good_record(image="images/nowhere.png")])
    assert "image file not found" in error.problem
    assert str(folder / "images" / "nowhere.png") in error.problem


def test_image_without_placeholder(folder):
    record = good_record()
    record["conversations"][0] = human("What is in this picture?")
    error = load_error(folder, [record])
    assert 'has no "<image>"' in error.problem and "conversations[0]" in error.problem


def test_placeholder_twice(folder):
    record = good_record()
    record["conversations"][0] = human("<image>\n<image>\nWhat?")
    assert "2 times" in load_error(folder, [record]).problem


def test_placeholder_without_image(folder):
    record = good_record()
    del record["image"]
    error = load_error(folder, [record])
    assert 'has no "image"' in error.problem and "<image>" in error.problem


def test_placeholder_in_a_later_turn(folder):
    record = good_record()
    record["conversations"][2] = human("<image>\nWhere is it?")
    error = load_error(folder, [record])
    assert "conversations[2]" in error.problem and "first human turn" in error.problem


def test_roles_out_of_order(folder):
    record = good_record()
    record["conversations"][2] = gpt("Where is it?")
    error = load_error(folder, [record])
    assert 'conversations[2]["from"] is "gpt"' in error.problem and "alternate" in error.problem


def test_starts_with_gpt(folder):
    record = good_record(conversations=[gpt("<image>\nHello"), human("Hi")])
    error = load_error(folder, [record])
    assert 'conversations[0]["from"] is "gpt"' in error.problem
    assert "starts with" in error.problem


def test_trailing_human_turn(folder):
    record = good_record()
    record["conversations"] = record["conversations"][:3]
    error = load_error(folder, [record])
    assert "ends with" in error.problem and "conversations[2]" in error.problem


def test_empty_value(folder):
    record = good_record()
    record["conversations"][1] = gpt("  ")
    error = load_error(folder, [record])
    assert 'conversations[1]["value"] is empty' in error.problem


def test_non_string_value(folder):
    record = good_record()
    record["conversations"][1] = gpt(42)
    error = load_error(folder, [record])
    assert 'conversations[1]["value"] is a number; expected a string' in error.problem


def test_unknown_role(folder):
    record = good_record(id="000124")
    record["conversations"][1] = {"from": "bot", "value": "A circle."}
    error = load_error(folder, [record])
    assert str(error) == (f'{folder / "data.json"}, record 1 (id "000124"): '
                          'conversations[1]["from"] is "bot"; expected "human", "gpt" or '
                          '"assistant". Fix the role or drop the record.')
    assert error.record_id == "000124"


def test_missing_conversations(folder):
    record = good_record()
    del record["conversations"]
    assert 'no "conversations"' in load_error(folder, [record]).problem


def test_empty_conversations(folder):
    assert '"conversations" is empty' in load_error(folder, [good_record(conversations=[])]).problem


def test_turn_without_value(folder):
    record = good_record()
    record["conversations"][1] = {"from": "gpt"}
    assert 'conversations[1] has no "value"' in load_error(folder, [record]).problem


def test_record_not_an_object(folder):
    assert "is a list" in load_error(folder, [["not", "a", "record"]]).problem


def test_image_not_a_string(folder):
    assert '"image" is a list' in load_error(folder, [good_record(image=["a.png"])]).problem


def test_bad_json_names_line_and_column(folder):
    path = folder / "data.json"
    path.write_text('[\n  {"id": "1",\n   "conversations": []\n  ,]\n', encoding="utf-8")
    with pytest.raises(LlavaFormatError) as caught:
        load_llava_json(path)
    message = str(caught.value)
    assert "data.json" in message and "not valid JSON" in message and "line 4" in message
    assert caught.value.index is None


def test_top_level_not_a_list(folder):
    path = write(folder, {"conversations": []})
    with pytest.raises(LlavaFormatError, match="data.json: top level is an object; expected a "
                                               "JSON list"):
        load_llava_json(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.json.*export_llava_dataset"):
        load_llava_json(tmp_path / "nothing.json")


def test_all_problems_are_listed(folder):
    broken = [good_record(id=str(i), conversations=[gpt("x"), gpt("y")]) for i in range(30)]
    with pytest.raises(LlavaFormatError) as caught:
        validate_llava_records(broken, path="many.json", image_folder=folder)
    message = str(caught.value)
    assert message.startswith("60 problems in many.json:")
    assert "many.json, record 0 (id \"0\")" in message and "... and 40 more" in message
    assert len(caught.value.problems) == 60


def test_validate_in_memory_names_the_memory(folder):
    with pytest.raises(LlavaFormatError, match=r"^<memory>, record 0"):
        validate_llava_records([{"conversations": [human("<image>\nHi"), gpt("Hello")]}])


# ----------------------------------------------------------------------------- atomic writes

def test_failed_save_leaves_the_previous_file_intact(folder, monkeypatch):
    path = folder / "data.json"
    save_llava_json([good_record()], path)
    before = path.read_bytes()

    def broken_dump(obj, file, **kwargs):
        file.write('[{"id": "half a rec')  # a partial write, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(llava.json, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        save_llava_json([good_record(id="new")], path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(folder)) == ["000123.png", "data.json"]  # no temporary left


def test_save_validates_before_writing(folder):
    path = folder / "data.json"
    with pytest.raises(LlavaFormatError, match="data.json, record 0"):
        save_llava_json([good_record(conversations=[])], path)
    assert not path.exists()


# ------------------------------------------------------------------------- files as users have them

def write_lines(folder, records, name="data.jsonl", bom=False):
    path = folder / name
    text = "".join(json.dumps(record) + "\n" for record in records)
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    return path


def test_json_lines_file_is_read_as_records(folder):
    records = [good_record(id="a"), good_record(id="b")]
    path = write_lines(folder, records)
    path.write_text(path.read_text(encoding="utf-8") + "\n  \n", encoding="utf-8")  # blank lines
    assert load_llava_json(path) == records


def test_json_lines_errors_name_the_line_or_the_record(folder):
    path = folder / "data.jsonl"
    path.write_text(json.dumps(good_record(id="a")) + '\n{"id": "b",\n', encoding="utf-8")
    with pytest.raises(LlavaFormatError, match=r"data.jsonl: line 2 is not valid JSON"):
        load_llava_json(path)
    # the same record problem reads the same from a .json list and from .jsonl lines
    broken = good_record(id="b", conversations=[])
    messages = []
    for name, writer in (("data.json", write), ("data.jsonl", write_lines)):
        with pytest.raises(LlavaFormatError) as caught:
            load_llava_json(writer(folder, [good_record(id="a"), broken], name))
        assert caught.value.index == 1 and caught.value.record_id == "b"
        messages.append(str(caught.value).replace(name, "FILE"))
    assert messages[0] == messages[1] and '"conversations" is empty' in messages[0]


def test_json_file_holding_json_lines_says_so(folder):
    path = write_lines(folder, [good_record(id="a"), good_record(id="b")], name="data.json")
    with pytest.raises(LlavaFormatError) as caught:
        load_llava_json(path)
    message = str(caught.value)
    assert "holds JSON Lines" in message and "data.jsonl" in message, message
    assert "Extra data" not in message


@pytest.mark.parametrize("name", ["data.json", "data.jsonl"])
def test_byte_order_mark_is_tolerated(folder, name):
    records = [good_record(conversations=[human("<image>\nCouleur ?"), gpt("Rouge, déjà.")])]
    if name.endswith(".jsonl"):
        path = write_lines(folder, records, name, bom=True)
    else:
        path = folder / name
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert load_llava_json(path) == records


@pytest.mark.parametrize("name, text", [("data.json", "[]"), ("data.jsonl", "\n\n")])
def test_an_empty_data_set_is_refused_at_load(folder, name, text):
    (folder / name).write_text(text, encoding="utf-8")
    with pytest.raises(LlavaFormatError, match=rf"{name}: no records") as caught:
        load_llava_json(folder / name)
    assert caught.value.index is None
    with pytest.raises(LlavaFormatError, match="no records"):
        validate_llava_records([])


def test_repeated_ids_are_reported(folder):
    error = load_error(folder, [good_record(id="ok")])
    assert error.record_id == "ok" and "repeats the id of record 0" in error.problem
    # ids of different types are different ids; records without ids are fine
    path = write(folder, [good_record(id=1), good_record(id="1"), good_record(id=None),
                          {k: v for k, v in good_record().items() if k != "id"},
                          {k: v for k, v in good_record().items() if k != "id"}])
    assert len(load_llava_json(path)) == 5


@pytest.mark.parametrize("image", ["../../etc/passwd", "/etc/passwd", "images/../../x.png",
                                   "..\\secret.png", "C:\\Windows\\x.png",
                                   "\\\\server\\share\\x.png"])
def test_image_paths_outside_the_image_folder_are_refused(folder, image):
    record = good_record(image=image)
    error = load_error(folder, [record])
    assert "points outside the image folder" in error.problem
    assert "allow_outside_folder=True" in error.problem
    with pytest.raises(LlavaFormatError, match="points outside"):  # without images checked too
        load_llava_json(folder / "data.json", check_images=False)
    with pytest.raises(LlavaFormatError, match="points outside"):
        save_llava_json([record], folder / "other.json")


def test_allow_outside_folder_reads_images_elsewhere(tmp_path):
    outside = tmp_path / "shared"
    outside.mkdir()
    render_scene(make_scenes(1)[0], 32).save(outside / "a.png")
    (tmp_path / "set").mkdir()
    records = [good_record(id="rel", image="../shared/a.png"),
               good_record(id="abs", image=str(outside / "a.png"))]
    path = write(tmp_path / "set", records)
    with pytest.raises(LlavaFormatError) as caught:
        load_llava_json(path)
    assert [index for index, _, _ in caught.value.problems] == [0, 1]
    assert load_llava_json(path, allow_outside_folder=True) == records
    # a path that climbs and comes back down stays inside, and is read as before
    inside = write(tmp_path / "set", [good_record(image="x/../../set/b.png")], "in.json")
    render_scene(make_scenes(1)[0], 32).save(tmp_path / "set" / "b.png")
    with pytest.raises(LlavaFormatError, match="points outside"):
        load_llava_json(inside)  # x/../../set leaves set/ on the way: refused
    (tmp_path / "set" / "x").mkdir()
    ok = write(tmp_path / "set", [good_record(image="x/../b.png")], "ok.json")
    assert load_llava_json(ok)[0]["image"] == "x/../b.png"
