"""Instruction data for causal LMs: formats, templates, response-only labels, truncation.

FlowerTune-style users bring Alpaca records (``instruction``, ``input``, ``output``) or chat
``messages`` lists; older Pollinate data is raw ``prompt,response`` pairs. :func:`columns`
recognises the format from a table's columns (``data-format`` overrides), and
:func:`encode` turns each row into token ids and labels:

* Alpaca rows become a one-turn chat (user: instruction, a blank line, input; assistant: output).
* Chats are rendered with the tokenizer's chat template when it has one, else with the
  plain template below; prompt-response pairs are concatenated as they are
  (``prompt + " " + response + eos``).
* Only response tokens (every assistant turn, with the end-of-turn token that stops
  generation) carry labels; everything else is ``-100``.
* Truncation to ``max-length`` keeps the response: the prompt loses tokens from its start.

The plain template (tokenizers without a chat template)::

    ### System:\\n{system}\\n\\n          (only if there is a system message)
    ### Instruction:\\n{user}\\n\\n
    ### Response:\\n{assistant}<eos>

Held-out rows marked by :func:`mark_generation` also keep their prompt (up to the
last response) and reference answer, so evaluation can generate and score them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from pollinate.config import ConfigError, RunConfig
from pollinate.data import Encoded

DATA_FORMATS = ("auto", "prompt-response", "alpaca", "messages")
PLAIN_HEADERS = {"system": "### System:\n", "user": "### Instruction:\n",
                 "assistant": "### Response:\n"}
GENERATE_COLUMN = "max_new_tokens"  # held-out rows to generate for, with their token budget

Segment = tuple[list[int], bool]  # token ids, and whether they are response (labelled) tokens


def detect_format(available: Sequence[str], config: RunConfig) -> str:
    """The data format of a table with columns ``available``: ``data-format`` unless ``auto``."""
    if config.data_format != "auto":
        return config.data_format
    if "messages" in available:
        return "messages"
    if "instruction" in available and "output" in available:
        return "alpaca"
    return "prompt-response"


def columns(config: RunConfig, available: Sequence[str]) -> dict[str, str]:
    """Standard column name -> the table's column, for the format of a table with ``available``."""
    fmt = detect_format(available, config)
    if fmt == "messages":
        return {"messages": "messages"}
    if fmt == "alpaca":
        return {name: name for name in ("instruction", "input", "output")
                if name != "input" or "input" in available}
    return {"prompt": config.prompt_column, "response": config.response_column}


def to_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """A standardised row (Alpaca or messages columns) as a list of chat messages."""
    if "messages" in row:
        return [{"role": str(m["role"]), "content": str(m["content"] or "")} for m in row["messages"]]
    user = str(row["instruction"])
    if row.get("input"):
        user = f"{user}\n\n{row['input']}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": str(row["output"])}]


