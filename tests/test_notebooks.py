"""The notebooks as products and as regression tests.

- committed notebooks are executed top to bottom with outputs (nbval compares against them);
- each has a papermill ``parameters`` cell with a comment per parameter;
- each agrees with its jupytext source (``notebooks/NAME.py``);
- a corrupted stored output makes nbval fail;
- every chapter runs through papermill with the ``smoke`` profile and writes its metrics.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nbformat
import pytest

from companion.book import (chapter_parameters, load_book, parse_parameters_source,
                            resolve_parameters, run_chapters)

ROOT = Path(__file__).resolve().parent.parent
BOOK = load_book(ROOT / "book.toml")
CHAPTERS = {c.id: c for c in BOOK.chapters}
COMMON_PARAMETERS = ("seed", "device", "threads", "output_dir", "cache_dir")


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("chapter_id", list(CHAPTERS))
def test_committed_notebook_is_executed_in_order(chapter_id):
    nb = nbformat.read(CHAPTERS[chapter_id].notebook, as_version=4)
    cells = code_cells(nb)
    counts = [c.execution_count for c in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        f"{CHAPTERS[chapter_id].notebook.name}: execution counts {counts}; re-execute it "
        "top to bottom before committing")
    assert all(c.outputs for c in cells if "print(" in c.source), "a printing cell has no output"
    errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert not errors, f"stored outputs contain an error: {errors[0].get('ename')}"


@pytest.mark.parametrize("chapter_id", list(CHAPTERS))
def test_parameters_cell_is_documented(chapter_id):
    nb = nbformat.read(CHAPTERS[chapter_id].notebook, as_version=4)
    first = code_cells(nb)[0]
    assert "parameters" in first.metadata.get("tags", []), "first code cell must be 'parameters'"
    params = parse_parameters_source(first.source)
    for name in COMMON_PARAMETERS:
        assert name in params, f"parameter {name!r} missing"
    undocumented = [n for n, spec in params.items() if not spec["help"]]
    assert not undocumented, f"parameters without a comment: {undocumented}"


@pytest.mark.parametrize("chapter_id", list(CHAPTERS))
def test_notebook_matches_its_jupytext_source(chapter_id):
    jupytext = pytest.importorskip("jupytext")
    path = CHAPTERS[chapter_id].notebook
    source = path.with_suffix(".py")
    assert source.is_file(), f"{source.name} (jupytext percent source) is missing"
    paired = jupytext.read(source)
    committed = nbformat.read(path, as_version=4)

    def shape(nb):
        return [(c.cell_type, c.source.strip()) for c in nb.cells]

    assert shape(paired) == shape(committed), (
        f"{path.name} and {source.name} differ: run `jupytext --sync {source}` and re-execute")


def _nbval(notebook: Path, cwd: Path) -> subprocess.CompletedProcess:
    """pytest --nbval on one notebook, as scripts/test.sh runs it (with this repository's
    conftest.py beside it, which masks the numbers of cells tagged trained-figures)."""
    (cwd / "conftest.py").write_text((ROOT / "conftest.py").read_text())
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval",
         "--nbval-current-env", "--nbval-sanitize-with", str(ROOT / "tests/nbval_sanitize.cfg"),
         str(notebook)],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=900)


def _first_checked_number(nb):
    """(cell index, output index) of a stored stream output containing a digit."""
    for ci, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or "parameters" in cell.metadata.get("tags", []):
            continue
        tags = cell.metadata.get("tags", [])
        if "nbval-ignore-output" in tags or "nbval-skip" in tags or "trained-figures" in tags:
            continue
        for oi, out in enumerate(cell.outputs):
            if (out.output_type == "stream" and out.name == "stdout"
                    and re.search(r"\d\.\d", out.text)):
                return ci, oi
    raise AssertionError("no checked output with a decimal number to corrupt")


@pytest.mark.notebook
def test_nbval_catches_a_corrupted_output_and_reads_trained_figures_by_their_text(tmp_path):
    """In a copy of 3.0: one printed number changed in an ordinary cell makes nbval fail on
    that cell. The same cell tagged trained-figures passes with any number, and fails when a
    word changes (its text is still compared)."""
    source = CHAPTERS["3.0"].notebook
    work = tmp_path / "notebooks"
    work.mkdir()
    nb = nbformat.read(source, as_version=4)
    ci, oi = _first_checked_number(nb)
    text = nb.cells[ci].outputs[oi].text
    match = re.search(r"\d\.\d", text)
    digit = text[match.start() + 2]
    corrupted = text[: match.start() + 2] + str((int(digit) + 1) % 10) + text[match.start() + 3:]
    target = work / source.name

    nb.cells[ci].outputs[oi].text = corrupted
    nbformat.write(nb, target)
    proc = _nbval(target, tmp_path)
    assert proc.returncode != 0, "nbval passed on a corrupted output"
    assert "1 failed" in proc.stdout, proc.stdout[-3000:]
    assert (corrupted.strip().splitlines()[0][:20] in proc.stdout
            or "mismatch" in proc.stdout.lower())

    nb.cells[ci].metadata.setdefault("tags", []).append("trained-figures")
    nbformat.write(nb, target)
    proc = _nbval(target, tmp_path)
    assert proc.returncode == 0, (
        "a changed number failed a trained-figures cell:\n" + proc.stdout[-3000:])

    word = re.search(r"[A-Za-z]{4,}", corrupted)
    nb.cells[ci].outputs[oi].text = corrupted[:word.start()] + "XXXX" + corrupted[word.end():]
    nbformat.write(nb, target)
    proc = _nbval(target, tmp_path)
    assert proc.returncode != 0 and "1 failed" in proc.stdout, (
        "a changed word passed a trained-figures cell:\n" + proc.stdout[-3000:])


def _sanitize(text: str) -> str:
    from nbval.plugin import get_sanitize_patterns

    patterns = get_sanitize_patterns((ROOT / "tests" / "nbval_sanitize.cfg").read_text())
    for regex, replacement in patterns:
        text = re.sub(regex, replacement, text)
    return text


def test_sanitizer_reads_rounding_level_differences_as_roundoff_and_keeps_real_numbers():
    assert (_sanitize("|difference| = 8.9e-16") == _sanitize("|difference| = 0.0e+00")
            == "|difference| = ROUNDOFF")
    assert _sanitize("max |Δ| 3.1e-12 and 2.2e-308") == "max |Δ| ROUNDOFF and ROUNDOFF"
    for kept in ("lr 2.53e-09", "loss 1.4806", "1.0e-03", "5.487485", "p = 0.0e+01"):
        assert _sanitize(kept) == kept
    assert _sanitize("done in 12.5 s") == "done in TIME"


def test_trained_figures_are_compared_by_their_text():
    import importlib.util

    spec = importlib.util.spec_from_file_location("root_conftest", ROOT / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mask = module.mask_numbers
    assert mask("held-out R@1 0.910 (before 0.003), R@5 0.970") == mask(
        "held-out R@1 0.893 (before 0.003), R@5 0.97")
    assert mask("step   360/1800  loss 1.4806") == "step #/# loss #"
    assert mask("change −0.019 ± 0.015, 1,472 captions, 1e-3") == "change # ± #, # captions, #"
    assert mask("DPO: no clear change") != mask("DPO: more hallucinations")
    # a verdict drawn from trained figures is masked whole; the words around it are not
    assert (mask("DPO -> did not help: more hallucinations")
            == mask("DPO -> did not help: no clear change in hallucination (within 2 se)")
            == "DPO -> VERDICT")
    assert (mask("+0.010 ± 0.017: no clear effect") == mask("+0.041 ± 0.017: helped")
            == "# ± #: VERDICT")
    assert (mask("PPO -> fewer hallucinations, but task accuracy fell by more than 0.02")
            == "PPO -> VERDICT")
    assert mask("hurt: unhurt helpedness") == "VERDICT: unhurt helpedness"
    assert mask("PPO -> helped") != mask("DPO -> helped")


SMOKE_EXPECTATIONS = {
    # chapter id -> metric keys ("a/b" for nested ones) the smoke run must write (finite numbers)
    "3.0": ["n_scenes", "judge_reference_accuracy", "tokenizer_vocab_size"],
    "3.1.1": ["heldout_i2t_R@1", "initial_i2t_R@1", "final_temperature"],
    "3.1.2": ["hard_minus_random_fine_grained", "mining_temperature"],
    "3.1.3": ["f1_before", "f1_after", "hallucination_after"],
    "3.2": ["before_mean_task_accuracy", "stage1_mean_task_accuracy",
            "stage2_mean_task_accuracy", "stage2_hallucination_rate",
            "probe/vision_tokens/shape", "probe/descriptions/whole scene"],
    "3.3.1": ["pairs_train", "likelihood_pair_accuracy", "plain_rm_pair_accuracy",
              "rm_pair_accuracy", "factual_rm_pair_accuracy", "learned_hallucination"],
    # nested metrics by path
    "3.3.2": ["heldout/SFT/mean_task_accuracy", "heldout/PPO/kl", "heldout/PPO, β = 0/kl",
              "ppo_last10/reward", "ppo_beta0_last10/utility"],
    "3.3.3": ["heldout/DPO/hallucination_rate", "heldout/IPO/kl", "heldout/PPO (3.3.2)/reward"],
    "3.4": ["stage2/mean_task_accuracy", "dpo/hallucination_rate",
            "vision_alignment/frozen (control)/i2t_R@1", "clean_minus_noisy/difference"],
    "3.5": ["figures_measured", "figures"],
}


def _smoke_expectations(chapter_id: str) -> list[str]:
    """The chapter's own expectations plus every metric the 3.5 summary reads from it."""
    from companion.summary import RLHF_ROWS, SUMMARY_ROWS, TARGET_ROWS

    # a change relative to the SFT rate is None when that rate is 0, as a toy model's may be
    read = [m.path for row in SUMMARY_ROWS + TARGET_ROWS + RLHF_ROWS for m in row.measures
            if m.chapter == chapter_id and not m.path.endswith("_relative_change")]
    return SMOKE_EXPECTATIONS.get(chapter_id, []) + read


