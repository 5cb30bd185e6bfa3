"""AquilaMoE Table 1 at toy scale: every Scale-Up initialisation, compared.

    python scaling/scale_up_table1.py [--quick] [--out runs/table1]

Same as `minimoe experiment scale-up`. Default settings take about 15 minutes on 2 CPU cores;
--quick (tiny models) under 2 minutes. Writes scale-up.md/.csv and loss plots into --out.
"""

import argparse

from minimoe.experiments import QUICK, ExperimentConfig, scale_up_experiment

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="runs/table1")
    args = parser.parse_args()
    summary = scale_up_experiment(args.out, QUICK if args.quick else ExperimentConfig())
    for row in summary["rows"]:
        print(row)
