"""GPU client benchmark (issue 22): Pollinate's local LLM training against a plain peft loop.

Random-weight Llama shapes (no download): ``llama-1b`` (hidden 2048, 16 layers, 32 heads,
8 KV heads, intermediate 8192, vocabulary 128,256: about 1.5B parameters) and
``llama-8b`` (hidden 4096, 32 layers, intermediate 14336; gradient checkpointing on, for
both systems). LoRA r=16 (alpha 32) on every linear layer, bf16 base weights, bf16
autocast, AdamW, batches of 16 Alpaca-style examples of exactly 512 tokens (about 300
response tokens carry the loss, the prompt is masked).

Per shape, in this one process on one GPU:

* ``plain_peft``: ``get_peft_model`` on the bf16 model and the loop a peft tutorial
  writes: ``model(**batch).loss`` (full logits), backward, clip, fused AdamW step;
* ``pollinate``: the client's :func:`pollinate.client.trainer.train` on the model the
  client builds (:mod:`pollinate.modeling`, ``base-dtype=bf16``): chunked loss over the
  labelled tokens only, length-bucketed batches;

tokens/s (non-padding input tokens per second of training, after warm-up steps) and the
peak GPU memory of each (``torch.cuda.max_memory_allocated``). Then one real 2-client
federation (:func:`pollinate.simulations.launch.simulate`, clients one after the other
on the GPU) of two rounds: the share of round 2's wall time (the server's round, its
evaluation included) not spent in the clients' local training. Round 1 is reported
apart, as it includes building the model in the client process.

    python benchmarks/gpu_client.py                # on a CUDA machine: benchmarks/results/gpu_client.json
    python benchmarks/gpu_client.py --shapes llama-1b --compile
    python benchmarks/gpu_client.py --smoke        # llama-tiny on the CPU, a few steps: checks the
                                                   # code path, numbers are not results
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: import ``benchmarks`` and ``pollinate`` from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from pollinate import instructions  # noqa: E402
from pollinate.aggregators import resolve  # noqa: E402
from pollinate.client.trainer import train  # noqa: E402
from pollinate.config import RunConfig  # noqa: E402
from pollinate.data import collate  # noqa: E402
from pollinate.modeling import RANDOM_LLAMA_SHAPES, ModelSpec, load_tokenizer  # noqa: E402
from pollinate.server.rundir import RunDirectory  # noqa: E402
from pollinate.simulations.launch import simulate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_client.json"
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
CHECKPOINTED = {"llama-8b", "llama-tiny"}  # the smoke shape takes the 8B path's switches
GIB = 1024 ** 3


def settings(smoke: bool) -> dict[str, Any]:
    if smoke:
        return dict(batch=2, length=64, prompt_words=40, response_words=30, warmup=1, steps=3,
                    fed_steps=2, device="cpu")
    return dict(batch=16, length=512, prompt_words=320, response_words=300, warmup=3, steps=20,
                fed_steps=20, device="cuda")


def instruction_rows(n: int, prompt_words: int, response_words: int, seed: int) -> Dataset:
    """Alpaca rows whose input and output are runs of whole-word vocabulary entries."""
    vocab = load_tokenizer("random:llama-tiny").get_vocab()
    words = sorted(w for w, i in vocab.items() if w.isalpha() and 2000 <= i < 29000)
    rng = random.Random(seed)
    text = lambda k: " ".join(rng.choices(words, k=k))  # noqa: E731
    return Dataset.from_dict({"instruction": ["Continue the text."] * n,
                              "input": [text(prompt_words) for _ in range(n)],
                              "output": [text(response_words) for _ in range(n)]})


def run_config(shape: str, s: dict[str, Any], out: str = "", **changes: Any) -> RunConfig:
    base = dict(task="causal-lm", model=f"random:{shape}", batch_size=s["batch"], max_length=s["length"],
                local_steps=s["steps"], lora_rank=16, lora_alpha=32.0, target_modules=ALL_LINEAR,
                learning_rate=1e-4, precision="bf16", base_dtype="bf16",
                gradient_checkpointing=shape in CHECKPOINTED, device=s["device"], out=out)
    return RunConfig(**{**base, **changes})


def _reset(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / GIB if device == "cuda" else None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def plain_peft(config: RunConfig, data: instructions.InstructionData, s: dict[str, Any]) -> dict[str, float]:
    """The reference: a bf16 HF model, peft LoRA, the model's own loss, fused AdamW."""
    device = s["device"]
    _reset(device)
    shape = RANDOM_LLAMA_SHAPES[config.model.removeprefix("random:")]
    tokenizer = load_tokenizer(config.model)
    llama = LlamaConfig(**{"vocab_size": len(tokenizer), **shape}, pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(llama, dtype=torch.bfloat16).to(device)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                             target_modules=config.target_module_list))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, fused=device == "cuda" or None)
    batches = [collate(data.input_ids[i:i + s["batch"]], data.labels[i:i + s["batch"]],
                       tokenizer.pad_token_id, device) for i in range(0, len(data), s["batch"])]

    def step(batch: dict[str, torch.Tensor]) -> None:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in batches[:s["warmup"]]:
        step(batch)
    _sync(device)
    start = time.perf_counter()
    timed = batches[:s["steps"]]
    for batch in timed:
        step(batch)
    _sync(device)
    seconds = time.perf_counter() - start
    tokens = sum(int(b["attention_mask"].sum()) for b in timed)
    return {"tokens_per_s": tokens / seconds, "peak_mem_gib": _peak_gib(device)}