@pytest.mark.notebook
@pytest.mark.parametrize("chapter_id", list(CHAPTERS))
def test_chapter_runs_with_smoke_profile(chapter_id, tmp_path):
    book = load_book(ROOT / "book.toml")
    book.build_dir = tmp_path / "build"
    book.cache_dir = tmp_path / "cache"
    results = run_chapters(book, [chapter_id], "smoke", progress=False, log=lambda *_: None)
    assert results[0].metrics_file is not None, f"chapter {chapter_id} wrote no metrics"
    metrics = json.loads(results[0].metrics_file.read_text())
    for key in _smoke_expectations(chapter_id):
        value = metrics
        for part in key.split("/"):
            assert isinstance(value, dict) and part in value, (
                f"chapter {chapter_id}: metric {key!r} missing")
            value = value[part]
        assert isinstance(value, (int, float)) and math.isfinite(value), key


@pytest.mark.notebook
def test_rlhf_notebooks_run_with_the_seeds_reward_model(tmp_path):
    """3.3.1 and 3.3.2 at smoke sizes with the seed's reward model in PPO's place (image and
    reply only, last-token head, raw scores), set through papermill: the notebooks must
    follow the recipe's reward model, scoring every reward model with the prompt layout it
    was trained on (which ``score_pairs`` and ``score_replies`` enforce), and 3.3.1 then
    reports no factual reward model."""
    import papermill

    from companion.book import metrics_path, resolve_parameters

    book = load_book(ROOT / "book.toml")
    book.build_dir = tmp_path / "build"
    book.cache_dir = tmp_path / "cache"
    extra = {"rm_factual": False, "rm_pooling": "last", "ppo_score_norm": False}
    for chapter_id in ("3.3.1", "3.3.2"):
        chapter = book.chapter(chapter_id)
        papermill.execute_notebook(
            str(chapter.notebook), str(tmp_path / chapter.notebook.name),
            parameters={**resolve_parameters(book, chapter, "smoke", {}), **extra},
            kernel_name=book.kernel, cwd=str(chapter.notebook.parent), progress_bar=False)
    run = book.run_dir("smoke")
    rm = json.loads(metrics_path(run, "3.3.1").read_text())
    assert 0.0 <= rm["plain_rm_pair_accuracy"] <= 1.0 and 0.0 <= rm["rm_pair_accuracy"] <= 1.0
    assert "factual_rm_pair_accuracy" not in rm
    ppo = json.loads(metrics_path(run, "3.3.2").read_text())
    row = ppo["heldout"]["PPO"]
    assert math.isfinite(row["reward"]) and math.isfinite(row["kl"])


