"""Prompt side of lwz: the think-then-answer template, answer extraction and the prompt dataset.

The format follows LongWriter-Zero (paper §3): a raw completion, not a chat template. One
instruction preamble, then `<|user|>: {question} <|assistant|>:`; the model is expected to
continue with `<think> ... </think> <answer> ... </answer>`. Questions containing a CJK ideograph
([\\u4e00-\\u9fff]) get the Chinese preamble, which ends with `<|用户|>: {question} <|助手|>:`.
The wording here is ours; the structure is the paper's.

Dataset: JSONL, one object a line: {"prompt": "...", "length_range": [lo, hi]} (length_range is
optional: target answer length in words, 0 <= lo <= hi). Blank lines are skipped; anything else
that is wrong is a PromptDataError `path:line: what is wrong`. `tokenize_prompts` templates and
tokenises every record once (the trainer does it at start-up, before step 1) and sets aside the
ones longer than data.max_prompt_tokens.
"""

from __future__ import annotations

import json
import os
import random
import re
from array import array
from dataclasses import dataclass, field, replace
from typing import Optional

_CJK = re.compile(r"[\u4e00-\u9fff]")

# The preamble of each template ends with two spaces before the user marker, as in the paper.
THINK_TEMPLATE_EN = (
    "This is a conversation between a user and an assistant. The user gives a writing task or a "
    "general task, and the assistant carries it out. Before producing the finished piece, the "
    "assistant thinks the writing process through: it plans the content and the structure in "
    "detail, and when the request is unclear it questions itself, weighs several readings and "
    "tries more than one approach. While thinking it considers coherence, clarity, style, tone, "
    "the intended readers and the purpose, and it reviews and improves the draft before "
    "settling on the final version. The thinking is enclosed in <think> </think> and the "
    "finished piece in <answer> </answer>, for example: <think>A full writing plan: ideas, "
    "outline, choice of style, adapting to the readers, self-review, quality checks and so "
    "on.</think> <answer>The finished piece, polished and revised.</answer>  "
    "<|user|>: {question} <|assistant|>:"
)

THINK_TEMPLATE_ZH = (
    "这是用户与助手之间的一段对话。用户提出一个写作任务或一般任务，由助手完成。在给出最终作品之前，"
    "助手会先把写作过程想清楚：详细规划内容与结构；如果要求不够明确，就自我追问，考虑几种可能的理解，"
    "并尝试不同的写法；同时兼顾连贯、清晰、文风、语气、目标读者与写作目的，并在定稿前检查和修改。"
    "思考过程写在 <think> </think> 中，最终作品写在 <answer> </answer> 中，例如：<think>完整的写作方案："
    "构思、提纲、文风选择、面向读者的调整、自我检查、质量把关等。</think> <answer>经过充分打磨和修改的"
    "最终作品。</answer>  <|用户|>: {question} <|助手|>:"
)

NOTHINK_TEMPLATE_EN = (
    "This is a conversation between a user and an assistant. The user gives a writing task or a "
    "general task, and the assistant carries it out. The assistant writes the finished piece "
    "directly, enclosed in <answer> </answer>, for example: <answer>The finished piece, "
    "polished and revised.</answer>  <|user|>: {question} <|assistant|>:"
)

NOTHINK_TEMPLATE_ZH = (
    "这是用户与助手之间的一段对话。用户提出一个写作任务或一般任务，由助手完成。助手直接给出最终作品，"
    "写在 <answer> </answer> 中，例如：<answer>经过充分打磨和修改的最终作品。</answer>  "
    "<|用户|>: {question} <|助手|>:"
)

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def is_chinese(text: str) -> bool:
    """True when text contains a CJK unified ideograph (U+4E00..U+9FFF)."""
    return _CJK.search(text) is not None


def build_prompt(
    question: str,
    think: bool = True,
    template_en: Optional[str] = None,
    template_zh: Optional[str] = None,
) -> str:
    """The full prompt text for one question.

    Chinese questions use the Chinese template. template_en / template_zh (config
    data.template_en / data.template_zh) replace the built-in template of that language for
    both think modes; they must contain `{question}`, which is substituted literally (other
    braces are left alone).
    """
    zh = is_chinese(question)
    if zh:
        template = template_zh if template_zh is not None else (THINK_TEMPLATE_ZH if think else NOTHINK_TEMPLATE_ZH)
    else:
        template = template_en if template_en is not None else (THINK_TEMPLATE_EN if think else NOTHINK_TEMPLATE_EN)
    if "{question}" not in template:
        raise ValueError(f"prompt template has no '{{question}}' placeholder: {template[:60]!r}...")
    return template.replace("{question}", question.strip())


