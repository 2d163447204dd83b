"""Instruction tuning of causal LMs on the CPU: data formats, masking, memory switches, metrics.

Everything runs on the tiny random Llama (``random:llama-tiny``) with MiniLM's vocabulary;
the chat-template test sets a template on the tokenizer, as a chat model's tokenizer has.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn

from pollinate import data as datalib
from pollinate import instructions
from pollinate.client.trainer import train
from pollinate.config import ConfigError, RunConfig
from pollinate.deltas import digest
from pollinate.evaluation import evaluate, exact_match, token_f1
from pollinate.losses import causal_lm_loss, chunked_cross_entropy
from pollinate.modeling import ModelSpec, build_model, load_tokenizer, set_gradient_checkpointing
from pollinate.server.rundir import RunDirectory
from pollinate.simulations.launch import simulate

TINY = "random:llama-tiny"
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [SEP] {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY)


def _encode(rows: dict, tokenizer, max_length: int = 64) -> instructions.InstructionData:
    return instructions.encode(Dataset.from_dict(rows), tokenizer, max_length)


def _labelled(data, i: int) -> list[int]:
    return [t for t in data.labels[i] if t != -100]


def test_alpaca_rows_train_on_the_response_only(tokenizer):
    data = _encode({"instruction": ["Name the capital."], "input": ["france"], "output": ["paris"]},
                   tokenizer)
    ids, labels = data.input_ids[0], data.labels[0]
    start = len(data.prompts[0])
    assert ids[:start] == data.prompts[0]
    assert labels[:start] == [-100] * start  # the whole prompt, template headers included, is masked
    assert labels[start:] == ids[start:]
    assert tokenizer.decode(_labelled(data, 0)) == "paris [SEP]"
    assert tokenizer.decode(data.prompts[0]) == \
        "# # # instruction : name the capital. france # # # response :"


def test_every_assistant_turn_is_labelled_and_nothing_else(tokenizer):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "colour of lime"},
            {"role": "assistant", "content": "green"}]
    data = _encode({"messages": [chat]}, tokenizer)
    assert tokenizer.decode(_labelled(data, 0)) == "hello [SEP] green [SEP]"
    assert data.references[0] == "green"
    assert tokenizer.decode(data.prompts[0]).endswith("colour of lime # # # response :")


def test_chat_template_renders_turns_and_labels_the_assistant_span(tokenizer):
    chat_tokenizer = load_tokenizer(TINY)
    chat_tokenizer.chat_template = CHAT_TEMPLATE
    chat = [{"role": "user", "content": "opposite of hot"}, {"role": "assistant", "content": "cold"}]
    data = _encode({"messages": [chat]}, chat_tokenizer)
    rendered = chat_tokenizer.apply_chat_template(chat, tokenize=False)
    assert rendered == "<user> opposite of hot [SEP] <assistant> cold [SEP] "
    assert chat_tokenizer.decode(data.input_ids[0]) == chat_tokenizer.decode(
        chat_tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert chat_tokenizer.decode(_labelled(data, 0)) == "cold [SEP]"  # the template's end of turn too
    assert chat_tokenizer.decode(data.prompts[0]) == "< user > opposite of hot [SEP] < assistant >"
    # without a template the same row takes the plain template
    plain = _encode({"messages": [chat]}, tokenizer)
    assert tokenizer.decode(plain.prompts[0]).startswith("# # # instruction :")


def test_truncation_cuts_the_prompt_start_and_keeps_the_response(tokenizer):
    long_input = " ".join(["word"] * 40)
    data = _encode({"instruction": ["Repeat."], "input": [long_input], "output": ["the answer"]},
                   tokenizer, max_length=16)
    assert len(data.input_ids[0]) == 16
    assert tokenizer.decode(_labelled(data, 0)) == "the answer [SEP]"
    assert tokenizer.decode(data.prompts[0]).endswith("word # # # response :")
    # a response longer than the budget keeps its start and a quarter of the budget for the prompt
    ids, labels, start = instructions.truncate(list(range(30)), [-100] * 10 + list(range(10, 30)), 10, 16)
    assert ids == list(range(6, 22)) and start == 4 and labels[start:] == list(range(10, 22))


def test_formats_are_recognised_from_columns_and_data_format_overrides(tmp_path):
    config = RunConfig(task="causal-lm")
    assert instructions.detect_format(["instruction", "input", "output"], config) == "alpaca"
    assert instructions.detect_format(["messages", "prompt"], config) == "messages"
    assert instructions.detect_format(["prompt", "response"], config) == "prompt-response"
    forced = RunConfig(task="causal-lm", data_format="prompt-response", prompt_column="instruction",
                       response_column="output")
    path = tmp_path / "alpaca.jsonl"
    path.write_text(json.dumps({"instruction": "a", "input": "b", "output": "c"}) + "\n")
    assert datalib.load_table(str(path), config).column_names == ["instruction", "input", "output"]
    assert datalib.load_table(str(path), forced).column_names == ["prompt", "response"]
    with pytest.raises(ConfigError, match="data-format"):
        RunConfig(data_format="alpaca")  # a classification run


def test_chunked_loss_equals_plain_cross_entropy_in_value_and_gradient():
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=True).double()
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    plain = F.cross_entropy(head(hidden), targets, reduction="sum")
    plain_grads = torch.autograd.grad(plain, [hidden, head.weight, head.bias])
    chunked = chunked_cross_entropy(hidden, head, targets, chunk=8)
    chunked_grads = torch.autograd.grad(chunked, [hidden, head.weight, head.bias])
    assert torch.allclose(chunked, plain, rtol=1e-12)
    for a, b in zip(chunked_grads, plain_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (3, 12), generator=gen)
    labels = ids.clone()
    labels[:, :5] = -100
    mask = torch.ones_like(ids)
    mask[2, 9:], labels[2, 9:] = 0, -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, batch, chunk):
    params = [p for p in model.model.parameters() if p.requires_grad]
    loss, count = causal_lm_loss(model.model, batch, chunk)
    return loss, count, torch.autograd.grad(loss, params)


def test_chunked_model_loss_matches_the_plain_loss_on_full_logits():
    model = build_model(ModelSpec(name=TINY, task="causal-lm"))
    model.model.double()  # float64: any difference left is the method's, not rounding's
    batch = _batch()
    params = [p for p in model.model.parameters() if p.requires_grad]
    logits = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    plain = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    plain_grads = torch.autograd.grad(plain, params)
    chunked, count, chunked_grads = _loss_and_grads(model, batch, chunk=4)
    assert count == 18
    assert torch.allclose(chunked, plain, rtol=1e-12)
    for a, b in zip(chunked_grads, plain_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    own, own_count = causal_lm_loss(model.model, batch, chunk=0)  # the model's loss (fp32 logits)
    assert own_count == count and torch.allclose(own.double(), plain, rtol=1e-6)


def _saved_bytes_and_grads(model, batch):
    """Bytes autograd keeps from the forward for backward, and the adapter's gradients."""
    saved: dict[int, int] = {}  # storage -> bytes (weights are saved by reference, counted once)

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = causal_lm_loss(model.model, batch, 4)
    params = [p for p in model.model.parameters() if p.requires_grad]
    return sum(saved.values()), loss, torch.autograd.grad(loss, params)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = build_model(ModelSpec(name=TINY, task="causal-lm"))
    model.model.train()
    batch = _batch(1)
    kept, loss, grads = _saved_bytes_and_grads(model, batch)
    set_gradient_checkpointing(model.model, True)
    kept_ckpt, loss_ckpt, grads_ckpt = _saved_bytes_and_grads(model, batch)
    set_gradient_checkpointing(model.model, False)
    assert kept_ckpt < kept  # the layers' activations are recomputed in backward, not kept
    assert torch.equal(loss, loss_ckpt)
    for a, b in zip(grads, grads_ckpt, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)


