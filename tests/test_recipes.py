"""Recipe files (scaling/*.toml): every shipped one loads; a bad one is a one-line error."""

from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from minimoe.cli import main
from minimoe.recipes.config import RECIPES, get_recipe

SCALING = Path(__file__).resolve().parents[1] / "scaling"


@pytest.mark.parametrize("path", sorted(SCALING.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_changes_what_it_says(path):
    recipe = get_recipe(str(path))
    base = RECIPES[recipe_base(path)]
    assert recipe != base or path.name == "table1.toml"  # table1 spells out the defaults
    assert recipe.train_config(recipe.prep_steps, recipe.lr).steps == recipe.prep_steps


def recipe_base(path: Path) -> str:
    return tomllib.loads(path.read_text())["preset"]


@pytest.mark.parametrize("text, message", [
    ('preset = "toy"\nstepz = 3\n', "stepz: unknown key"),
    ('preset = "toy"\nsteps = "many"\n', "RecipeConfig.steps='many': must be a positive integer"),
    ('preset = "toy"\nprep_steps = 0\n', "RecipeConfig.prep_steps=0: must be a positive integer"),
    ('preset = "toy"\nlr = -1e-3\n', "RecipeConfig.lr=-0.001: must be positive"),
    ('preset = "nope"\n', "preset='nope': must be one of toy"),
    ('steps = [\n', "not a valid TOML file"),
])
def test_a_bad_recipe_file_is_one_line_exit_2(tmp_path, capsys, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["pipeline", "--preset", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_every_run_of_a_recipe_validates_on_its_batches(tmp_path):
    recipe = get_recipe(str(_recipe_file(tmp_path, 'preset = "tiny"\neval_batches = 3\n')))
    tc = recipe.train_config(recipe.steps, recipe.cpt_lr)
    assert (tc.eval_batches, tc.batch_size, tc.seq_len) == (3, recipe.batch_size, recipe.seq_len)
    assert RECIPES["tiny"].train_config(1, 1e-3).eval_batches == 8  # the default, as before


def _recipe_file(folder: Path, text: str) -> Path:
    path = folder / "recipe.toml"
    path.write_text(text)
    return path
