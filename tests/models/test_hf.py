"""Hugging Face models from a local directory, and PEFT interoperability both ways.

Tiny random Llama and GPT-2 models (and a byte-level BPE tokenizer) are built from
transformers' config classes into a temporary directory: nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
import uuid
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
    from lora_cli.run.config import load_config
    from lora_cli.run.build import load_data
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


# --- tokenizer conventions of real models --------------------------------------------------

def _llama_tokenizer():
    """A Llama-style tokenizer built from a local vocab: BOS added by default, a '▁'
    dummy prefix, BPE over whole strings (merges across spaces, as SentencePiece does)
    and byte fallback, so the traps of real Llama / Mistral tokenizers are all here."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    texts = [f"Alice lives in Paris and is {a} years old.\nJSON: {{\"name\": \"Alice\", \"age\": {a}}}"
             for a in range(50)] + ["Capital: Paris", "Question: what is the capital? Answer: Paris"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600,
                                                       special_tokens=["<unk>", "<s>", "</s>", *byte_tokens]))
    return transformers.LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                           unk_token="<unk>", add_bos_token=True)


PAIRS = [("JSON:", '{"name": "Alice"}'), ("Capital: ", "Paris"), ("Capital:", " Paris"),
         ("Alice lives in Paris.\n", "JSON: ok")]


def test_a_llama_tokenizer_gets_its_bos_and_an_exact_prompt_completion_join(tmp_path: Path):
    from lora_cli.data import load_text
    from lora_cli.models.hf import HFTokenizer
    raw = _llama_tokenizer()
    tok = HFTokenizer(raw)
    assert tok.bos_ids == [raw.bos_token_id]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS))
    data = load_text(path, tokenizer=tok, max_seq_len=128)
    assert data.inexact_joins == 0
    for (prompt, completion), (ids, mask) in zip(PAIRS, data.examples):
        assert ids[0] == raw.bos_token_id and ids.count(raw.bos_token_id) == 1
        assert ids[-1] == raw.eos_token_id
        # the prompt part is exactly what the model is given at inference: BOS + the prompt alone
        n = mask.index(1)
        assert ids[:n] == raw(prompt)["input_ids"]
        # and the whole spells the text: no dummy space, no merged boundary token
        assert raw.decode(ids[1:-1]) == prompt + completion
    # the trap the join avoids: the completion tokenized alone gets a '▁' the text does not have
    assert raw.decode(raw(PAIRS[0][0], add_special_tokens=False)["input_ids"]
                      + raw(PAIRS[0][1], add_special_tokens=False)["input_ids"]) != PAIRS[0][0] + PAIRS[0][1]


def test_a_chat_template_that_writes_bos_gets_no_second_one():
    from lora_cli.models.hf import HFTokenizer
    from lora_cli.data.text import _example
    raw = _llama_tokenizer()
    raw.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    messages = [{"role": "user", "content": "capital?"}, {"role": "assistant", "content": "Paris"}]
    ids, mask, exact = _example({"messages": messages}, "text", HFTokenizer(raw), "x:1")
    assert ids.count(raw.bos_token_id) == 1 and ids[0] == raw.bos_token_id and exact


def test_byte_level_tokenizers_add_no_bos(hub: Path):
    from lora_cli.models.hf import load_tokenizer
    assert load_tokenizer(hub / "llama").bos_ids == []


def test_training_and_evaluation_read_the_same_tokens_and_the_dry_run_shows_them(hub: Path):
    _llama_tokenizer().save_pretrained(hub / "llama-bos")
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        if (hub / "llama" / f).exists():
            (hub / "llama-bos" / f).write_bytes((hub / "llama" / f).read_bytes())
    path = hub / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS * 4))
    config = write_config(hub, "bos", model={"hf": str(hub / "llama-bos")}, data={"train": str(path), "eval": str(path)})
    from lora_cli.run.config import load_config
    from lora_cli.run.build import load_data, load_heldout
    cfg = load_config(config)
    assert load_data(cfg).train.examples == load_heldout(cfg).eval.examples
    dry = invoke("train", config, "--dry-run")
    assert dry.exit_code == 0, dry.output
    first = load_data(cfg).train.examples[0][0]
    assert f"token ids: {first[:4]}" in dry.output and f"{first[-4:]}⟧" in dry.output


def test_an_inexact_join_is_counted_and_noted(hub: Path, monkeypatch):
    from lora_cli.run.config import load_config
    from lora_cli.models.hf import HFTokenizer
    from lora_cli.run.train import plan
    joined = HFTokenizer.encode_pair
    monkeypatch.setattr(HFTokenizer, "encode_pair", lambda self, p, c: (*joined(self, p, c)[:2], "3" not in p))
    config = write_config(hub, "inexact")
    p = plan(load_config(config))
    n = sum("3" in r["prompt"] for r in map(json.loads, (hub / "train.jsonl").read_text().splitlines()))
    assert p.built.data.train.inexact_joins == n > 0
    assert any(note.startswith(f"{n} of {len(p.built.data.train)} training examples") for note in p.built.notes)


# --- no code from a model folder, and nothing from outside it (issue 14, points 2 and 3) --------------

EVIL = "import pathlib\npathlib.Path({marker!r}).touch()\n"