def test_bf16_base_keeps_an_fp32_adapter_with_the_fp32_init():
    fp32 = build_model(ModelSpec(name=TINY, task="causal-lm"))
    bf16 = build_model(ModelSpec(name=TINY, task="causal-lm", base_dtype="bf16"))
    assert digest(bf16.adapter_state()) == digest(fp32.adapter_state())  # nodes rebuild version 1
    dtypes = {p.dtype for p in bf16.model.parameters() if not p.requires_grad}
    assert dtypes == {torch.bfloat16}
    assert {p.dtype for p in bf16.model.parameters() if p.requires_grad} == {torch.float32}
    loss, _ = causal_lm_loss(bf16.model, _batch(), chunk=4)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.slow
def test_compiled_layers_train_like_eager_ones():
    config = RunConfig(task="causal-lm", model=TINY, local_steps=3, batch_size=8, learning_rate=1e-2)
    table = instructions.generated_instructions(24, seed=3)
    losses = []
    for compiled in (False, True):
        model = build_model(ModelSpec(name=TINY, task="causal-lm"))
        data = instructions.encode(table, model.tokenizer, 64)
        losses.append(train(model, data, config.replace(compile=compiled), seed=0).loss)
        if compiled:
            assert all(layer._compiled_call_impl is not None
                       for layer in model.model.get_base_model().model.layers)
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_4bit_is_refused_without_cuda():
    with pytest.raises(ConfigError, match="quantization=4bit needs a CUDA device"):
        build_model(ModelSpec(name=TINY, task="causal-lm", quantization="4bit"), "cpu")
    with pytest.raises(ConfigError, match="quantization=4bit is for task=causal-lm"):
        RunConfig(quantization="4bit")
    with pytest.raises(ConfigError, match="does not work with dp=sample"):
        RunConfig(task="causal-lm", quantization="4bit", dp="sample")


