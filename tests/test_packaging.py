"""The install surface: environment.yml mirrors pyproject.toml; the CI script runs the
README's test command."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONDA_NAMES = {"torch": "pytorch"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0].strip().lower()


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        wanted |= {_name(r) for r in extra}
    listed = set()
    text = (ROOT / "environment.yml").read_text()
    for line in text[text.index("dependencies:"):].splitlines():
        match = re.match(r"^\s+-\s+([A-Za-z0-9_.\-]+)", line)
        if match and match.group(1) not in ("pip", "python", "-e"):
            listed.add(match.group(1).lower())
    wanted = {CONDA_NAMES.get(n, n) for n in wanted}
    assert wanted == listed, (f"only in pyproject: {sorted(wanted - listed)}; "
                              f"only in environment.yml: {sorted(listed - wanted)}")


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/book.sh" in readme
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_every_top_level_name_resolves():
    import companion

    missing = [name for name in companion.__all__ if getattr(companion, name, None) is None]
    assert not missing, f"companion exports names that do not resolve: {missing}"


def test_preference_functions_work_on_plain_tensors_from_the_top_level():
    import math

    import torch

    from companion import bradley_terry_loss, dpo_loss, gae

    zeros = torch.zeros(3)
    assert math.isclose(float(dpo_loss(zeros, zeros, zeros, zeros)), math.log(2), rel_tol=1e-6)
    assert math.isclose(float(bradley_terry_loss(zeros, zeros)), math.log(2), rel_tol=1e-6)
    advantages, returns = gae(torch.ones(1, 3), torch.zeros(1, 3), gamma=1.0, lam=1.0)
    assert advantages.tolist() == [[3.0, 2.0, 1.0]] and returns.tolist() == [[3.0, 2.0, 1.0]]
