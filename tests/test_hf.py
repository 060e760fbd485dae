"""Hugging Face models from a local directory, and PEFT interoperability both ways.

Tiny random Llama and GPT-2 models (and a byte-level BPE tokenizer) are built from
transformers' config classes into a temporary directory: nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lora_cli import load_adapter  # noqa: E402
from lora_cli.cli import app  # noqa: E402

runner = CliRunner()
ATOL = 1e-5


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """llama/ and gpt2/ model directories, and text data for both tasks."""
    root = tmp_path_factory.mktemp("hub")
    texts = [f"{a} plus {b} is {a + b}" for a in range(20) for b in range(20)]
    tok = _tokenizer(texts)
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id))
    for name, model in (("llama", llama), ("gpt2", gpt2)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    pairs = [{"prompt": f"{a} plus {b} is", "completion": f" {a + b}"} for a in range(20) for b in range(12)]
    (root / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[::2]))
    (root / "eval.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[1::6]))
    labelled = [{"text": f"{a} plus {a % 7} is", "label": "big" if a > 20 else "small"} for a in range(40)]
    (root / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labelled))
    return root


def write_config(root: Path, name: str, **sections) -> Path:
    config = {"device": "cpu", "task": "causal_lm", "output_dir": str(root / "runs" / name),
              "model": {"hf": str(root / "llama")},
              "data": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"), "max_seq_len": 32},
              "lora": {"rank": 4, "alpha": 8, "target_modules": "all-linear"},
              "train": {"max_steps": 6, "batch_size": 16, "lr": 0.02, "log_every": 3}}
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def ids(n=2, t=10) -> torch.Tensor:
    return torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(5))


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapter_trained_by_lora_train_loads_in_peft_with_same_logits(hub: Path, arch: str):
    config = write_config(hub, f"train-{arch}", model={"hf": str(hub / arch)})
    result = invoke("train", config, "--overwrite")
    assert result.exit_code == 0, result.output
    adapter = hub / "runs" / f"train-{arch}" / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["task_type"] == "CAUSAL_LM" and saved["fan_in_fan_out"] == (arch == "gpt2")
    Auto = transformers.AutoModelForCausalLM
    ours = load_adapter(Auto.from_pretrained(hub / arch), adapter)
    theirs = peft.PeftModel.from_pretrained(Auto.from_pretrained(hub / arch), adapter)
    x = ids()
    assert torch.allclose(logits(ours, x), logits(theirs, x), atol=ATOL)
    assert not torch.allclose(logits(ours, x), logits(Auto.from_pretrained(hub / arch), x), atol=1e-4)


def _peft_adapter(hub: Path, arch: str, task_type: str, targets: list[str], out: str):
    """A PEFT adapter with random non-zero B, saved with save_pretrained; returns the
    merge_and_unload() model for reference."""
    torch.manual_seed(1)
    if task_type == "SEQ_CLS":
        base = transformers.AutoModelForSequenceClassification.from_pretrained(
            hub / arch, num_labels=2, id2label={0: "big", 1: "small"}, label2id={"big": 0, "small": 1})
        base.config.pad_token_id = 1
    else:
        base = transformers.AutoModelForCausalLM.from_pretrained(hub / arch)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                      task_type=task_type))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(hub / out)
    return model.merge_and_unload()


@pytest.mark.parametrize("arch, targets", [("llama", ["q_proj", "v_proj", "down_proj"]), ("gpt2", ["c_attn", "c_fc"])])
def test_peft_adapter_evaluates_and_merges_like_peft(hub: Path, arch: str, targets):
    reference = _peft_adapter(hub, arch, "CAUSAL_LM", targets, f"peft-{arch}")
    evaluated = invoke("eval", hub / f"peft-{arch}", "--data", hub / "eval.jsonl", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.stdout)
    assert report["adapted"]["loss"] != report["base"]["loss"]
    merged = invoke("merge", hub / arch, hub / f"peft-{arch}", "-o", hub / f"merged-{arch}", "--force")
    assert merged.exit_code == 0, merged.output
    out = transformers.AutoModelForCausalLM.from_pretrained(hub / f"merged-{arch}")
    x = ids()
    assert torch.allclose(logits(out, x), logits(reference, x), atol=ATOL)
    assert (hub / f"merged-{arch}" / "tokenizer.json").exists()


def test_classification_head_is_trained_saved_and_read_by_peft(hub: Path):
    config = write_config(hub, "cls", task="classification",
                          data={"train": str(hub / "cls.jsonl"), "eval": None, "val_split": 0.25, "target": "label"},
                          lora={"target_modules": ["q_proj", "v_proj"]}, train={"max_steps": 8, "batch_size": 8})
    trained = invoke("train", config, "--overwrite")
    assert trained.exit_code == 0, trained.output
    assert "classification head 'score'" in trained.output
    adapter = hub / "runs" / "cls" / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["score"]
    from safetensors.torch import load_file
    assert "base_model.model.score.weight" in load_file(adapter / "adapter_model.safetensors")

    Auto = transformers.AutoModelForSequenceClassification
    kwargs = {"num_labels": 2, "id2label": {0: "big", 1: "small"}, "label2id": {"big": 0, "small": 1}}
    ours = load_adapter(Auto.from_pretrained(hub / "llama", **kwargs), adapter)
    theirs = peft.PeftModel.from_pretrained(Auto.from_pretrained(hub / "llama", **kwargs), adapter)
    for m in (ours, theirs):
        m.config.pad_token_id = 1
    x = ids()
    assert torch.allclose(logits(ours, x), logits(theirs, x), atol=ATOL)

    merged = invoke("merge", hub / "llama", adapter, "-o", hub / "merged-cls", "--force")
    assert merged.exit_code == 0, merged.output
    assert "score.weight" in merged.output
    out = Auto.from_pretrained(hub / "merged-cls")
    out.config.pad_token_id = 1
    assert out.config.id2label == {0: "big", 1: "small"}
    assert torch.allclose(logits(out, x), logits(ours, x), atol=ATOL)

    by_merged = json.loads(invoke("eval", adapter, "--merged", hub / "merged-cls", "--json").stdout)
    by_adapter = json.loads(invoke("eval", adapter, "--json").stdout)
    assert by_merged["merged"]["accuracy"] == by_adapter["adapted"]["accuracy"]
    assert by_merged["merged"]["loss"] == pytest.approx(by_adapter["adapted"]["loss"], abs=1e-5)


def test_peft_classification_adapter_merges_like_peft(hub: Path):
    reference = _peft_adapter(hub, "llama", "SEQ_CLS", ["q_proj", "v_proj"], "peft-cls")
    reference.config.pad_token_id = 1
    merged = invoke("merge", hub / "llama", hub / "peft-cls", "-o", hub / "merged-peft-cls", "--force")
    assert merged.exit_code == 0, merged.output
    out = transformers.AutoModelForSequenceClassification.from_pretrained(hub / "merged-peft-cls", num_labels=2)
    out.config.pad_token_id = 1
    x = ids()
    assert torch.allclose(logits(out, x), logits(reference, x), atol=ATOL)


def test_instruction_and_chat_records_mask_the_prompt(hub: Path):
    records = [{"instruction": "add", "input": f"{a} {b}", "output": str(a + b)} for a in range(5) for b in range(5)]
    records += [{"messages": [{"role": "user", "content": f"{a} plus 1?"}, {"role": "assistant", "content": str(a + 1)}]}
                for a in range(10)]
    (hub / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = write_config(hub, "mixed", data={"train": str(hub / "mixed.jsonl"), "eval": None, "max_seq_len": 64})
    dry = invoke("train", config, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "### Instruction:" in dry.output and "⟦0<eos>⟧" in dry.output
    from lora_cli.config import load_config
    from lora_cli.pipeline import load_data
    data = load_data(load_config(config)).train
    chat_ids, chat_mask = data.examples[-1]
    tok = transformers.AutoTokenizer.from_pretrained(hub / "llama")
    assert tok.decode([i for i, m in zip(chat_ids, chat_mask) if m]) == "10<eos>"
    everything = load_data(load_config(config, ["data.train_on_prompt=true"])).train
    assert all(all(mask) for _, mask in everything.examples)


def test_missing_model_directory_is_a_clear_error(hub: Path, tmp_path: Path):
    config = write_config(hub, "missing", model={"hf": str(tmp_path / "nowhere")})
    result = invoke("train", config)
    assert result.exit_code == 2
    assert "model.hf: directory not found" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_fsdp_shards_a_hugging_face_model_and_trains_the_one_process_adapter(hub: Path):
    """Llama's decoder layers become FSDP units (the rest, embeddings and head, the root):
    2 workers x batch 4 train what one process with batch 4 x grad_accum 2 trains."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    lora = {"dropout": 0.0}
    single = write_config(hub, "fsdp-ref", lora=lora, train={"batch_size": 4, "grad_accum": 2, "max_steps": 4})
    assert invoke("train", single, "--overwrite").exit_code == 0
    sharded = write_config(hub, "fsdp-2", lora=lora, train={"batch_size": 4, "grad_accum": 1, "max_steps": 4,
                                                           "strategy": "fsdp"})
    run = subprocess.run([sys.executable, "-m", "lora_cli", "train", str(sharded), "--overwrite",
                          "--nproc-per-node", "2"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    ours, reference = (load_file(hub / "runs" / n / "adapter" / "adapter_model.safetensors")
                       for n in ("fsdp-2", "fsdp-ref"))
    assert ours.keys() == reference.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], reference[key], atol=ATOL, rtol=0, msg=key)


@pytest.mark.parametrize("version, key", [("4.40.2", "torch_dtype"), ("4.56.0", "dtype"), ("5.24.0", "dtype")])
def test_the_float32_request_uses_the_keyword_of_the_installed_transformers(hub, monkeypatch, version, key):
    import importlib

    from lora_cli.models import hf
    seen = {}

    def from_pretrained(path, **kwargs):
        seen.update(kwargs)
        return torch.nn.Linear(1, 1)

    module = importlib.import_module("transformers")      # what hf imports (another test may re-import it)
    monkeypatch.setattr(module, "__version__", version)
    monkeypatch.setattr(module.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    hf.load_model(hub / "llama", task="causal_lm")
    assert seen.get(key) is torch.float32, seen
    assert ({"dtype", "torch_dtype"} - {key}).isdisjoint(seen)
