"""`minimoe eval` (score runs on tasks, or export them for lm-evaluation-harness) and `minimoe
generate` (minimoe/evaluate.py, minimoe/generate.py)."""

from __future__ import annotations

import json

from minimoe import checkpoint as ckpt
from minimoe import files
from minimoe.checks import SEED, option
from minimoe.evaluate import export_tasks, load_tasks, results_table, run_tasks
from minimoe.generate import generate_text
from minimoe.recipes.stages import EVAL_TASKS, run_corpus, run_tokenizer


def add_eval(p):
    p.add_argument("--ckpt", required=True, nargs="+", metavar="RUN",
                   help="run folder(s); several give one column each")
    p.add_argument("--tasks", default=",".join(EVAL_TASKS),
                   help="comma-separated: cloze-en, cloze-zh, complete-en, complete-zh, ppl, "
                        "or .jsonl task files (format: minimoe/tasks.py)")
    p.add_argument("--limit", type=option("int[1, 1000000]"), default=100,
                   help="examples per task (the first ones)")
    p.add_argument("--ppl-chars", type=option("int[1, 1000000000]"), default=20_000,
                   help="ppl: validation characters per language and domain")
    p.add_argument("--batch-size", type=option("int[1, 65536]"), default=32)
    p.add_argument("--seed", type=option(SEED), default=0, help="picks the built-in tasks' examples")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--out", metavar="FILE", help="also write the results as JSON into FILE")
    p.add_argument("--export-tasks", metavar="DIR", help="instead of scoring, write the run's "
                   "tasks as JSONL and lm-evaluation-harness task YAMLs into DIR")
    p.add_argument("--no-progress", action="store_true")


def run_eval(args):
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if args.out:
        files.check_writable(args.out)
    prepared = []
    for run in args.ckpt:  # every run's data and every task checked before any scoring
        corpus, tokenizer = run_corpus(run)
        ckpt.model_file(run)
        prepared.append((run, corpus, tokenizer, load_tasks(names, corpus, args.limit, args.seed)))
    if args.export_tasks:
        run, corpus, tokenizer, tasks = prepared[0]
        written = export_tasks(tasks, tokenizer, ckpt.read_config(run), corpus, args.export_tasks,
                               args.ppl_chars)
        names = ",".join(f"minimoe_{p.stem}" for p in written if p.suffix == ".yaml")
        print(f"{args.export_tasks}: {len(written)} files; score them on an export of {run}:\n"
              f"lm_eval --model hf --model_args pretrained=EXPORTED --include_path "
              f"{args.export_tasks} --tasks {names}")
        return
    columns = {}
    for run, corpus, tokenizer, tasks in prepared:
        model, _ = ckpt.load_model(run)
        scores = run_tasks(model, tokenizer, tasks, corpus, args.ppl_chars, args.batch_size,
                           progress=not args.no_progress)
        # NaN (the standard error of one example) as None, so that the JSON is strict
        columns[run] = json.loads(json.dumps(scores), parse_constant=lambda _: None)
    if args.out:
        files.write_json(args.out, columns)
    if args.json:
        print(json.dumps(columns, indent=2, ensure_ascii=False))
    else:
        print(results_table(columns, stderr=len(columns) == 1).to_string())


def add_generate(p):
    p.add_argument("--ckpt", required=True, metavar="RUN", help="a run folder")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=option("int[1, 1048576]"), default=64)
    p.add_argument("--temperature", type=option(">=0"), default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=option("(0, 1]"), default=1.0,
                   help="sample from the top tokens holding this much probability (nucleus sampling)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the completion before TEXT (repeatable; '\\n' is a line break)")
    p.add_argument("--seed", type=option(SEED), default=0)
    p.add_argument("--num-samples", type=option("int[1, 4096]"), default=1, help="completions, one batch")


def run_generate(args):
    stops = [s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop]
    tokenizer = run_tokenizer(args.ckpt)
    model, _ = ckpt.load_model(args.ckpt)
    texts = generate_text(model, tokenizer, [args.prompt] * args.num_samples, args.max_new_tokens,
                          args.temperature, args.top_p, stops, args.seed, batch_size=args.num_samples)
    for i, text in enumerate(texts):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(args.prompt + text)
