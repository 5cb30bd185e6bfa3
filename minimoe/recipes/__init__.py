"""Recipes: the stages composed into the paper's experiments.

    config.py       one RecipeConfig (models, steps, batch) for the pipeline and the experiments
    stages.py       one stage: load a run's data, build or load its model, train or transform it
    pipeline.py     `minimoe pipeline`: preparation -> Scale-Up -> Scale-Out vs from scratch
    experiments.py  AquilaMoE Table 1 and the scale-out validation at toy scale
    report.py       the pipeline's report: tables, plots, savings factors
"""
