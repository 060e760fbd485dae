"""Generation speed: the built-in gpt with and without its KV cache, and a Hugging Face
Llama of the same shape through lora-cli (its own ``generate``) and through transformers'
``generate`` called directly.

    python bench/generate.py --out bench/results_generate.json           # a quiet machine
    python bench/generate.py --new-tokens 8 --repeats 1 --out /tmp/g.json # a smoke run

Every configuration decodes the same prompts greedily for exactly ``--new-tokens`` tokens
(the end-of-sequence id is one no model produces, ``NO_EOS``, so no row stops early),
after ``--warmup`` untimed calls; the figure is new
tokens per second over all prompts, the median of ``--repeats`` timed calls. LoRA (rank
8, every Linear but the head, random B) is injected in every configuration, unmerged, as
lora-generate runs an adapter. Nothing here is asserted: ``tests/test_bench.py`` only
checks that it runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lora_cli.lora.inject import apply_lora  # noqa: E402
from lora_cli.models import GPT  # noqa: E402
from lora_cli.models.generation import Sampling, generate  # noqa: E402

NO_EOS = -1          # an id no model produces: every row runs the full --new-tokens


def _lora(model: torch.nn.Module) -> torch.nn.Module:
    apply_lora(model, rank=8, alpha=16, target_modules="all-linear")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model.eval()


def _time(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-hf", action="store_true", help="only the built-in gpt")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    seq = args.prompt_tokens + args.new_tokens + 1
    prompts = torch.randint(0, 256, (args.batch, args.prompt_tokens)).tolist()
    s = Sampling(max_new_tokens=args.new_tokens)
    total = args.batch * args.new_tokens
    results: dict = {"config": {**vars(args), "out": str(args.out) if args.out else None},
                     "torch": torch.__version__, "python": platform.python_version(),
                     "threads": torch.get_num_threads(), "tokens_per_s": {}}

    gpt = _lora(GPT(vocab_size=257, max_seq_len=seq, n_layer=args.layers, n_head=4, d_model=args.d_model))
    for name, cache in (("gpt_kv_cache", True), ("gpt_no_cache", False)):
        t = _time(lambda c=cache: generate(gpt, prompts, eos_id=NO_EOS, pad_id=256, sampling=s, use_cache=c),
                  args.repeats, args.warmup)
        results["tokens_per_s"][name] = total / t

    if not args.skip_hf:
        try:
            import transformers
        except ImportError:
            results["note"] = "transformers is not installed: the Hugging Face rows are skipped"
        else:
            llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
                vocab_size=257, hidden_size=args.d_model, intermediate_size=4 * args.d_model,
                num_hidden_layers=args.layers, num_attention_heads=4, max_position_embeddings=seq,
                eos_token_id=0, pad_token_id=0))
            llama = _lora(llama)
            ids = torch.tensor(prompts)

            def direct():
                return llama.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                      pad_token_id=0, eos_token_id=None)
            results["tokens_per_s"]["hf_transformers_generate"] = total / _time(direct, args.repeats, args.warmup)
            results["tokens_per_s"]["hf_through_lora_cli"] = total / _time(
                lambda: generate(llama, prompts, eos_id=NO_EOS, pad_id=0, sampling=s), args.repeats, args.warmup)
            results["transformers"] = transformers.__version__
    rates = results["tokens_per_s"]
    results["kv_cache_speedup"] = rates["gpt_kv_cache"] / rates["gpt_no_cache"]
    for name, rate in rates.items():
        print(f"{name:28s} {rate:10.1f} new tokens/s")
    print(f"KV cache speed-up {results['kv_cache_speedup']:.2f}x ({args.new_tokens} new tokens after "
          f"{args.prompt_tokens}, batch {args.batch}, {results['threads']} threads)")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