def _extract(text: str, open_tag: str, close_tag: str, stopped_at_close: bool) -> Optional[str]:
    start = text.find(open_tag)
    if start < 0:
        return None
    start += len(open_tag)
    end = text.find(close_tag, start)
    if end < 0:
        # generation stopped on the close tag and the stop string was cut from the text
        return text[start:].strip() if stopped_at_close else None
    return text[start:end].strip()


def extract_answer(text: str, stopped_at_close: bool = False) -> Optional[str]:
    """The stripped text inside the first `<answer>...</answer>`; None when there is none.

    Same result as `re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)` then strip. If the
    text has `<answer>` but no `</answer>` after it, the answer is accepted (everything after
    `<answer>`, stripped) only when stopped_at_close is True, i.e. the caller knows generation
    ended on the `</answer>` stop string and the string was removed; otherwise it is None (the
    answer was cut by the length cap). An empty answer is "" (not None).
    """
    return _extract(text, ANSWER_OPEN, ANSWER_CLOSE, stopped_at_close)


def extract_think(text: str, stopped_at_close: bool = False) -> Optional[str]:
    """The stripped text inside the first `<think>...</think>`; None when absent (see extract_answer)."""
    return _extract(text, THINK_OPEN, THINK_CLOSE, stopped_at_close)


# --------------------------------------------------------------------------------------------
# Prompt dataset


class PromptDataError(ValueError):
    """A malformed prompt file; the message is `path:line: what is wrong`."""