def _folder_with_code(hub: Path, name: str, config: dict | None = None, tokenizer: dict | None = None) -> Path:
    """A copy of llama/ with ``config`` / ``tokenizer`` merged into its config.json and
    tokenizer_config.json, and evil_code.py beside them, which creates MARKER (in the
    folder) if anything ever imports it."""
    folder = hub / name
    shutil.copytree(hub / "llama", folder)
    (folder / "evil_code.py").write_text(EVIL.format(marker=str(folder / "MARKER")))
    for file, changes in (("config.json", config), ("tokenizer_config.json", tokenizer)):
        if changes:
            data = json.loads((folder / file).read_text())
            (folder / file).write_text(json.dumps({**data, **changes}))
    return folder


CUSTOM = {"AutoConfig": "evil_code.EvilConfig", "AutoModelForCausalLM": "evil_code.EvilModel"}


@pytest.mark.parametrize("config, tokenizer, expect", [
    ({"model_type": "qs-custom", "auto_map": CUSTOM}, None, "model_type 'qs-custom', which transformers"),
    ({"model_type": "qs-custom"}, None, "does not know"),
    (None, {"tokenizer_class": "EvilTokenizerFast",
            "auto_map": {"AutoTokenizer": ["evil_code.EvilTokenizer", "evil_code.EvilTokenizerFast"]}},
     "needs its own Python code"),
], ids=["auto-map", "unknown-type", "custom-tokenizer"])
def test_a_model_folder_that_needs_its_own_code_is_refused_without_running_it(hub: Path, config, tokenizer,
                                                                              expect):
    folder = _folder_with_code(hub, f"custom-{uuid.uuid4().hex[:6]}", config, tokenizer)
    result = invoke("train", write_config(hub, folder.name, model={"hf": str(folder)}), "--dry-run")
    assert result.exit_code == 2, result.output
    assert expect in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (folder / "MARKER").exists()


def test_an_auto_map_beside_a_built_in_model_type_is_ignored_not_run(hub: Path):
    folder = _folder_with_code(hub, "llama-with-auto-map", {"auto_map": {**CUSTOM, "AutoTokenizer": [
        "evil_code.EvilTokenizer", None]}}, {"auto_map": {"AutoTokenizer": ["evil_code.EvilTokenizer", None]}})
    result = invoke("train", write_config(hub, folder.name, model={"hf": str(folder)}), "--dry-run")
    assert result.exit_code == 0, result.output
    assert not (folder / "MARKER").exists()


def test_a_peft_adapter_naming_a_folder_with_code_is_refused_by_eval(hub: Path):
    _peft_adapter(hub, "llama", "CAUSAL_LM", ["q_proj"], "peft-custom")
    folder = _folder_with_code(hub, "custom-for-peft", {"model_type": "qs-custom", "auto_map": CUSTOM})
    config = json.loads((hub / "peft-custom" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(folder)
    (hub / "peft-custom" / "adapter_config.json").write_text(json.dumps(config))
    result = invoke("eval", hub / "peft-custom", "--data", hub / "eval.jsonl")
    assert result.exit_code == 2 and "never runs code" in " ".join(result.output.split()), result.output
    assert not (folder / "MARKER").exists()


def test_every_transformers_load_is_local_and_trusts_no_remote_code(hub: Path, monkeypatch):
    from lora_cli.models import hf

    seen = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM,
                transformers.AutoModelForSequenceClassification):
        original = cls.from_pretrained.__func__

        def recording(klass, *args, _original=original, **kwargs):
            seen.append((klass.__name__, kwargs.get("trust_remote_code"), kwargs.get("local_files_only")))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(recording))
    tok = hf.load_tokenizer(hub / "llama")
    hf.load_model(hub / "llama", task="causal_lm")
    hf.load_model(hub / "llama", task="classification", label_map={"a": 0, "b": 1}, pad_id=tok.pad_id)
    assert {name for name, _, _ in seen} >= {"AutoTokenizer", "AutoModelForCausalLM",
                                             "AutoModelForSequenceClassification"}
    assert all(trust is False and local is True for _, trust, local in seen), seen


def test_a_shard_index_naming_a_file_outside_the_folder_is_refused_before_loading(hub: Path):
    folder = hub / "llama-index-out"
    shutil.copytree(hub / "llama", folder)
    from safetensors.torch import load_file
    keys = list(load_file(folder / "model.safetensors"))
    (folder / "model.safetensors").rename(hub / "outside.safetensors")
    index = {"metadata": {}, "weight_map": {k: "../outside.safetensors" for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    result = invoke("train", write_config(hub, folder.name, model={"hf": str(folder)}), "--dry-run")
    assert result.exit_code == 2, result.output
    assert "the index names the shard '../outside.safetensors'" in " ".join(result.output.split())


class _Touch:
    """Unpickling this would create a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_pickled_weights_file_that_would_run_code_is_refused(hub: Path):
    folder = hub / "llama-evil-bin"
    shutil.copytree(hub / "llama", folder)
    from safetensors.torch import load_file
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**state, "lm_head.weight": _Touch(folder / "MARKER")}, folder / "pytorch_model.bin")
    result = invoke("train", write_config(hub, folder.name, model={"hf": str(folder)}), "--dry-run")
    assert result.exit_code == 2, result.output
    assert "would run code" in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (folder / "MARKER").exists()


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
