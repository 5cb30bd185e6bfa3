"""The cost simulator: what a full-size run costs before it runs (docs/simulator.md lists its
files and derives every formula). It imports neither torch nor fvcore."""