@dataclass(frozen=True)
class PromptRecord:
    prompt: str  # the question (before templating)
    length_range: Optional[tuple[int, int]]  # target answer length in words, or None
    line: int  # 1-based line number in the source file
    # the templated prompt's token ids (int32), set by tokenize_prompts; None before
    token_ids: Optional[array] = field(default=None, compare=False, repr=False)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_prompt_line(obj, where: str) -> tuple[str, Optional[tuple[int, int]]]:
    """Validates one decoded JSON line; raises PromptDataError prefixed with where."""
    if not isinstance(obj, dict):
        raise PromptDataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "prompt" not in obj:
        raise PromptDataError(f"{where}: missing 'prompt'")
    prompt = obj["prompt"]
    if not isinstance(prompt, str):
        raise PromptDataError(f"{where}: 'prompt' must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise PromptDataError(f"{where}: 'prompt' is empty")
    rng = obj.get("length_range")
    if rng is None:
        return prompt, None
    if not (isinstance(rng, list) and len(rng) == 2 and all(_is_int(v) for v in rng)):
        raise PromptDataError(f"{where}: 'length_range' must be [lo, hi] with two integers, got {json.dumps(rng)}")
    lo, hi = rng
    if lo < 0 or lo > hi:
        raise PromptDataError(f"{where}: 'length_range' {json.dumps(rng)} must satisfy 0 <= lo <= hi")
    return prompt, (lo, hi)


def iter_jsonl(path: str, error=ValueError, what: str = "file"):
    """Yield (line number, parsed object) of a JSONL file, skipping blank lines. A missing file,
    bad UTF-8 or bad JSON raises `error` with one line `path[:line]: what is wrong`."""
    if not os.path.exists(path):  # any readable path: a file, a pipe (`<(...)`), /dev/stdin
        raise error(f"{path}: {what} not found")
    if os.path.isdir(path):
        raise error(f"{path}: is a folder, expected a {what} (JSONL)")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise error(f"{where}: not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None


def load_prompts(path: str) -> list[PromptRecord]:
    """Reads a prompt JSONL file; raises PromptDataError `path:line: ...` on the first bad line."""
    records: list[PromptRecord] = []
    for lineno, obj in iter_jsonl(path, PromptDataError, "prompt file"):
        prompt, rng = parse_prompt_line(obj, f"{path}:{lineno}")
        records.append(PromptRecord(prompt=prompt, length_range=rng, line=lineno))
    if not records:
        raise PromptDataError(f"{path}: no prompts in file")
    return records


def template_prompt(question: str, data) -> str:
    """build_prompt with the template settings of a DataConfig (think, template_en, template_zh)."""
    return build_prompt(question, think=data.think, template_en=data.template_en, template_zh=data.template_zh)


def tokenize_prompts(records: list[PromptRecord], tok, data,
                     chunk: int = 1024) -> tuple[list[PromptRecord], list[tuple[PromptRecord, int]]]:
    """Template (template_prompt) and tokenise every record once, in chunks of `chunk` prompts.

    Returns (kept, too_long): kept = the records, in file order, whose templated prompt has at most
    data.max_prompt_tokens tokens, each with its token_ids (array of int32) set; too_long =
    (record, token count) of the others, in file order. Which records are kept depends only on
    the records, the tokenizer and data's template settings, so a resumed run sees the same list.
    """
    from lwz.tokenizer import encode_batch

    kept, too_long = [], []
    for start in range(0, len(records), chunk):
        part = records[start:start + chunk]
        for rec, ids in zip(part, encode_batch(tok, [template_prompt(r.prompt, data) for r in part])):
            if len(ids) > data.max_prompt_tokens:
                too_long.append((rec, len(ids)))
            else:
                kept.append(replace(rec, token_ids=array("i", ids)))
    return kept, too_long


def long_prompts_message(path: str, too_long: list[tuple[PromptRecord, int]], limit: int, show: int = 5) -> str:
    """One line naming the first `show` over-long prompts as path:line (tokens) and how many more."""
    where = ", ".join(f"{path}:{rec.line} ({n} tokens)" for rec, n in too_long[:show])
    more = f" and {len(too_long) - show} more" if len(too_long) > show else ""
    return (f"{len(too_long)} templated prompt{'s' if len(too_long) > 1 else ''} longer than "
            f"data.max_prompt_tokens={limit}: {where}{more}")


class PromptCursor:
    """Deterministic stream of prompt indices: epoch after epoch, each epoch a permutation.

    The order of epoch e depends only on (seed, e, len(dataset)), so a run resumed from
    state_dict() continues with the same prompts. A batch may span two epochs.
    """

    def __init__(self, num_prompts: int, seed: int = 0, shuffle: bool = True):
        if num_prompts < 1:
            raise ValueError("PromptCursor needs at least one prompt")
        self.num_prompts = num_prompts
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order: list[int] = []

    def _epoch_order(self) -> list[int]:
        if self._order_epoch != self.epoch:
            order = list(range(self.num_prompts))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
            self._order, self._order_epoch = order, self.epoch
        return self._order

    def next_indices(self, k: int) -> list[int]:
        """The next k prompt indices (wrapping into the next epoch as needed)."""
        out: list[int] = []
        while len(out) < k:
            order = self._epoch_order()
            take = min(k - len(out), self.num_prompts - self.position)
            out.extend(order[self.position:self.position + take])
            self.position += take
            if self.position == self.num_prompts:
                self.epoch += 1
                self.position = 0
        return out

    def next(self, records: list, k: int) -> list:
        """The next k items of records (len(records) must equal num_prompts)."""
        if len(records) != self.num_prompts:
            raise ValueError(f"PromptCursor built for {self.num_prompts} prompts, got {len(records)}")
        return [records[i] for i in self.next_indices(k)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "shuffle": self.shuffle, "num_prompts": self.num_prompts}

    def load_state_dict(self, state: dict) -> None:
        n = state.get("num_prompts", self.num_prompts)
        if n != self.num_prompts:
            raise ValueError(
                f"prompt cursor state is for {n} prompts but the dataset has {self.num_prompts}; "
                "the prompt file changed since the checkpoint"
            )
        self.seed = int(state.get("seed", self.seed))
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        if not (0 <= self.position < self.num_prompts):
            raise ValueError(f"prompt cursor position {self.position} out of range [0, {self.num_prompts})")
        self._order_epoch = -1


__all__ = [
    "ANSWER_CLOSE", "ANSWER_OPEN", "NOTHINK_TEMPLATE_EN", "NOTHINK_TEMPLATE_ZH", "PromptCursor",
    "PromptDataError", "PromptRecord", "THINK_CLOSE", "THINK_OPEN", "THINK_TEMPLATE_EN",
    "THINK_TEMPLATE_ZH", "build_prompt", "extract_answer", "extract_think", "is_chinese",
    "load_prompts", "long_prompts_message", "parse_prompt_line", "template_prompt", "tokenize_prompts",
]