def _chapter_parameters(chapter_id: str, profile: str) -> dict:
    """A chapter's parameters as the runner runs it under ``profile`` (``upstream`` too)."""
    return {**chapter_parameters(BOOK, chapter_id, profile),
            **resolve_parameters(BOOK, BOOK.chapter(chapter_id), profile, {})}


def test_notebook_3_2_builds_the_recipe_the_package_builds_from_its_parameters():
    """Notebook 3.2 builds its recipe once, with ``instruction.recipe_from_parameters(globals())``
    (never spelled out by hand), and its parameters cell declares every name of
    ``NOTEBOOK_PARAMETERS``: a name dropped from the cell would silently take the recipe's
    default, and with it another cache key than the later sections load."""
    import ast

    from companion.instruction import NOTEBOOK_PARAMETERS

    text = Path(CHAPTERS["3.2"].notebook).with_suffix(".py").read_text(encoding="utf-8")
    source = "\n".join(line for line in text.splitlines()  # no IPython magics
                       if not line.lstrip().startswith(("%", "!")))
    calls = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)]

    def called(node):
        return getattr(node.func, "id", None) or getattr(node.func, "attr", None)

    assert not [c for c in calls if called(c) == "InstructionRecipe"], (
        "notebook 3.2 spells its recipe out; build it with recipe_from_parameters(globals())")
    built = [c for c in calls if called(c) == "recipe_from_parameters"]
    assert len(built) == 1, "notebook 3.2 should build its recipe with one recipe_from_parameters"
    assert [ast.unparse(a) for a in built[0].args] == ["globals()"] and not built[0].keywords
    cells = re.split(r"^# %%", text, flags=re.MULTILINE)
    parameters = [c for c in cells if c.startswith(' tags=["parameters"]')]
    assert len(parameters) == 1, "notebook 3.2 should have one parameters cell"
    declared = parse_parameters_source(parameters[0].split("\n", 1)[1])
    missing = [name for name in NOTEBOOK_PARAMETERS if name not in declared]
    assert not missing, f"notebook 3.2's parameters cell no longer declares {missing}"


