"""lora-generate on a Hugging Face causal LM: its own generate, as PEFT's generate does it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from models.test_hf import hub, invoke, write_config  # noqa: E402,F401 (hub is a fixture)


@pytest.mark.slow
def test_a_tiny_llama_adapter_generates_what_peft_generate_does(hub: Path):
    config = write_config(hub, "gen-llama", train={"max_steps": 8, "lr": 0.05})
    assert invoke("train", config, "--overwrite").exit_code == 0
    adapter = hub / "runs" / "gen-llama" / "adapter"
    from safetensors.torch import load_file, save_file      # B made large: completions far from the base's
    weights = adapter / "adapter_model.safetensors"
    g = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(v.shape, generator=g) * 0.3 if "lora_B" in k else v) for k, v in load_file(weights).items()}
    save_file(tensors, weights)
    prompts = ["3 plus 4 is", "11 plus 2 is", "7 plus"]
    (hub / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    result = invoke("generate", adapter, "--prompts", hub / "prompts.jsonl", "--max-new-tokens", "8", "--json")
    assert result.exit_code == 0, result.output
    ours = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(ours) == 3 and any(row["tokens"] for row in ours)

    tok = transformers.AutoTokenizer.from_pretrained(hub / "llama")
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(hub / "llama"),
                                           adapter).eval()
    for row, prompt in zip(ours, prompts):
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                             do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        new = [t for t in out[0, ids.shape[1]:].tolist() if t != tok.pad_token_id]
        new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        assert row["tokens"] == len(new)
        assert row["completion"] == tok.decode(new)