def test_generation_metrics():
    assert exact_match("Paris.", "paris") == 1.0
    assert exact_match("paris france", "paris") == 0.0
    assert token_f1("the red fox", "red dog") == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    # a model taught one answer says it greedily: exact match 1 against it, 0 against another
    config = RunConfig(task="causal-lm", model=TINY, target_modules=ALL_LINEAR, local_steps=40,
                       batch_size=1, learning_rate=1e-2, eval_generate=1, eval_max_new_tokens=4)
    model = build_model(ModelSpec(name=TINY, task="causal-lm", target_modules=(*ALL_LINEAR.split(","),)))
    rows = {"instruction": ["Name the capital of the country."], "input": ["france"],
            "output": ["paris"]}
    data = _encode(rows, model.tokenizer)
    train(model, data, config, seed=0)
    marked = instructions.mark_generation(Dataset.from_dict(rows), config)
    assert evaluate(model, instructions.encode(marked, model.tokenizer, 64))["exact_match"] == 1.0
    wrong = instructions.mark_generation(Dataset.from_dict({**rows, "output": ["rome"]}), config)
    scores = evaluate(model, instructions.encode(wrong, model.tokenizer, 64))
    assert scores["exact_match"] == 0.0 and scores["token_f1"] == 0.0


def _write_jsonl(path, table) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in table))
    return str(path)


@pytest.mark.slow
def test_alpaca_federation_loss_falls_and_reports_generation_metrics(tmp_path):
    train_path = _write_jsonl(tmp_path / "train.jsonl", instructions.generated_instructions(160, seed=1))
    test_path = _write_jsonl(tmp_path / "test.jsonl", instructions.generated_instructions(40, seed=2))
    config = RunConfig(task="causal-lm", model=TINY, train_data=train_path, test_data=test_path,
                       partition="iid", num_clients=2, num_server_rounds=2, local_steps=15,
                       batch_size=16, learning_rate=1e-2, target_modules=ALL_LINEAR,
                       gradient_checkpointing=True, eval_generate=20, eval_max_new_tokens=4,
                       out=str(tmp_path / "run"))
    rounds = simulate(config)["rounds"]
    assert rounds[2]["loss"] < rounds[0]["loss"] - 1.0
    metrics = RunDirectory(config.out).read_metrics()
    assert [r["round"] for r in metrics] == [0, 1, 2]
    assert all(0.0 <= r["exact_match"] <= 1.0 and "token_f1" in r for r in metrics)