@pytest.mark.parametrize("profile", ["default", "smoke", "gpu"])
def test_rlhf_notebooks_share_their_cache_keys_with_each_other_and_with_3_2(profile):
    """3.3.x load what 3.2 and the earlier 3.3 notebooks cached: under every profile their
    parameters must make the same recipes, or each would silently retrain its own."""
    from companion.instruction import NOTEBOOK_PARAMETERS
    from companion.instruction import recipe_from_parameters as instruction_recipe_from_parameters
    from companion.rlhf import notebook_recipe

    recipes = {c: notebook_recipe(c, _chapter_parameters(c, profile), BOOK)
               for c in ("3.3.1", "3.3.2", "3.3.3")}
    shared = ("sft", "seed", "scenes", "samples", "max_new_tokens", "pairs", "noise",
              "rm_pooling", "rm_factual", "rm_steps", "rm_lr", "rm_batch_size", "sft_checkpoint",
              "preference_json", "image_folder")
    for chapter, recipe in recipes.items():
        for name in shared:
            assert getattr(recipe, name) == getattr(recipes["3.3.1"], name), (chapter, name)
    assert recipes["3.3.2"] == recipes["3.3.3"]  # 3.3.3 loads 3.3.2's PPO policy
    p = _chapter_parameters("3.2", profile)
    assert set(NOTEBOOK_PARAMETERS) <= set(p), "3.2 no longer declares a recipe parameter"
    sft = instruction_recipe_from_parameters(p)
    # 3.3 starts from 3.2's recipe on machine-written data; 3.3.1's side by side loads 3.2's
    # own model as the clean control, so every other field must be 3.2's
    clean = replace(recipes["3.3.1"].sft, annotator_hallucination_rate=0.0)
    assert clean == sft, "3.3.1 would not find the model 3.2 publishes"
    assert recipes["3.3.1"].sft.annotator_hallucination_rate > 0