def end_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that ends a response: eos, else sep (BERT-style vocabularies)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise ConfigError("model: the tokenizer has neither an eos nor a sep token to end responses")
    return eos


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def plain_segments(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> list[Segment]:
    """Messages in the plain template (see the module docstring)."""
    out: list[Segment] = []
    for m in messages:
        if m["role"] not in PLAIN_HEADERS:
            raise ConfigError(f"data: message role {m['role']!r}; the plain template knows "
                              f"{sorted(PLAIN_HEADERS)}")
        out.append((_ids(tokenizer, PLAIN_HEADERS[m["role"]]), False))
        if m["role"] == "assistant":
            out.append((_ids(tokenizer, m["content"]) + [end_token(tokenizer)], True))
        else:
            out.append((_ids(tokenizer, m["content"] + "\n\n"), False))
    return out


def chat_segments(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> list[Segment]:
    """Messages through the tokenizer's chat template; assistant turns are the labelled spans.

    The span of assistant turn ``i`` is what rendering ``messages[:i+1]`` adds to rendering
    ``messages[:i]`` with the generation prompt: exactly what the model must produce after
    that prompt, end-of-turn token included.
    """
    def render(upto: int, prompt: bool) -> str:
        if upto == 0:
            return ""
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False,
                                             add_generation_prompt=prompt)

    full = render(len(messages), False)
    out: list[Segment] = []
    done = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = render(i, True), render(i + 1, False)
        if not (full.startswith(before) and full.startswith(through) and done <= len(before)):
            raise ConfigError("data: the tokenizer's chat template does not render a conversation as "
                              "the concatenation of its turns; use data in prompt-response format")
        out += [(_ids(tokenizer, full[done:len(before)]), False),
                (_ids(tokenizer, full[len(before):len(through)]), True)]
        done = len(through)
    out.append((_ids(tokenizer, full[done:]), False))
    return out


def prompt_response_segments(prompt: str, response: str,
                             tokenizer: PreTrainedTokenizerBase) -> list[Segment]:
    return [(_ids(tokenizer, prompt), False),
            (_ids(tokenizer, " " + response) + [end_token(tokenizer)], True)]


def truncate(ids: list[int], labels: list[int], start: int,
             max_length: int) -> tuple[list[int], list[int], int]:
    """Cut an example to ``max_length`` tokens, keeping the response that begins at ``start``.

    The prompt loses tokens from its start (the end of a prompt, next to the response,
    holds the question and the response header). Only a response longer than
    ``max_length - max_length // 4`` loses its own end, so at least a quarter of the
    budget stays with the prompt. Returns ids, labels and the response's new start.
    """
    if len(ids) <= max_length:
        return ids, labels, start
    keep = min(start, max(max_length - (len(ids) - start), max_length // 4))
    cut = start - keep
    return ids[cut:cut + max_length], labels[cut:cut + max_length], keep


@dataclass
class InstructionData(Encoded):
    """Tokenized causal-LM examples, plus what generation needs for the rows marked for it.

    ``prompts[i]`` is example ``i`` up to its last response, ``references[i]`` that
    response's text, ``generate[i]`` the new-token budget (0: not generated).
    """

    prompts: list[list[int]] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    generate: list[int] = field(default_factory=list)

    def generation_rows(self) -> list[int]:
        return [i for i, budget in enumerate(self.generate) if budget > 0]


def encode(table: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> InstructionData:
    """Token ids and response-only labels of a standardised causal-LM table (see :func:`columns`)."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    budgets = table[GENERATE_COLUMN] if GENERATE_COLUMN in table.column_names else [0] * len(table)
    data = InstructionData([], [])
    for row_index, (row, budget) in enumerate(zip(table, budgets, strict=True)):
        if "prompt" in row:
            segments = prompt_response_segments(str(row["prompt"]), str(row["response"]), tokenizer)
            reference = str(row["response"])
        else:
            messages = to_messages(row)
            answers = [m["content"] for m in messages if m["role"] == "assistant"]
            if not answers:
                raise ConfigError(f"data row {row_index}: a conversation without an assistant message")
            segments = (chat_segments if chat else plain_segments)(messages, tokenizer)
            reference = answers[-1]
        ids, labels, start = [], [], 0
        for tokens, labelled in segments:
            if labelled:
                start = len(ids)
            ids += tokens
            labels += tokens if labelled else [-100] * len(tokens)
        ids, labels, start = truncate(ids, labels, start, max_length)
        data.input_ids.append(ids)
        data.labels.append(labels)
        data.prompts.append(ids[:start])
        data.references.append(reference)
        data.generate.append(int(budget))
    return data


def mark_generation(table: Dataset, config: RunConfig) -> Dataset:
    """Mark the first ``eval-generate`` held-out rows for greedy generation (``eval-max-new-tokens``)."""
    count = min(config.eval_generate, len(table))
    budgets = [config.eval_max_new_tokens] * count + [0] * (len(table) - count)
    return table.add_column(GENERATE_COLUMN, budgets)


# -- the generated instruction task ----------------------------------------------------------

_TASKS = {
    "Give the opposite of the word.": {
        "hot": "cold", "big": "small", "up": "down", "fast": "slow", "day": "night",
        "open": "closed", "left": "right", "old": "new", "happy": "sad", "early": "late"},
    "Name the colour of the fruit.": {
        "banana": "yellow", "cherry": "red", "lime": "green", "orange": "orange",
        "grape": "purple", "lemon": "yellow", "strawberry": "red", "blueberry": "blue",
        "apple": "green", "plum": "purple"},
    "Name the capital of the country.": {
        "france": "paris", "italy": "rome", "spain": "madrid", "japan": "tokyo",
        "egypt": "cairo", "germany": "berlin", "russia": "moscow", "china": "beijing",
        "canada": "ottawa", "greece": "athens"},
}
_PHRASINGS = ("{}", "the word is {}", "{} please", "input: {}", "what about {}")


def generated_instructions(n: int, seed: int) -> Dataset:
    """A deterministic Alpaca-style task: three word-lookup instructions, inputs in five phrasings.

    Small enough that a tiny random Llama learns it in a few federated rounds on a CPU
    (held-out rows are fresh draws of the same rules), and every answer is one word, so
    exact match is meaningful.
    """
    rng = random.Random(seed)
    names = sorted(_TASKS)
    rows: dict[str, list[str]] = {"instruction": [], "input": [], "output": []}
    for _ in range(n):
        instruction = rng.choice(names)
        word = rng.choice(sorted(_TASKS[instruction]))
        rows["instruction"].append(instruction)
        rows["input"].append(rng.choice(_PHRASINGS).format(word))
        rows["output"].append(_TASKS[instruction][word])
    return Dataset.from_dict(rows)
