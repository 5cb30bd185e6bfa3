"""The cost simulator: what a full-size run costs before it runs.

    hardware.py   the device catalogue, each figure with its source
    cost.py       one layout priced: memory per GPU, step time, throughput, MFU, cost
    search.py     every layout of a model on N GPUs priced at once; the fastest and cheapest
    scenario.py   a chain of training phases against a from-scratch baseline: days, capacity,
                  the savings factors of AquilaMoE Table 6
    scenario_file.py  the TOML scenario format (sims/*.toml) read into scenario.py's terms
    plots.py      PNG plots of a scenario
"""
