"""The domain-teacher recipes of MOPD (recipes/SIZE-rl-teacher-GROUP.yaml): each loads and validates, trains on
registered environments, and is its student's RL recipe (recipes/SIZE-rl.yaml) restricted to one group of
environments; the groups of a size split the student's environments with none left out or shared."""

from __future__ import annotations

import glob
import os

import pytest

from hybridmoe.envs import ENVIRONMENTS
from hybridmoe.train.config import RLRecipe

RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")
SIZES = ["tiny", "nano-30b-a3b", "super-120b-a12b", "ultra-550b-a55b"]


def teachers(size: str) -> dict[str, RLRecipe]:
    """group -> the teacher recipe of `size`."""
    paths = sorted(glob.glob(os.path.join(RECIPES, f"{size}-rl-teacher-*.yaml")))
    return {os.path.basename(p)[len(f"{size}-rl-teacher-") : -len(".yaml")]: RLRecipe.from_yaml(p) for p in paths}


def without_envs_and_out_dir(recipe: RLRecipe) -> dict:
    d = recipe.to_dict()
    del d["envs"]["ratios"], d["train"]["out_dir"]
    return d


@pytest.mark.parametrize("size", SIZES)
def test_teachers_are_the_student_recipe_on_one_group(size):
    student = RLRecipe.from_yaml(os.path.join(RECIPES, f"{size}-rl.yaml"))
    found = teachers(size)
    assert len(found) >= 3, f"{size}: expected a teacher per domain group, found {sorted(found)}"
    covered: list[str] = []
    for group, teacher in found.items():
        teacher.validate()
        ratios = teacher.envs.ratios
        assert set(ratios) <= set(ENVIRONMENTS), (
            f"{size} {group}: unknown environments {set(ratios) - set(ENVIRONMENTS)}"
        )
        assert ratios == {name: student.envs.ratios[name] for name in ratios}, (
            f"{size} {group}: not the student's shares"
        )
        assert without_envs_and_out_dir(teacher) == without_envs_and_out_dir(student), f"{size} {group} drifted"
        assert teacher.train.out_dir == f"{student.train.out_dir}-teacher-{group}"
        covered += list(ratios)
    assert sorted(covered) == sorted(student.envs.ratios), f"{size}: the groups must split the student's environments"


def test_tiny_teacher_runs_with_overrides():
    r = RLRecipe.from_yaml(os.path.join(RECIPES, "tiny-rl-teacher-math.yaml"), ["train.steps=3"])
    r.validate()
    assert r.envs.ratios == {"math": 0.125} and r.train.steps == 3 and r.model.init_from == "runs/speedrun/sft"
