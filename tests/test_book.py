"""book.toml validation, the parameter parser and the CLI."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest

from companion import book as bookmod
from companion.book import BookConfigError, load_book, parse_cli_value

ROOT = Path(__file__).resolve().parent.parent

PARAMS = """\
seed: int = 0  # random seed
steps = 10  # training steps
output_dir = "../build/x"  # where metrics go
cache_dir = "../.cache"  # shared artifacts
"""


def make_notebook(path: Path, params: str = PARAMS, body: str = "print(steps * 2)") -> Path:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), cell, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def write_book(tmp_path: Path, extra: str = "", chapter_extra: str = "",
               notebook: str = "nb/a.ipynb") -> Path:
    make_notebook(tmp_path / "nb" / "a.ipynb")
    text = textwrap.dedent(f"""\
        [book]
        title = "T"

        [[chapter]]
        id = "1"
        notebook = "{notebook}"
        title = "One"
        seed_section = "3.1"
        {chapter_extra}

        [profile.default]
        description = "defaults"

        [profile.smoke]
        description = "fast"
        [profile.smoke.parameters."1"]
        steps = 2
        """) + textwrap.dedent(extra)
    path = tmp_path / "book.toml"
    path.write_text(text)
    return path


def test_valid_book_loads(tmp_path):
    book = load_book(write_book(tmp_path))
    assert [c.id for c in book.chapters] == ["1"]
    assert book.declared["1"]["steps"] == {"default": "10", "type": "", "help": "training steps"}
    assert book.declared["1"]["seed"]["type"] == "int"
    assert book.profile("smoke").parameters_for("1") == {"steps": 2}
    params = bookmod.resolve_parameters(book, book.chapters[0], "smoke", {"seed": 3, "x": 1})
    assert params["steps"] == 2 and params["seed"] == 3 and "x" not in params
    assert params["output_dir"] == str(tmp_path / "build" / "smoke")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"extra": "[bogus]\nx = 1\n"}, r"unknown key 'bogus' in the top level"),
        ({"chapter_extra": 'colour = "red"'}, r"unknown key 'colour' in \[\[chapter\]\] #1"),
        ({"notebook": "nb/missing.ipynb"}, r"notebook 'nb/missing.ipynb' does not exist"),
        ({"extra": '[profile.smoke.parameters."*"]\nstepz = 1\n'},
         r"sets 'stepz', which nb/a.ipynb \(chapter 1\) does not declare"),
        ({"extra": '[profile.gpu.parameters."9"]\nsteps = 1\n'}, r"names no chapter"),
        ({"extra": "[profile.gpu]\nspeed = 1\n"}, r"unknown key 'speed' in \[profile.gpu\]"),
        ({"extra": '[profile.gpu.parameters."1"]\noutput_dir = "x"\n'},
         r"sets 'output_dir', which the runner sets itself"),
    ],
)
def test_bad_book_names_the_problem(tmp_path, kwargs, message):
    with pytest.raises(BookConfigError, match=message):
        load_book(write_book(tmp_path, **kwargs))


def test_missing_chapter_key_and_bad_toml(tmp_path):
    path = write_book(tmp_path)
    path.write_text(path.read_text().replace('title = "One"\n', ""))
    with pytest.raises(BookConfigError, match=r"lacks the key 'title'"):
        load_book(path)
    path.write_text("[book\n")
    with pytest.raises(BookConfigError, match="not valid TOML"):
        load_book(path)
    with pytest.raises(BookConfigError, match="not found"):
        load_book(tmp_path / "nope.toml")


def test_notebook_without_parameters_cell(tmp_path):
    path = write_book(tmp_path)
    nb = nbformat.read(tmp_path / "nb" / "a.ipynb", as_version=4)
    nb.cells[1].metadata["tags"] = []
    nbformat.write(nb, tmp_path / "nb" / "a.ipynb")
    with pytest.raises(BookConfigError, match="no code cell tagged 'parameters'"):
        load_book(path)


def test_notebook_must_declare_runner_parameters(tmp_path):
    path = write_book(tmp_path)
    make_notebook(tmp_path / "nb" / "a.ipynb", params="steps = 1  # s\n")
    with pytest.raises(BookConfigError, match="must declare the parameter 'output_dir'"):
        load_book(path)


def test_unknown_chapter_and_profile(tmp_path):
    book = load_book(write_book(tmp_path))
    with pytest.raises(BookConfigError, match="no chapter '7'"):
        book.chapter("7")
    with pytest.raises(BookConfigError, match="no profile 'fast'"):
        book.profile("fast")


def test_run_rejects_undeclared_cli_parameter(tmp_path):
    book = load_book(write_book(tmp_path))
    with pytest.raises(BookConfigError, match="declares a parameter 'stepz'"):
        bookmod.run_chapters(book, None, "smoke", {"stepz": 1})


@pytest.mark.parametrize("text, value", [
    ("3", 3), ("0.5", 0.5), ("true", True), ("False", False), ("none", None),
    ("'a b'", "a b"), ("openai/clip-vit-base-patch32", "openai/clip-vit-base-patch32"),
    ("[1, 2]", [1, 2]),
])
def test_parse_cli_value(text, value):
    assert parse_cli_value(text) == value


def test_run_and_html_end_to_end(tmp_path):
    """A real papermill run of a tiny notebook, metrics read back, HTML rendered."""
    path = write_book(tmp_path)
    make_notebook(
        tmp_path / "nb" / "a.ipynb",
        body="from companion.book import write_metrics\n"
             "write_metrics('1', {'double': steps * 2}, output_dir)\nprint(steps * 2)",
    )
    book = load_book(path)
    logs = []
    results = bookmod.run_chapters(book, ["1"], "smoke", {"seed": 5}, progress=False,
                                   log=logs.append)
    assert json.loads(results[0].metrics_file.read_text()) == {"double": 4}
    assert bookmod.read_metrics(book.run_dir("smoke"), "1") == {"double": 4}
    executed = nbformat.read(results[0].output_notebook, as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert "steps = 2" in injected[0].source and "seed = 5" in injected[0].source
    assert any("[1/1] 1 One" in line for line in logs)
    index = bookmod.render_html(book, "smoke", log=lambda *_: None)
    assert 'href="a.html"' in index.read_text()
    assert "4" in (index.parent / "a.html").read_text()
    with pytest.raises(FileNotFoundError, match="has not been executed with profile default"):
        bookmod.render_html(book, "default", log=lambda *_: None)


def test_cli_list_real_book():
    out = subprocess.run([sys.executable, "-m", "companion", "book", "list", "--profile", "smoke"],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    book = load_book()
    for chapter in book.chapters:
        assert chapter.id in out and chapter.title in out
    assert "seed" in out and "profile smoke" in out


def test_cli_takes_chapters_before_or_after_the_parameters():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--manifest", default="book.toml")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("name")
    run.add_argument("chapters", nargs="*")
    run.add_argument("-p", "--param", action="append", default=[])
    sub.add_parser("list").add_argument("--profile")
    for argv in (["run", "x", "3.2", "3.3.1", "-p", "seed=1"],
                 ["run", "x", "-p", "seed=1", "3.2", "3.3.1"],
                 ["run", "x", "-p", "seed=1", "3.2", "-p", "threads=1", "3.3.1"]):
        args = bookmod.parse_command_line(parser, sub.choices, ["--manifest", "b.toml", *argv])
        assert (args.command, args.name, args.chapters, args.manifest) == (
            "run", "x", ["3.2", "3.3.1"], "b.toml"), argv
        assert args.param[0] == "seed=1"
    assert bookmod.parse_command_line(parser, sub.choices, ["list"]).command == "list"
    with pytest.raises(SystemExit):  # a stray word is still refused
        bookmod.parse_command_line(parser, sub.choices, ["list", "3.2"])


def test_cli_bad_manifest_exit_code(tmp_path):
    path = write_book(tmp_path, extra="[bogus]\n")
    proc = subprocess.run([sys.executable, "-m", "companion", "book", "--manifest", str(path),
                           "list"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "unknown key 'bogus'" in proc.stderr


def test_real_book_profiles_are_valid():
    book = load_book()
    assert {"default", "smoke", "gpu"} <= set(book.profiles)
    assert len({c.id for c in book.chapters}) == len(book.chapters)


def test_build_dir_outside_the_book_folder(tmp_path):
    """The tests run chapters into a temporary build folder; logging must not assume it is
    inside the project."""
    book = load_book(write_book(tmp_path / "project"))
    book.build_dir = tmp_path / "elsewhere" / "build"
    logs = []
    results = bookmod.run_chapters(book, None, "smoke", progress=False, log=logs.append)
    assert results[0].output_notebook.is_file()
    assert str(tmp_path / "elsewhere") in logs[-1]


def test_parameter_help_goes_on_in_indented_comment_lines():
    params = bookmod.parse_parameters_source(
        'a = 1  # one\n#   two\n#three\nb = "x#y"  # b\n\n#   not b\'s\n'
        'c = 3\n#   no help to go on\n')
    assert params["a"]["help"] == "one two"
    assert params["b"]["help"] == "b" and params["c"]["help"] == ""


UPSTREAM_PARAMS = PARAMS + 'upstream = "default"  # profile\nupstream_changes = {}  # changes\n'


def test_chapter_parameters_are_the_notebooks_then_the_profiles_then_the_changes(tmp_path):
    book = load_book(write_book(tmp_path))
    assert bookmod.chapter_parameters(book, "1") == {"seed": 0, "steps": 10}
    assert bookmod.chapter_parameters(book, "1", "smoke") == {"seed": 0, "steps": 2}
    changed = bookmod.chapter_parameters(book, "1", "smoke", {"seed": 4, "other": 1})
    assert changed == {"seed": 4, "steps": 2}  # a name the chapter does not declare: ignored
    make_notebook(tmp_path / "nb" / "a.ipynb", params=PARAMS + "model = make_model()  # m\n")
    with pytest.raises(BookConfigError, match="a.ipynb: parameter model = make_model"):
        bookmod.chapter_parameters(load_book(tmp_path / "book.toml"), "1")


def test_runner_passes_its_profile_and_changes_only_to_notebooks_that_declare_upstream(tmp_path):
    book = load_book(write_book(tmp_path))
    plain = bookmod.resolve_parameters(book, book.chapter("1"), "smoke", {"seed": 3})
    assert "upstream" not in plain and "upstream_changes" not in plain
    make_notebook(tmp_path / "nb" / "a.ipynb", params=UPSTREAM_PARAMS)
    book = load_book(tmp_path / "book.toml")
    params = bookmod.resolve_parameters(book, book.chapter("1"), "smoke", {"seed": 3, "lr": 1})
    assert params["upstream"] == "smoke"
    assert params["upstream_changes"] == {"seed": 3, "lr": 1}  # upstream chapters may declare lr
    assert params["seed"] == 3 and params["steps"] == 2
