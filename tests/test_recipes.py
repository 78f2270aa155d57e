"""The bundled recipes: each loads into the pipeline's config and passes the validation `chatrlhf pipeline --recipe`
runs before it trains, and every RL algorithm has one (bench/algorithms.py runs them all)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from chatrlhf.config import ALGORITHM_RULES, PipelineConfig, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_bundled_recipe_loads_and_validates(recipe):
    load_recipe(PipelineConfig, recipe).validate()


def test_every_rl_algorithm_has_a_demo_recipe():
    algos = set()
    for recipe in RECIPES:
        data = yaml.safe_load(recipe.read_text(encoding="utf-8"))
        if data.get("method", "rlhf") == "rlhf":
            algos.add(data.get("rl", {}).get("algo", "ppo"))
    assert algos == set(ALGORITHM_RULES)
