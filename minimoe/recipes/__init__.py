"""Recipes: the stages composed into the paper's experiments.

    config.py       one RecipeConfig (models, steps, batch) for the pipeline and the experiments
    stages.py       one stage: load a run's data, build or load its model, train or transform it
    pipeline.py     `minimoe pipeline`: preparation -> Scale-Up -> Scale-Out vs from scratch
    experiments.py  AquilaMoE Table 1 and the scale-out validation at toy scale
    sweep.py        `minimoe experiment savings`: iso-loss savings against the scale-out budget
    report.py       the pipeline's report: tables, plots, savings factors
    speed.py        each stage model's step speed, the load-independent time factor
    seeds.py, findings.py   a recipe over seeds: figures as mean +- sd, the claims judged
"""
