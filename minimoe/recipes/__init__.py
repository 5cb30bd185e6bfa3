"""Recipes: the stages composed into the paper's experiments, and the full-size launches
(docs/recipes.md lists the modules)."""
