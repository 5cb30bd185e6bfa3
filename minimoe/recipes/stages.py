"""Running one stage: load the data a run was made with, build or load its model, train or
transform it (run folders: docs/recipes.md#run-folders)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from minimoe import checkpoint as ckpt
from minimoe import experts
from minimoe import dist
from minimoe import files
from minimoe import mixing
from minimoe import run_files
from minimoe.config import ModelConfig, get_preset
from minimoe.evaluate import evaluate, load_tasks, run_tasks
from minimoe.grow import grow_checkpoint, grow_model, growth_report, plan_growth
from minimoe.model import build_model
from minimoe.shards import ShardTexts, is_shard_folder, load_data, load_shards, read_manifest
from minimoe.tasks import FORMAT as TASKS_FORMAT
from minimoe.tokens import TOKENIZER_FILES, Tokenizer
from minimoe.train import RunResult, TrainConfig, train
from minimoe.upcycle import scale_out, upcycle_checkpoint


def data_spec(paths=None, vocab_size: int = 2048, tokenizer: str = "bpe") -> dict:
    """paths None: the demo corpus. tokenizer: "bpe" or "byte" (made from the data), or "run":
    the one the run folder holds (an imported checkpoint's)."""
    # '' kept as it is, refused by the reader: resolved, it would be the working folder
    paths = [str(Path(p).resolve()) if str(p).strip() else "" for p in paths] if paths else None
    spec = {"paths": paths, "vocab_size": vocab_size, "tokenizer": tokenizer}
    if _shard_folder(spec):  # what the run's token ids mean: a run resumes on these alone
        spec["shards"] = _shards_identity(paths[0])
    return spec


def _shards_identity(folder) -> dict:
    m = read_manifest(Path(folder))  # the tokenizer's name holds its file's digest
    return {"tokenizer": m["tokenizer"],
            "train_tokens": sum(e["tokens"] for es in m["shards"]["train"].values() for e in es)}


def _shard_folder(spec: dict) -> str | None:
    paths = spec["paths"]
    return paths[0] if paths and len(paths) == 1 and paths[0] and is_shard_folder(paths[0]) \
        else None


def load_run_data(spec: dict, tokenizer: Tokenizer | None = None):
    """(TokenData, tokenizer) of a data spec (the demo corpus, a shard folder, or text files in
    `tokenizer`, a run's own, or the spec's)."""
    shards = _shard_folder(spec)
    if shards:
        if spec.get("shards", _shards_identity(shards)) != _shards_identity(shards):
            raise ValueError(f"--data={shards}: re-tokenised since the run began "
                             f"({spec['shards']} then, {_shards_identity(shards)} now)")
        data, tok = load_shards(shards)
        if tokenizer is not None and tokenizer.name != tok.name:
            raise ValueError(f"--data {shards}: tokenised by {tok.name}, not by the run's "
                             f"tokenizer {tokenizer.name}; tokenize it with --tokenizer RUN")
        return data, tok
    assert tokenizer is not None or spec["tokenizer"] != "run", "the run's tokenizer is needed"

    def load():
        return load_data(spec["paths"], spec["vocab_size"], tokenizer or spec["tokenizer"])

    if dist.is_distributed():  # rank 0 builds the corpus and token caches; the others read them
        dist.main_only(lambda: load() and None)
    return load()


def run_data_spec(run_dir) -> dict:
    """run.json's data spec, held to the rules `data_spec` writes it by."""
    path = Path(run_dir) / "run.json"
    return run_files.data_spec(ckpt.read_json(path).get("data"), f"{path}: data")


def run_tokenizer(run_dir) -> Tokenizer:
    """The tokenizer a run folder holds; a model saved without one (an experiment's init-*),
    its data's."""
    if (Path(run_dir) / TOKENIZER_FILES[0]).exists():
        return Tokenizer.load(run_dir)
    return load_run_data(run_data_spec(run_dir))[1]


def run_data(run_dir):
    """(TokenData, tokenizer) of a run: its data in its tokenizer."""
    return load_run_data(run_data_spec(run_dir), run_tokenizer(run_dir))


def pretrain(cfg: ModelConfig | str, out, tc: TrainConfig, spec: dict | None = None,
             progress: bool = True, on_step=None, snapshots: dict[int, Path] | None = None,
             tensorboard=None) -> RunResult:
    """Train a freshly initialised model; snapshots {step: folder}: also save the model as it is
    after that step (a run folder of its own, e.g. the baseline at equal compute)."""
    cfg = get_preset(cfg) if isinstance(cfg, str) else cfg  # a bad name fails before any work
    spec = spec or data_spec()
    data, tok = load_run_data(spec)
    cfg = cfg.replace(vocab_size=tok.vocab_size)  # the tokenizer decides the vocabulary
    model = build_model(cfg, device="meta")  # train() draws it from tc.seed, rank by rank
    meta = {"stage": "pretrain", "data": spec, "init_from": None}

    def step_done(step, record):
        if snapshots and step in snapshots:
            ckpt.save_model(snapshots[step], model, {"stage": "snapshot", "step": step,
                                                     "tokens": record["tokens"], "data": spec,
                                                     "init_from": str(Path(out).resolve())})
            tok.save(snapshots[step])
        if on_step is not None:
            on_step(step, record)

    return train(model, data, tc, out, meta, progress, step_done, tensorboard, init="seed")


def continue_pretraining(init_from, out, tc: TrainConfig, stage: str = "continue",
                         progress: bool = True, tensorboard=None) -> RunResult:
    """Continue training the model of another run (grown, upcycled, or pretrained)."""
    init_from = Path(init_from)
    model = build_model(ckpt.read_config(init_from), device="meta")  # each rank reads its part
    data, _ = run_data(init_from)
    meta = {"stage": stage, "data": run_data_spec(init_from), "init_from": str(init_from.resolve())}
    return train(model, data, tc, out, meta, progress, None, tensorboard,
                 init=ckpt.model_file(init_from))


def validation_loss(model, spec: dict, tc: TrainConfig | None = None) -> dict[str, float]:
    """Validation losses of a model on a data spec's data (overall and per language)."""
    return evaluate(model, load_run_data(spec)[0], tc or TrainConfig())


# --- evaluation of a run on tasks made from its data ----------------------------------------
EVAL_TASKS = ("cloze-en", "cloze-zh", "complete-en", "complete-zh", "ppl")


def run_corpus(run_dir):
    """(the documents the built-in tasks are made from, the run's tokenizer): its data's
    validation shards decoded."""
    data, tokenizer = run_data(run_dir)
    return ShardTexts(data.path), tokenizer


def evaluate_run(run_dir, tasks=EVAL_TASKS, limit: int = 100, ppl_chars: int = 20_000,
                 seed: int = 0, batch_size: int = 32, cache: bool = False,
                 progress: bool = False) -> dict:
    """Every task's result for a run's model, on its own data and tokenizer; cache=True keeps
    them in run_dir/eval.json while the model file and the settings are the same."""
    run_dir = Path(run_dir)
    corpus, tokenizer = run_corpus(run_dir)
    loaded = load_tasks(list(tasks), corpus, limit, seed)  # a bad task fails before any work
    weights = ckpt.model_file(run_dir).stat()
    settings = {"tasks": list(tasks), "limit": limit, "ppl_chars": ppl_chars, "seed": seed,
                "format": TASKS_FORMAT, "model_bytes": weights.st_size,
                "model_mtime_ns": weights.st_mtime_ns,
                "task_files": {t.source: Path(t.source).stat().st_mtime_ns for t in loaded
                               if not isinstance(t, str) and t.source.endswith(".jsonl")}}
    path = run_dir / "eval.json"
    if cache and path.exists():
        old = ckpt.read_json(path)
        if old.get("settings") == settings:
            return old["results"]
    model, _ = ckpt.load_model(run_dir)
    results = run_tasks(model, tokenizer, loaded, corpus, ppl_chars, batch_size, progress)
    if cache:
        files.write_json(path, {"settings": settings, "results": results})
    return results


def mix_used(run_dir, history: list[dict]) -> str:
    """The domain mix a training run drew its batches with, in words (mixing.describe)."""
    mix = ckpt.read_json(Path(run_dir) / "run.json").get("train", {}).get("mix", mixing.SIZE)
    data, _ = run_data(run_dir)
    return mixing.describe(mix, history, data.domain_tokens())


# --- what an MoE run's experts specialise in ---------------------------------------------
def specialisation_run(run_dir, out=None, paths=None, batch_size: int = 8, seq_len: int = 128,
                       n_batches: int = 4, title: str = "") -> dict:
    """What a run's MoE experts specialise in, by domain (minimoe/experts.py), written into `out`
    (default run_dir/experts) once per settings; `paths` routes other data in its tokenizer."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "experts"
    settings = {"paths": paths, "batch_size": batch_size, "seq_len": seq_len,
                "n_batches": n_batches, "model_mtime_ns": ckpt.model_file(run_dir).stat().st_mtime_ns}
    if (out / "specialisation.json").exists():
        old = ckpt.read_json(out / "specialisation.json")
        if old.get("settings") == settings:
            return old
    model, _ = ckpt.load_model(run_dir)
    tokenizer = run_tokenizer(run_dir)  # other text, or the run's data, in its tokenizer
    data = load_data(paths, tokenizer=tokenizer)[0] if paths else run_data(run_dir)[0]
    batches = experts.domain_batches(data, batch_size, min(seq_len, model.cfg.max_seq_len),
                                     n_batches)
    result = experts.expert_specialisation(model, batches) | {"settings": settings,
                                                               "folder": out.name}
    experts.write_specialisation(result, out, tokenizer, title=title or str(run_dir))
    return result


# --- transformations between runs: in memory, or file to file for full-size checkpoints -----
def transform_run(src, out, meta: dict, transform, write, tc: TrainConfig | None = None,
                  stream: bool = False) -> dict:
    """Transform run `src`'s model into run `out`, with out/transform.json
    (docs/recipes.md#run-folders): in memory, `transform(model) -> (model, extras)`, or with
    stream, file to file, `write(src_file, src_cfg, out_file) -> (cfg, bytes, extras)`."""
    return dist.main_only(lambda: _transform_run(Path(src), Path(out), meta, transform, write, tc,
                                                 stream))


def _transform_run(src: Path, out: Path, meta: dict, transform, write, tc, stream) -> dict:
    request = {**meta, "source": str(src.resolve()), **({"streamed": True} if stream else {})}
    src_cfg = ckpt.read_config(src)  # the source read (and so checked) before the folder is claimed
    has_data = (src / "run.json").exists() and ckpt.read_json(src / "run.json").get("data") is not None
    spec = run_data_spec(src) if has_data else None
    path = out / "transform.json"  # a finished transformation of this request: its report
    if path.exists():
        old = ckpt.read_json(path)
        if any(old.get(k) != v for k, v in request.items()):
            raise ValueError(f"--out={out}: already holds another transformation; choose "
                             "another folder")
        if old.get("finished", True):
            return run_files.transform_report(old, path)
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"--out={out}: not empty and holds no transformation (another run, or "
                         "other files); choose another folder")
    t0 = time.perf_counter()
    before = after = None
    if stream:
        _start(out, request)
        try:
            cfg, written, extra = write(ckpt.model_file(src), src_cfg, out / "model.safetensors")
        except Exception:  # refused (a bad tensor, a full disk): the claim goes, nothing is kept
            (out / "transform.json").unlink()
            raise
        extra = {**extra, "bytes_written": written}
    else:
        model, _ = ckpt.load_model(src)
        torch.manual_seed(0)
        new_model, extra = transform(model)
        cfg = new_model.cfg
        if spec:
            data = run_data(src)[0]
            before, after = (evaluate(m, data, tc or TrainConfig()) for m in (model, new_model))
        _start(out, request)
        ckpt.save_tensors(out / "model.safetensors", ckpt.model_tensors(new_model), cfg)
    report = {**request, **extra, "val_before": before, "val_after": after, "finished": True,
              "params_before": src_cfg.param_counts(), "params_after": cfg.param_counts(),
              "seconds": time.perf_counter() - t0}
    files.write_text(out / "config.json", cfg.to_json())
    files.write_json(out / "run.json", {**meta, "data": spec, "init_from": str(src.resolve())})
    if spec:
        run_tokenizer(src).save(out)
    files.write_json(out / "transform.json", report)  # last: the stage is finished
    return report


def _start(out: Path, request: dict):
    """`out` claimed for the request, a half-written transformation of it (a kill) cleared."""
    for name in ("config.json", "model.safetensors", "run.json", *TOKENIZER_FILES):
        (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    files.write_json(out / "transform.json", {**request, "finished": False})


def grow_run(src, target: str, out, method: str = "aki-pro", depth: str | None = None,
             mapping: str = "cyclic", seed: int = 0, kv: str = "keep",
             tc: TrainConfig | None = None, stream: bool = False) -> dict:
    """Scale-Up of a run's model to a preset's shape (vocabulary kept: it is the tokenizer's)."""
    options = dict(method=method, depth=depth, mapping=mapping, seed=seed, kv=kv)

    def shape(cfg):
        return get_preset(target).replace(vocab_size=cfg.vocab_size)

    def transform(model):
        plan = plan_growth(model.cfg, shape(model.cfg), **options)
        return grow_model(plan, model), {"growth": growth_report(plan)}

    def write(path, cfg, out_path):
        plan, written = grow_checkpoint(path, cfg, shape(cfg), out_path, **options)
        return plan.target, written, {"growth": growth_report(plan)}

    meta = {"stage": "scale-up", "target": target, **options}
    return transform_run(src, out, meta, transform, write, tc, stream)


def scale_out_run(src, out, method: str = "upcycle", n_experts: int = 8, top_k: int = 2,
                  calib_batches: int = 8, seed: int = 0, tc: TrainConfig | None = None,
                  stream: bool = False, calib=None, **options) -> dict:
    """Scale-Out of a run's dense model: "upcycle" or "split-*" (the importance splits calibrate
    on `calib`, by default `calib_batches` batches of its training data); stream: upcycle file
    to file."""
    def transform(dense):
        batches = calib
        if batches is None and method.startswith("split-importance"):
            data, _ = run_data(src)
            seq_len = min(128, dense.cfg.max_seq_len)
            batches = [data.train_batch(step, 8, seq_len, seed=seed) for step in range(calib_batches)]
        return scale_out(dense, method, n_experts, top_k, batches, seed, **options), {}

    def write(path, cfg, out_path):
        assert method == "upcycle"  # the CLI refuses --stream with a split
        moe, written = upcycle_checkpoint(path, cfg, out_path, n_experts, top_k, seed=seed, **options)
        return moe, written, {}

    meta = {"stage": "scale-out", "method": method, "n_experts": n_experts, "top_k": top_k,
            "seed": seed, "options": options}
    return transform_run(src, out, meta, transform, write, tc, stream)
