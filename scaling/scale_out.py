"""AquilaMoE's scale-out validation at toy scale: continue a grown dense model as dense, as an
upcycled 8-expert top-2 MoE, as LLaMA-MoE splits (random, cluster, importance), and train the
same MoE from scratch, each for the same tokens.

    python scaling/scale_out.py [--quick] [--out runs/scale-out] [--dense-run RUN]

Same as `minimoe experiment scale-out`. Writes scale-out.md/.csv, loss plots and per-layer
expert-load heatmaps into --out.
"""

import argparse

from minimoe.experiments import QUICK, ExperimentConfig, scale_out_experiment

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="runs/scale-out")
    parser.add_argument("--dense-run", default=None, help="a grown dense run to start from")
    args = parser.parse_args()
    summary = scale_out_experiment(args.out, QUICK if args.quick else ExperimentConfig(),
                                   dense_run=args.dense_run)
    for row in summary["rows"]:
        print(row)
