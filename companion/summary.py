"""The chapter summary (section 3.5): the seed's table with this book's measured numbers.

Each row of the seed's summary table (stage, goal, data, trained parameters) is paired with
the chapters that measured it and the metric paths to read from their metrics files
(``<run>/metrics/<chapter>.json``, written by every notebook). A chapter that has not been
run shows as such, with the command that produces it: the summary never invents a number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Measure:
    chapter: str
    path: str            # "a/b/c" inside the chapter's metrics JSON
    label: str
    fmt: str = "{:.3f}"
    target: tuple[str, float] | None = None  # (">=" or "<=", value): a figure to reach

    def meets(self, value) -> bool | None:
        """Whether ``value`` reaches the target (``None``: no target, or no value)."""
        if self.target is None or not isinstance(value, (int, float)):
            return None
        op, bound = self.target
        return value >= bound if op == ">=" else value <= bound


@dataclass(frozen=True)
class SummaryRow:
    stage: str           # the seed's name (and ours)
    goal: str
    data: str
    trains: str
    measures: tuple[Measure, ...]


# the seed's summary table (总结), one more row for ITM and one for the whole pipeline
SUMMARY_ROWS = (
    SummaryRow("预训练-对比学习 / contrastive pre-training", "图文对齐 / align images and text",
               "大规模图文对 / image-caption pairs", "双编码器 / both encoders",
               (Measure("3.1.1", "initial_i2t_R@1", "held-out image→text R@1 before"),
                Measure("3.1.1", "heldout_i2t_R@1", "held-out image→text R@1 after"))),
    SummaryRow("预训练-匹配 / image-text matching", "细粒度对齐 / fine-grained alignment",
               "图文对 + 难负例 / pairs + hard negatives", "融合编码器 / fused encoder + ITM head",
               (Measure("3.1.2", "hard_negatives/fine_grained_accuracy",
                        "one-fact-changed pairs told apart (hard negatives)"),
                Measure("3.1.2", "random_negatives/fine_grained_accuracy",
                        "the same (random negatives)"))),
    SummaryRow("预训练-生成 / generative pre-training", "语言建模 / captioning",
               "图文对 / image-caption pairs", "连接模块+LLM / projector + LM",
               (Measure("3.1.3", "f1_before", "caption fact F1 before"),
                Measure("3.1.3", "f1_after", "caption fact F1 after"))),
    SummaryRow("指令微调 / instruction tuning", "遵循指令 / follow instructions",
               "对话数据 / conversations", "连接模块+LLM / projector + LM",
               (Measure("3.2", "stage1_mean_task_accuracy", "mean task accuracy after stage 1"),
                Measure("3.2", "stage2_mean_task_accuracy", "mean task accuracy after stage 2"),
                Measure("3.2", "stage2_hallucination_rate", "hallucination rate after stage 2"))),
    SummaryRow("RLHF/DPO", "对齐偏好 / align with preferences", "偏好数据 / preference pairs",
               "全模型/部分 / projector + LM",
               (Measure("3.3.1", "plain_rm_pair_accuracy",
                        "the seed's reward model: held-out pair accuracy"),
                Measure("3.3.1", "factual_rm_pair_accuracy",
                        "factual reward model: held-out pair accuracy"),
                Measure("3.3.3", "heldout/SFT/hallucination_rate",
                        "hallucination rate of the SFT model"),
                Measure("3.3.2", "heldout/PPO/hallucination_rate", "after PPO"),
                Measure("3.3.3", "heldout/DPO/hallucination_rate", "after DPO"),
                Measure("3.3.3", "heldout/DPO/mean_task_accuracy",
                        "mean task accuracy after DPO"))),
    SummaryRow("完整流程 / the LLaVA-1.5 pipeline", "全部阶段 / every stage in one run",
               "以上全部 / all of the above", "按阶段表 / as the stage table says",
               (Measure("3.4", "stage2/mean_task_accuracy", "mean task accuracy after stage 2"),
                Measure("3.4", "dpo/mean_task_accuracy", "after DPO"))),
)

# the competent model's targets (the chapter's model must be strong enough for 3.3 and 3.4 to
# show their lessons): the LM told the scene in words, what the vision tokens carry, CLIP's
# retrieval, and the 3.2 model after stage 2, all on held-out scenes
TARGET_ROWS = (
    SummaryRow("目标 / the competent model's targets", "有能力的模型 / a model the lessons need",
               "留出场景 / held-out scenes", "—",
               (Measure("3.2", "text_lm_mean_task_accuracy",
                        "the LM told the scene in words: mean task accuracy", target=(">=", 0.95)),
                Measure("3.2", "probe_shape_accuracy", "probe on the vision tokens: shape",
                        target=(">=", 0.98)),
                Measure("3.2", "probe_color_accuracy", "probe on the vision tokens: colour",
                        target=(">=", 0.98)),
                Measure("3.2", "probe_size_accuracy", "probe on the vision tokens: size",
                        target=(">=", 0.98)),
                Measure("3.1.1", "heldout_i2t_R@1", "CLIP held-out image→text R@1",
                        target=(">=", 0.90)),
                Measure("3.2", "stage2_mean_task_accuracy", "after stage 2: mean task accuracy",
                        target=(">=", 0.85)),
                Measure("3.2", "stage2_min_task_accuracy",
                        "after stage 2: the weakest task type's accuracy", target=(">=", 0.70)),
                Measure("3.2", "stage2_hallucination_rate", "after stage 2: hallucination rate",
                        target=("<=", 0.10)))),
)

# RLHF's targets: a factual reward model that ranks pairs, and DPO and PPO that each remove
# hallucinations (at least 30% fewer than SFT, beyond 2 s.e., at most 2 points of accuracy
# lost), with PPO's β = 0 run drifting far further from the reference than PPO with its KL term
RLHF_ROWS = (
    SummaryRow("目标 / RLHF's targets", "减少幻觉 / fewer hallucinations",
               "偏好数据 / judged preference pairs", "—",
               (Measure("3.3.1", "factual_rm_pair_accuracy",
                        "factual reward model: held-out pair accuracy", target=(">=", 0.85)),
                Measure("3.3.1", "plain_rm_pair_accuracy",
                        "the seed's reward model: held-out pair accuracy"),
                Measure("3.3.1", "clean_sft_hallucination_rate",
                        "3.2's model (clean data): hallucination rate"),
                Measure("3.3.3", "sft_hallucination_rate",
                        "SFT (machine-written data): hallucination rate"),
                Measure("3.3.1", "learned_hallucination",
                        "hallucination learned from the data (paired)", fmt="{:+.3f}"),
                *(m for method, chapter in (("dpo", "3.3.3"), ("ppo", "3.3.2")) for m in (
                    Measure(chapter, f"{method}_hallucination_change",
                            f"{method.upper()}: hallucination change (paired)", fmt="{:+.3f}"),
                    Measure(chapter, f"{method}_hallucination_change_se",
                            f"{method.upper()}: its standard error"),
                    Measure(chapter, f"{method}_hallucination_relative_change",
                            f"{method.upper()}: change relative to SFT", fmt="{:+.2f}",
                            target=("<=", -0.30)),
                    Measure(chapter, f"{method}_task_accuracy_change",
                            f"{method.upper()}: mean task accuracy change", fmt="{:+.3f}",
                            target=(">=", -0.02)))),
                Measure("3.3.2", "ppo_kl", "PPO: KL to the reference (nats per answer)"),
                Measure("3.3.2", "ppo_beta0_kl", "PPO, β = 0: KL to the reference"))),
)


def metric_at(metrics: dict, path: str):
    """The value at ``a/b/c`` in nested metrics; ``KeyError`` naming the missing part."""
    value = metrics
    for part in path.split("/"):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"metric {path!r}: no {part!r}")
        value = value[part]
    return value


def load_chapter_metrics(metrics_dir, chapters) -> dict[str, dict | None]:
    """Each chapter's metrics (``None`` when its file is missing). A file that exists but
    is not valid JSON is an error naming it: a summary must not silently drop a chapter."""
    out = {}
    for chapter in chapters:
        path = Path(metrics_dir) / f"{chapter}.json"
        if not path.is_file():
            out[chapter] = None
            continue
        try:
            out[chapter] = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc}); rerun chapter {chapter} to "
                             "rewrite it") from exc
    return out


def summary_rows(metrics_dir, rows=SUMMARY_ROWS) -> list[dict]:
    """One dict per measure: the seed's row, the label, the measured value (or ``None``) and
    where it came from (or the command that would produce it)."""
    chapters = sorted({m.chapter for row in rows for m in row.measures})
    loaded = load_chapter_metrics(metrics_dir, chapters)
    out = []
    for row in rows:
        for measure in row.measures:
            metrics = loaded[measure.chapter]
            value, source = None, f"not run: python -m companion book run {measure.chapter}"
            if metrics is not None:
                try:
                    value = metric_at(metrics, measure.path)
                    source = f"{measure.chapter}: {measure.path}"
                except KeyError as exc:
                    source = f"{measure.chapter}: missing ({exc.args[0]})"
            out.append({"stage": row.stage, "goal": row.goal, "data": row.data,
                        "trains": row.trains, "measure": measure.label, "value": value,
                        "shown": measure.fmt.format(value) if isinstance(value, (int, float))
                        else "—", "source": source,
                        "target": (f"{'≥' if measure.target[0] == '>=' else '≤'} "
                                   f"{measure.target[1]:g}" if measure.target else ""),
                        "met": measure.meets(value)})
    return out


def gpu_commands(book, profile: str = "gpu") -> list[dict]:
    """For each chapter: the book command that runs it with ``profile``, the papermill
    command that does the same by hand, and the parameters that take real checkpoints and
    real data files."""
    out = []
    prof = book.profile(profile)
    for chapter in book.chapters:
        params = prof.parameters_for(chapter.id)
        checkpoints = [name for name in book.declared[chapter.id]
                       if name.endswith("_checkpoint")]
        data_files = [name for name in book.declared[chapter.id]
                      if name.endswith("_json") or name == "image_folder"]
        flags = " ".join(f"-p {k} {v!r}" if isinstance(v, str) else f"-p {k} {v}"
                         for k, v in params.items())
        notebook = Path(chapter.notebook).resolve().relative_to(Path(book.path).resolve().parent)
        out.append({"chapter": chapter.id, "title": chapter.title,
                    "book": f"python -m companion book run {chapter.id} --profile {profile}",
                    "papermill": (f"papermill {notebook} "
                                  f"build/{profile}/notebooks/{chapter.notebook.name} "
                                  f"--cwd notebooks -p output_dir ../build/{profile} "
                                  f"{flags}").strip(),
                    "checkpoints": checkpoints, "data_files": data_files})
    return out
