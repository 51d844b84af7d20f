"""The `minilora` command line.

    minilora train CONFIG [--set section.key=value ...]
    minilora eval CONFIG [--adapter DIR]
    minilora generate --model DIR [--adapter DIR] PROMPT
    minilora merge --model DIR --adapter DIR OUT
    minilora import-gguf FILE OUT_DIR
    minilora export-gguf MODEL_DIR OUT.gguf [--adapter DIR [--lora-only]] [--type f16]
    minilora quantize IN_DIR OUT_DIR
    minilora info DIR
    minilora demo

Every subcommand is a small function of its parsed arguments. Errors a user can
cause (a missing file, a bad config key) exit with code 2 and one clear line; the
traceback is shown only with --debug.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys

from ..fast.lean_malloc import restart_with_lean_malloc
from ..train.config import TrainingDiverged

# The commands that restart with lean_malloc's tunables.
TRAINING_COMMANDS = frozenset({"train", "demo"})

# Exceptions that mean "the input was wrong", not "minilora is broken".
USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError)


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(model_dir=args.model, data_dir=args.data, train_file=args.train, dev_file=args.dev,
             out_dir=args.out, max_train=args.max_train, max_dev=args.max_dev)
    return 0


def _cmd_train(args) -> int:
    from ..train.config import load_config
    from ..train.run import run_training

    cfg = load_config(args.config, args.set)
    run_training(cfg, progress=not args.no_progress, overwrite=args.overwrite)
    return 0


def _cmd_eval(args) -> int:
    from ..train.config import load_config
    from ..train.run import run_eval

    # stdout carries only the metrics JSON, so scripts can parse it; notes go to stderr.
    metrics = run_eval(load_config(args.config, args.set), adapter=args.adapter,
                       log=lambda line: print(line, file=sys.stderr))
    print(json.dumps(metrics, indent=1))
    return 0


def _cmd_generate(args) -> int:
    import torch

    from ..io.generation import generate
    from ..io.loading import load_model
    from ..io.tokenizer import load_tokenizer
    from ..lora.adapters import load_adapter
    from ..lora.prompt_tuning import is_prompt_tuning_adapter, load_prompt_tuning

    from ..train import precision

    dtype = args.dtype
    if dtype is None:  # as train.precision = "auto" (or --precision) would hold the base
        chosen = precision.choose(args.precision, "cuda" if torch.cuda.is_available() else "cpu")
        dtype = chosen.dtype
        print(chosen.describe(), file=sys.stderr)
    model = load_model(args.model, task="causal-lm", dtype=dtype)
    if args.adapter and is_prompt_tuning_adapter(args.adapter):
        model = load_prompt_tuning(model, args.adapter)
    elif args.adapter:
        load_adapter(model, args.adapter)
    tokenizer = load_tokenizer(args.model)
    prompt = args.prompt
    if not args.no_chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    print(generate(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p))
    return 0


def _task_of_adapter(adapter_dir: str) -> str:
    from ..lora.adapters import read_raw_config

    task_type = read_raw_config(adapter_dir).get("task_type")
    return {"SEQ_CLS": "sequence-classification", "FEATURE_EXTRACTION": "embedding"}.get(task_type, "causal-lm")


def _cmd_merge(args) -> int:
    from ..io.export import save_pretrained
    from ..io.loading import load_model, resolve_dtype
    from ..lora.adapters import load_adapter
    from ..lora.inject import remove_lora

    task = args.task or _task_of_adapter(args.adapter)
    model = load_model(args.model, task=task, num_labels=args.num_labels)
    load_adapter(model, args.adapter)
    remove_lora(model, merge=True)
    out = save_pretrained(model, args.model, args.out, task=task, dtype=resolve_dtype(args.dtype))
    print(f"merged model written to {out} (loads with transformers' from_pretrained or minilora.load_model)")
    return 0


def _cmd_import_gguf(args) -> int:
    from ..io.gguf_import import import_gguf
    from ..io.loading import resolve_dtype

    out = import_gguf(args.file, args.out_dir, dtype=resolve_dtype(args.dtype), progress=True)
    print(f"wrote {out}")
    return 0


def _cmd_export_gguf(args) -> int:
    from ..io.gguf_export import export_gguf, export_lora_gguf

    if args.lora_only:
        if args.adapter is None:
            raise ValueError("--lora-only exports an adapter: pass it with --adapter DIR")
        out = export_lora_gguf(args.model_dir, args.adapter, args.out)
        print(f"wrote the LoRA adapter {out} (llama.cpp: llama-cli -m BASE.gguf --lora {out}; "
              f"ollama: {out.stem}.Modelfile)")
    else:
        out = export_gguf(args.model_dir, args.out, adapter=args.adapter, out_type=args.type, pre=args.pre)
        print(f"wrote {out} (llama.cpp: llama-cli -m {out}; ollama: ollama create NAME -f "
              f"{out.with_name(out.stem + '.Modelfile')})")
    return 0


def _cmd_quantize(args) -> int:
    from ..fast import nf4_codec
    from ..io.loading import resolve_dtype
    from ..qlora.quantize_folder import quantize_folder

    nf4_codec.install()  # the CPU codec: the same bytes as the reference, several times faster
    out = quantize_folder(args.in_dir, args.out_dir, blocksize=args.blocksize, double_quant=not args.no_double_quant,
                          compute_dtype=resolve_dtype(args.compute_dtype), progress=True)
    print(f"wrote a 4-bit NF4 folder (bitsandbytes format) to {out}")
    return 0


def _cmd_info(args) -> int:
    import torch

    from ..train.precision import choose
    from .info import describe

    if args.dir is not None:
        print(describe(args.dir))
    cuda = torch.cuda.is_available()
    print(f"this machine: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'CUDA' if cuda else 'CPU only'}; train.precision = \"auto\" would choose "
          f"{choose('auto', 'cuda' if cuda else 'cpu').describe().removeprefix('precision: ')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minilora", description="LoRA and QLoRA fine-tuning from scratch in plain PyTorch.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="LoRA on all-MiniLM-L6-v2 for SST-2 sentiment, before and after: the README's first command")
    p.add_argument("--model", default=None, help="HF model folder (default: the all-MiniLM-L6-v2 wheel)")
    p.add_argument("--data", default=None, help="folder with train.tsv and dev.tsv (default: ../shared/data/sst2)")
    p.add_argument("--train", default=None, help="training TSV (header row; label and sentence columns)")
    p.add_argument("--dev", default=None, help="dev TSV, same columns")
    p.add_argument("--out", default="runs/demo", help="where the adapter and metrics go (default: runs/demo)")
    p.add_argument("--max-train", type=int, default=None, help="train on this many sentences (default: 20000)")
    p.add_argument("--max-dev", type=int, default=None, help="evaluate on this many dev sentences (default: all)")
    p.set_defaults(func=_cmd_demo)

    for name, func, helptext in (("train", _cmd_train, "fine-tune with LoRA from a TOML config"),
                                 ("eval", _cmd_eval, "evaluate a model (and adapter) on a config's validation data")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("config", help="TOML config file (sections model, lora, quant, data, train, output)")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value, e.g. --set train.lr=1e-3 (repeatable)")
        if name == "train":
            p.add_argument("--no-progress", action="store_true", help="no progress bar")
            p.add_argument("--overwrite", action="store_true",
                           help="output.dir holds an earlier run: remove its outputs and start afresh")
        else:
            p.add_argument("--adapter", default=None, help="adapter folder to evaluate (default: the base model)")
        p.set_defaults(func=func)

    p = sub.add_parser("generate", help="generate text from a causal LM (and adapter)")
    p.add_argument("--model", required=True, help="HF model folder")
    p.add_argument("--adapter", default=None, help="adapter folder (peft format)")
    p.add_argument("prompt", help="the prompt; wrapped in the model's chat template unless --no-chat")
    p.add_argument("--no-chat", action="store_true", help="use the prompt as is, without the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="what the weights are held and multiplied in, as train.precision (default: auto, bf16 "
                        "where the hardware multiplies it, else fp32)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16: overrides --precision")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("merge", help="merge an adapter into its base and write an HF folder")
    p.add_argument("--model", required=True, help="base HF model folder")
    p.add_argument("--adapter", required=True, help="adapter folder (peft format)")
    p.add_argument("out", help="output folder")
    p.add_argument("--task", default=None, choices=["causal-lm", "sequence-classification", "embedding"],
                   help="default: from the adapter's task_type")
    p.add_argument("--num-labels", type=int, default=None, help="classification: number of labels")
    p.add_argument("--dtype", default=None, help="write weights in this dtype (default: as loaded)")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("import-gguf", help="convert a llama GGUF file into an HF safetensors folder")
    p.add_argument("file", help="the .gguf file")
    p.add_argument("out_dir", help="output folder")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.set_defaults(func=_cmd_import_gguf)

    p = sub.add_parser("export-gguf", help="write a model (merged with its adapter), or the adapter alone, as "
                                           "GGUF for llama.cpp and ollama")
    p.add_argument("model_dir", help="base HF model folder (16/32-bit or NF4)")
    p.add_argument("out", help="the .gguf file to write (a .Modelfile for ollama is written beside it)")
    p.add_argument("--adapter", default=None, help="adapter folder (peft format) to merge, or to export alone")
    p.add_argument("--lora-only", action="store_true",
                   help="write the adapter alone as a llama.cpp LoRA adapter (llama-cli --lora, ollama ADAPTER)")
    p.add_argument("--type", default="f16", choices=("f32", "f16", "bf16", "q8_0"),
                   help="tensor type of the matrices (default: f16; norms and biases stay f32)")
    p.add_argument("--pre", default=None, metavar="NAME",
                   help="llama.cpp's pre-tokenizer name, where minilora cannot tell it from tokenizer.json")
    p.set_defaults(func=_cmd_export_gguf)

    p = sub.add_parser("quantize", help="write a 4-bit NF4 copy of an HF folder in bitsandbytes' format")
    p.add_argument("in_dir", help="HF model folder (16/32-bit safetensors)")
    p.add_argument("out_dir", help="output folder (loads in minilora and in transformers + bitsandbytes)")
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--no-double-quant", action="store_true", help="keep absmax in fp32 (4.5 bits/param)")
    p.add_argument("--compute-dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("info", help="architecture, size, dtype and linear layers of a model folder, and what "
                                    "train.precision = \"auto\" picks on this machine")
    p.add_argument("dir", nargs="?", default=None, help="HF model folder (leave out for the machine alone)")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    as_program = argv is None  # the `minilora` command, not a call from Python code
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if as_program and args.command in TRAINING_COMMANDS:
        # Malloc tunables only take at start-up, so this runs the command again in a
        # process that has them (fast/lean_malloc.py). It costs a second start-up: worth
        # it only for training.
        restart_with_lean_malloc()
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        # The first line of every minilora error names the problem and the fix.
        print(f"minilora {args.command}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) or args.debug:
            raise
        # What was being written is in e.filename; what was written before is intact (atomic writes).
        print(f"minilora {args.command}: error: {e.strerror} while writing {e.filename or 'a file'}; "
              "free space (or choose a writable folder) and run it again", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        if args.debug:
            raise
        print(f"minilora {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
