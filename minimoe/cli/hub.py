"""`minimoe export` (a run as a transformers checkpoint) and `minimoe import` (a transformers
checkpoint as a run); the work is in minimoe/hub.py."""

from __future__ import annotations

import importlib.util

from minimoe.hub import DTYPES, export_run, import_checkpoint
from minimoe.interop import FORMATS
from minimoe.recipes.stages import data_spec, run_tokenizer


def _need_transformers(command: str):
    if importlib.util.find_spec("transformers") is None:
        raise ValueError(f"{command}: needs transformers (pip install 'minimoe[hf]')")


def add_export(p):
    p.add_argument("--ckpt", required=True, metavar="RUN", help="the run to export")
    p.add_argument("--out", required=True, metavar="DIR", help="an empty folder (or an export)")
    p.add_argument("--format", choices=["auto", *FORMATS], default="auto",
                   help="auto: llama or qwen2 (dense), mixtral or qwen2_moe (MoE)")
    p.add_argument("--dtype", choices=list(DTYPES), default="keep")


def run_export(args):
    _need_transformers("export")
    r = export_run(args.ckpt, args.out, run_tokenizer(args.ckpt), args.format, args.dtype)
    print(f"{args.out}: {r['architecture']} ({r['bytes']:,} bytes of weights); load it with "
          f"AutoModelForCausalLM.from_pretrained({args.out!r}) and AutoTokenizer")


def add_import(p):
    p.add_argument("--hf", required=True, metavar="DIR", help="a transformers checkpoint folder "
                   "(Llama, Mistral, Qwen2; Mixtral, Qwen2-MoE) with its tokenizer.json")
    p.add_argument("--out", required=True, metavar="RUN", help="the run folder to make")
    p.add_argument("--data", nargs="+", metavar="PATH", help="the text later stages train on, "
                   "in the checkpoint's tokenizer (default: the demo corpus), or shards made "
                   "with `minimoe tokenize --tokenizer DIR`")


def run_import(args):
    _need_transformers("import")
    meta = import_checkpoint(args.hf, args.out, data_spec(args.data, 0, "run"))
    print(f"{args.out}: a run of the {meta['format']} checkpoint {args.hf}; grow it with "
          f"`minimoe scale-up --from {args.out}` or `scale-out`, train it with `pretrain --init`")