def pollinate_client(config: RunConfig, data: instructions.InstructionData,
                     s: dict[str, Any]) -> dict[str, float]:
    """The client's own trainer on the model the client builds, as in a round."""
    device = s["device"]
    _reset(device)
    aggregator = resolve(config.aggregator)
    model = aggregator.build_model(ModelSpec.from_config(config, 2), torch.device(device))
    train(model, data, config.replace(local_steps=s["warmup"]), seed=0)
    result = train(model, data, config, seed=1)
    return {"tokens_per_s": result.tokens / result.seconds, "peak_mem_gib": _peak_gib(device)}


def federated_round(shape: str, s: dict[str, Any], work: Path) -> dict[str, float]:
    """Two rounds of a real 2-client federation; the share of each round outside local training."""
    rows = instruction_rows(2 * s["batch"] * s["fed_steps"] + 2 * s["batch"], s["prompt_words"],
                            s["response_words"], seed=7)
    split = rows.train_test_split(test_size=2 * s["batch"], seed=0)
    paths = {}
    for name, table in split.items():
        paths[name] = str(work / f"{shape}-{name}.jsonl")
        Path(paths[name]).write_text("".join(json.dumps(row) + "\n" for row in table))
    config = run_config(shape, s, out=str(work / f"{shape}-run"), local_steps=s["fed_steps"],
                        train_data=paths["train"], test_data=paths["test"], partition="iid",
                        num_clients=2, num_server_rounds=2, min_train_nodes=2,
                        round_timeout=3600.0)
    _reset(s["device"])
    simulate(config, num_gpus=1.0 if s["device"] == "cuda" else 0.0)  # one client at a time on the GPU
    shares = {}
    for record in RunDirectory(config.out).read_metrics()[1:]:
        training = sum(c["train-seconds"] for c in record["client_metrics"])
        shares[record["round"]] = 1.0 - training / record["seconds"]
    return {"outside_training_share": shares[2], "first_round_outside_training_share": shares[1]}


def measure(shape: str, s: dict[str, Any], federate: bool, compile_layers: bool,
            work: Path) -> dict[str, Any]:
    config = run_config(shape, s, compile=compile_layers)
    table = instruction_rows(s["batch"] * (s["warmup"] + s["steps"]), s["prompt_words"],
                             s["response_words"], seed=1)
    data = instructions.encode(table, load_tokenizer(config.model), s["length"])
    plain = plain_peft(config, data, s)
    ours = pollinate_client(config, data, s)
    row = {"shape": shape, "plain_peft_tokens_per_s": plain["tokens_per_s"],
           "pollinate_tokens_per_s": ours["tokens_per_s"],
           "ratio_vs_plain_peft": ours["tokens_per_s"] / plain["tokens_per_s"],
           "peak_mem_gib": ours["peak_mem_gib"], "plain_peft_peak_mem_gib": plain["peak_mem_gib"],
           "gradient_checkpointing": config.gradient_checkpointing, "compile": compile_layers,
           "batch": f"{s['batch']} x {s['length']}",
           "device": torch.cuda.get_device_name() if s["device"] == "cuda" else "cpu"}
    if federate:
        row.update(federated_round(shape, s, work))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="llama-1b,llama-8b", help="comma-separated random shapes")
    parser.add_argument("--federate", default="llama-1b,llama-8b",
                        help="shapes whose 2-client federated round is measured (empty: none)")
    parser.add_argument("--compile", action="store_true", help="Pollinate with compile=true")
    parser.add_argument("--smoke", action="store_true",
                        help="llama-tiny on the CPU, a few steps: checks the code path, not a result")
    parser.add_argument("--out", default="", help="results file (default: benchmarks/results/"
                                                  "gpu_client.json; a temporary file with --smoke)")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_client.py measures GPU training and needs CUDA, which this "
                         "machine lacks (torch.cuda.is_available() is False); --smoke runs the same "
                         "code path on the CPU with llama-tiny")
    s = settings(args.smoke)
    shapes = ["llama-tiny"] if args.smoke else [x for x in args.shapes.split(",") if x]
    federate = set(shapes if args.smoke else [x for x in args.federate.split(",") if x])
    with tempfile.TemporaryDirectory(prefix="gpu-client-") as tmp:
        rows = [measure(shape, s, shape in federate, args.compile, Path(tmp)) for shape in shapes]
    out = Path(args.out) if args.out else (
        Path(tempfile.gettempdir()) / "gpu_client_smoke.json" if args.smoke else RESULTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "gpu_client", "smoke": args.smoke, "rows": rows}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(rows, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