def test_rlhf_notebooks_follow_command_line_changes_of_the_chapters_before_them():
    """``book run -p lm_steps=500 -p rm_steps=7`` changes 3.2's LM and 3.3.1's reward model:
    3.3.2 and 3.3.3, which declare neither, must look for the models so made, and each 3.3
    notebook must build its recipe through ``notebook_recipe`` under its own chapter id."""
    from companion.rlhf import UPSTREAM_CHAPTERS, notebook_recipe

    changes = {"lm_steps": 500, "rm_steps": 7, "dpo_steps": 2}
    recipes = {}
    for chapter_id in UPSTREAM_CHAPTERS:
        params = {**chapter_parameters(BOOK, chapter_id, "default", changes),
                  **resolve_parameters(BOOK, BOOK.chapter(chapter_id), "default", changes)}
        recipes[chapter_id] = notebook_recipe(chapter_id, params, BOOK)
        source = Path(CHAPTERS[chapter_id].notebook).with_suffix(".py").read_text("utf-8")
        assert f'recipe = notebook_recipe("{chapter_id}", globals())' in source, chapter_id
        assert {"upstream", "upstream_changes"} <= set(BOOK.declared[chapter_id]), chapter_id
    for recipe in recipes.values():
        assert recipe.sft.lm_steps == 500 and recipe.rm_steps == 7
        assert recipe.sft == recipes["3.3.1"].sft


@pytest.mark.notebook
def test_notebooks_run_on_tiny_checkpoints_through_the_real_model_parameters(tmp_path):
    """A CLIP, a causal LM and a LLaVA model saved here load through the same parameters a
    hub id uses (clip_checkpoint, lm_checkpoint, vlm_checkpoint, sft_checkpoint), and the
    chapters run on them through papermill. One LM ships a tokenizer of its own (ChatML
    template without generation blocks, no <image>, no pad), as real checkpoints do; and 3.2
    trains from a LLaVA JSON and image folder on disk (train_json, stage1_json), 3.3.3 from a
    preference JSON (preference_json)."""
    from foreign_tokenizers import save_foreign_lm

    from companion.models import build_clip
    from companion.tokenizer import world_tokenizer
    from companion.lm import build_lm
    from companion.vlm import build_vlm, save_vlm
    from companion.preference import label_preferences, preference_prompts, save_preferences
    from companion.rlhf import split_preferences
    from companion.world import export_llava_dataset, make_instruction_dataset, make_scenes

    tokenizer = world_tokenizer(tmp_path / "tokenizer", n_scenes=200, log=None)
    clip, processor, _ = build_clip(tokenizer, seed=1)
    lm, _ = build_lm(tokenizer, seed=1)
    folders = {name: tmp_path / name for name in ("clip", "lm", "vlm")}
    for model, folder in ((clip, folders["clip"]), (lm, folders["lm"])):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    processor.save_pretrained(folders["clip"])
    save_vlm(folders["vlm"], build_vlm(clip, lm, tokenizer, seed=1), processor, tokenizer)
    save_foreign_lm(tmp_path / "chatml-lm")
    scenes = make_scenes(30, seed=7, start_id=70_000_000)
    records = make_instruction_dataset(scenes, seed=7)
    data = export_llava_dataset(scenes, records, tmp_path / "data", image_size=48)
    captions = [r for r in records if r["task"] == "description"][:10]
    export_llava_dataset(scenes, captions, tmp_path / "captions", image_size=48)
    prompts = preference_prompts(scenes[:8], seed=7)
    pairs = label_preferences(prompts, [["There is one circle.", "No.", "a red square."]] *
                              len(prompts), {s.scene_id: s for s in scenes}, pairs="all")
    save_preferences(data / "preferences.json", pairs)  # images: data/images/*.png above

    book = load_book(ROOT / "book.toml")
    book.build_dir = tmp_path / "build"
    book.cache_dir = tmp_path / "cache"
    runs = [("3.1.1", {"clip_checkpoint": str(folders["clip"])}, "heldout_i2t_R@1"),
            ("3.1.2", {"clip_checkpoint": str(folders["clip"])}, "hard_minus_random_fine_grained"),
            ("3.1.3", {"clip_checkpoint": str(folders["clip"]),
                       "lm_checkpoint": str(tmp_path / "chatml-lm")}, "f1_after"),
            ("3.2", {"vlm_checkpoint": str(folders["vlm"])}, "stage2_mean_task_accuracy"),
            ("3.2", {"lm_checkpoint": str(folders["lm"])}, "stage2_mean_task_accuracy"),
            ("3.2", {"lm_checkpoint": str(tmp_path / "chatml-lm")}, "stage2_mean_task_accuracy"),
            ("3.2", {"clip_checkpoint": str(folders["clip"]), "lora_rank": 4},
             "stage2_mean_task_accuracy"),
            ("3.2", {"train_json": str(data / "data.json"),
                     "stage1_json": str(tmp_path / "captions" / "data.json")},
             "stage2_mean_task_accuracy"),
            ("3.3.1", {"sft_checkpoint": str(folders["vlm"]),
                       "preference_json": str(data / "preferences.json")},
             "plain_rm_pair_accuracy"),
            ("3.3.3", {"sft_checkpoint": str(folders["vlm"]),
                       "preference_json": str(data / "preferences.json"), "lora_rank": 4},
             "heldout/DPO/hallucination_rate"),
            ("3.4", {"clip_checkpoint": str(folders["clip"]),
                     "lm_checkpoint": str(tmp_path / "chatml-lm")}, "stage2/mean_task_accuracy")]
    for chapter_id, overrides, key in runs:
        result = run_chapters(book, [chapter_id], "smoke", overrides, progress=False,
                              log=lambda *_: None)[0]
        executed = nbformat.read(result.output_notebook, as_version=4)
        injected = next(c for c in executed.cells
                        if "injected-parameters" in c.metadata.get("tags", []))
        name, value = next(iter(overrides.items()))
        assert f"{name} = {value!r}" in injected.source.replace('"', "'")
        value = json.loads(result.metrics_file.read_text())
        for part in key.split("/"):
            value = value[part]
        assert math.isfinite(value), (chapter_id, overrides)
        outputs = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
        if "train_json" in overrides:
            assert "training data: " in outputs and "stage 1 from " in outputs
        if "preference_json" in overrides:
            n_train = sum(r["split"] == "train" for r in split_preferences(pairs, 0.2))
            assert (f"{n_train} training pairs, {len(pairs) - n_train} held-out pairs from "
                    if chapter_id == "3.3.1" else f"{n_train} training pairs from ") in outputs
        if chapter_id == "3.4":
            assert "vision: the checkpoint" in outputs and "lm: the checkpoint" in outputs
        if chapter_id == "3.2" and overrides.get("lora_rank"):
            assert "LoRA rank 4: " in outputs
    # the runs on checkpoints never trained (nor published) the world's own instruction model
    assert not list(book.cache_dir.glob("vlm-sft*")), "sft_checkpoint was not used"
