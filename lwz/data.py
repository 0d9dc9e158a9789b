"""Data commands: `python -m lwz.data <command>`.

    python -m lwz.data prepare --in raw.jsonl --out prompts.jsonl [--prompt-field F] [--range-field F]
        [--config C] [--tokenizer P] [--keep-long] [--a.b=v ...]
    python -m lwz.data label-lengths --model /models/QwQ-32B --in prompts.jsonl --out labelled.jsonl
        [--tokenizer P] [--relabel] [--batch-size 64] [--max-new-tokens 32] [--config C] [--a.b=v ...]

prepare: converts a prompt set (JSONL, or Parquet when pyarrow is installed) to the trainer's JSONL,
one `{"prompt": ..., "length_range": [lo, hi]}` a line (length_range only where the input has one).
The prompt is the field --prompt-field (default "prompt"); when a record has no such field, or the
field holds a chat, the first user turn of its `messages` list (`[{"role": "user", "content":
...}, ...]`; content a string or a list of `{"type": "text", "text": ...}` parts). The range is
--range-field (default "length_range"): [lo, hi] integers, 0 <= lo <= hi. Records that repeat an
earlier prompt's exact text are dropped (the first is kept). Every prompt is templated and
tokenised as the trainer does (data.think, data.template_en/zh, tokenizer.path of --config, then
--tokenizer and the dotted overrides), and those longer than data.max_prompt_tokens are dropped,
or with --keep-long only reported. Malformed records are skipped and reported as file:line.

    python -m lwz.data tokenize --in <files or globs> [--in ...] --out <dir> --tokenizer <folder>
        [--text-field text] [--txt-docs file|blank-line] [--shard-tokens N] [--batch-docs N]

tokenize: a pretraining corpus as uint32 token shards plus a document index (layout in
lwz/corpus.py), the input of lwz/pretrain.py. Inputs: .jsonl (one document a line, its text in
--text-field; malformed lines and records without that string field are skipped and reported as
file:line), .parquet (the --text-field column), .txt (the whole file one document, or with
--txt-docs blank-line one document per blank-line-separated block). Every non-empty document is
encoded without special tokens and ends with the tokenizer's EOS; empty ones are skipped and
counted. Documents are encoded in batches (a fast tokenizer encodes a batch on all cores). The
folder is built beside --out and renamed into place when complete; a rerun with the same inputs
and tokenizer finds it done, and an --out holding anything else is refused.

label-lengths: gives every prompt of a trainer JSONL file a target word range, as the paper does
with an LLM (QwQ-32B): the model folder is loaded with our Transformer and decodes greedily with
our rollout engine (batched; under torchrun each rank labels its share and rank 0 writes), after
a few-shot labelling prompt that asks for `[lo, hi]`. An answer is used when it parses
(parse_range_answer) to 0 <= lo <= hi <= rewards.length_max_words with hi > 0; otherwise the
prompt's own request (lwz.rewards.length.parse_length_request), under the same rule; otherwise
rewards.default_length_range. Records that already have a length_range keep it unless --relabel.
Every input field is kept; `length_range` and `length_source` ("model", "parser", "default", or
"given" for a kept range) are added.

Both commands check their arguments and inputs before any work, print one line
`error: what is wrong` (exit 2) on bad input, never overwrite their input, and write the output
to a temporary file that replaces --out only when complete.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
from typing import Iterator, Optional

from lwz.config import ConfigError, load_config
from lwz.prompts import PromptDataError, PromptRecord, iter_jsonl, long_prompts_message, parse_prompt_line, \
    tokenize_prompts


class DataError(ValueError):
    """Bad input of a data command; the message is one line."""


# --------------------------------------------------------------------------------------------
# Shared pieces


def check_output(out: str, *inputs: str) -> None:
    """Refuses an --out that is one of the inputs (it would be replaced before being read)."""
    for inp in inputs:
        both = os.path.exists(out) and os.path.exists(inp)
        if os.path.realpath(out) == os.path.realpath(inp) or (both and os.path.samefile(out, inp)):
            raise DataError(f"--out {out} is the input file {inp}; write to another path")


def write_jsonl_atomic(path: str, rows) -> int:
    """Writes the dicts of `rows` as JSONL to a temporary file beside `path`, then renames it over
    `path`; on any error the temporary file is removed and `path` is left as it was. Returns the
    number of rows written."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return n


def _parser(prog: str, description: str, tokenizer_help: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m lwz.data {prog}", description=description,
                                epilog="Any config key can follow as a dotted override: --data.max_prompt_tokens=1024")

    def one_line(msg):  # argparse prints usage + message; keep bad input to one line
        raise DataError(f"{prog}: {msg} (see --help)")

    p.error = one_line
    p.add_argument("--config", metavar="TOML",
                   help="TOML config of the run (templates, tokenizer, limits); default: the defaults")
    p.add_argument("--tokenizer", metavar="PATH", help=tokenizer_help)
    return p


def _load_cfg(args, overrides: list[str]):
    """The run's config: --config (or the defaults), the dotted overrides left over by argparse
    (`--data.max_prompt_tokens=1024`), then --tokenizer."""
    # the defaults enable the quality reward, whose model folder validation requires; the data
    # commands never load it
    cfg = load_config(args.config, overrides if args.config else ["--rewards.quality=false"] + overrides)
    if args.tokenizer:
        cfg.tokenizer.path = args.tokenizer
    return cfg


# --------------------------------------------------------------------------------------------
# prepare


def first_user_turn(messages, where: str) -> str:
    """The text of the first user message of a chat list; raises DataError naming `where`."""
    if not isinstance(messages, list):
        raise DataError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
    for m in messages:
        if isinstance(m, dict) and m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, list):  # multimodal-style parts: keep the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict)
                                  and p.get("type", "text") == "text")
            if not isinstance(content, str):
                raise DataError(f"{where}: the first user message has no text content")
            return content
    raise DataError(f"{where}: 'messages' has no user turn")


def _as_range(value, field: str, where: str) -> Optional[tuple[int, int]]:
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() for v in value)
    if not ok:
        raise DataError(f"{where}: '{field}' must be [lo, hi] with two integers, got {json.dumps(value)}")
    lo, hi = int(value[0]), int(value[1])
    if not 0 <= lo <= hi:
        raise DataError(f"{where}: '{field}' {json.dumps([lo, hi])} must satisfy 0 <= lo <= hi")
    return lo, hi


def extract_prompt(obj, prompt_field: str, range_field: str, where: str) -> tuple[str, Optional[tuple[int, int]]]:
    """(prompt text, length range or None) of one input record; raises DataError naming `where`."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object, got {type(obj).__name__}")
    if prompt_field in obj and not isinstance(obj[prompt_field], list):
        prompt = obj[prompt_field]
        if not isinstance(prompt, str):
            raise DataError(f"{where}: '{prompt_field}' must be a string, got {type(prompt).__name__}")
    elif prompt_field in obj:
        prompt = first_user_turn(obj[prompt_field], where)
    elif "messages" in obj:
        prompt = first_user_turn(obj["messages"], where)
    else:
        raise DataError(f"{where}: no '{prompt_field}' field and no 'messages' list")
    if not prompt.strip():
        raise DataError(f"{where}: the prompt is empty")
    return prompt, _as_range(obj.get(range_field), range_field, where)


def _jsonl_rows(path: str, progress) -> Iterator[tuple[int, object, Optional[str]]]:
    """(line, decoded object or None, error or None) of every non-blank line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            progress.update(len(raw))
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield lineno, None, "not valid UTF-8"
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line), None
            except json.JSONDecodeError as e:
                yield lineno, None, f"invalid JSON ({e.msg} at column {e.colno})"


def _require_pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet needs pyarrow: pip install pyarrow (or convert the file to JSONL)") from None
    return pq


def _open_parquet(path: str):
    pq = _require_pyarrow()
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow's errors are many; one line names the file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"--in {path}: not a readable Parquet file ({msg})") from None


def _parquet_rows(path: str, progress) -> Iterator[tuple[int, object, Optional[str]]]:
    """(row number from 1, record dict, None) of every row."""
    row = 0
    for batch in _open_parquet(path).iter_batches(batch_size=4096):
        for obj in batch.to_pylist():
            row += 1
            yield row, obj, None
        progress.update(batch.num_rows)


def _input_kind(path: str) -> str:
    if not os.path.isfile(path):
        raise DataError(f"--in {path}: file not found")
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith(".jsonl"):
        return "jsonl"
    raise DataError(f"--in {path}: expected a .jsonl or .parquet file")


def prepare(argv: list[str]) -> int:
    from lwz.metrics import Progress
    from lwz.tokenizer import load_tokenizer

    p = _parser("prepare", "Convert a prompt set to the trainer's prompt JSONL.",
                "tokenizer folder (default: tokenizer.path of the config)")
    p.add_argument("--in", dest="inp", metavar="PATH", required=True, help="input .jsonl or .parquet")
    p.add_argument("--out", metavar="PATH", required=True, help="output JSONL (written atomically)")
    p.add_argument("--prompt-field", default="prompt", help="field holding the prompt (or a chat list)")
    p.add_argument("--range-field", default="length_range", help="field holding [lo, hi] (optional per record)")
    p.add_argument("--keep-long", action="store_true",
                   help="keep prompts over data.max_prompt_tokens (only report them)")
    args, overrides = p.parse_known_args(argv)
    kind = _input_kind(args.inp)
    check_output(args.out, args.inp)
    total = _open_parquet(args.inp).metadata.num_rows if kind == "parquet" else os.path.getsize(args.inp)
    cfg = _load_cfg(args, overrides)
    tok = load_tokenizer(cfg.tokenizer.path)

    bar = Progress(total, f"reading {os.path.basename(args.inp)}")
    read, bad, dups, seen, records = 0, [], 0, set(), []
    rows = _parquet_rows(args.inp, bar) if kind == "parquet" else _jsonl_rows(args.inp, bar)
    for line, obj, err in rows:
        read += 1
        where = f"{args.inp}:{line}"
        try:
            if err is not None:
                raise DataError(f"{where}: {err}")
            prompt, rng = extract_prompt(obj, args.prompt_field, args.range_field, where)
        except DataError as e:
            bad.append(str(e))
            continue
        if prompt in seen:
            dups += 1
            continue
        seen.add(prompt)
        records.append(PromptRecord(prompt=prompt, length_range=rng, line=line))
    bar.close()

    bar = Progress(len(records), "tokenising")
    kept, too_long = [], []
    chunk = 1024
    for start in range(0, len(records), chunk):
        k, t = tokenize_prompts(records[start:start + chunk], tok, cfg.data)
        kept += k
        too_long += t
        bar.update(len(records[start:start + chunk]))
    bar.close()
    out = sorted(kept + [r for r, _ in too_long], key=lambda r: r.line) if args.keep_long else kept

    print(f"prepare: read {read} records from {args.inp}")
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        print(f"  bad records skipped: {len(bad)} ({shown})")
    print(f"  duplicates dropped: {dups}")
    if too_long:
        what = "kept (--keep-long)" if args.keep_long else "dropped"
        print(f"  too long, {what}: {long_prompts_message(args.inp, too_long, cfg.data.max_prompt_tokens)}")
    else:
        print(f"  too long: 0 (data.max_prompt_tokens={cfg.data.max_prompt_tokens})")
    if not out:
        raise DataError(f"no prompts left to write; {args.out} was not written")
    n = write_jsonl_atomic(args.out, ({"prompt": r.prompt, **({"length_range": list(r.length_range)}
                                                              if r.length_range else {})} for r in out))
    with_range = sum(r.length_range is not None for r in out)
    print(f"  wrote {n} prompts to {args.out} ({with_range} with a length_range)")
    return 0


# --------------------------------------------------------------------------------------------
# label-lengths

LABEL_PROMPT = (
    "Estimate how long a good answer to a writing request should be, in words (each Chinese "
    "character counts as one word). Use the length the request asks for when it states one; "
    "otherwise choose a length that suits the task. Reply with the range only, as [lo, hi].\n\n"
    "Request: Write a 500-word story about a lighthouse keeper.\nRange: [450, 550]\n\n"
    "Request: 写一首关于秋天的短诗。\nRange: [40, 120]\n\n"
    "Request: Draft a detailed business plan for a neighbourhood bakery.\nRange: [1500, 2500]\n\n"
    "Request: {question}\nRange: ["
)
# the prompt ends inside the answer, after its opening bracket; the model's text continues it
LABEL_PREFIX = "["

_NUM = r"\d{1,3}(?:[,，]\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
_NUMK = rf"({_NUM})\s*([kK]?)"
_SEP = r"\s*(?:,|，|-|–|—|~|～|to|至|到)\s*"
_BRACKET = re.compile(rf"\[\s*{_NUMK}{_SEP}{_NUMK}\s*(?:\]|$)")  # unclosed at the end: a stop at "\n"
_KEYS = re.compile(rf"\b(?:lo|low|lower|min)\s*[=:]\s*{_NUMK}[\s,;]*(?:hi|high|upper|max)\s*[=:]\s*{_NUMK}", re.I)
_PLAIN = re.compile(rf"(?<![\d.,，]){_NUMK}\s*(?:words?\s*)?(?:-|–|—|~|～|to|至|到)\s*{_NUMK}", re.I)


def _number(digits: str, k: str) -> float:
    return float(digits.replace(",", "").replace("，", "")) * (1000 if k else 1)


def valid_range(rng, max_words: int) -> bool:
    """0 <= lo <= hi <= max_words and hi > 0."""
    return rng is not None and 0 <= rng[0] <= rng[1] <= max_words and rng[1] > 0


def parse_range_answer(text: str, max_words: int) -> Optional[tuple[int, int]]:
    """The word range [lo, hi] a labelling model answered, or None when the answer is unusable.

    A reasoning model's `<think>...</think>` part is skipped (an unclosed one: unusable). The first
    of these forms counts: `[800, 1200]` (also `[800-1200]`, `[1.5k, 2k]`), then `lo=800 hi=1200`
    (lo/low/min, hi/high/max; `=` or `:`), then a plain `800-1200` / `800 to 1200 words`. Bounds
    are rounded to integers and must satisfy valid_range (lo > hi is unusable, not swapped)."""
    if not text:
        return None
    if "<think>" in text or "</think>" in text:
        if "</think>" not in text:
            return None
        text = text.rsplit("</think>", 1)[1]
    for pat in (_BRACKET, _KEYS, _PLAIN):
        m = pat.search(text)
        if m:
            lo, hi = round(_number(*m.group(1, 2))), round(_number(*m.group(3, 4)))
            return (lo, hi) if valid_range((lo, hi), max_words) else None
    return None


def choose_range(answer: Optional[str], prompt: str, max_words: int,
                 default: tuple[int, int]) -> tuple[tuple[int, int], str]:
    """(range, source): the model's answer when usable ("model"), else the prompt's own length
    request ("parser"), else `default` ("default")."""
    from lwz.rewards.length import parse_length_request

    rng = parse_range_answer(LABEL_PREFIX + answer, max_words) if answer is not None else None
    if rng is not None:
        return rng, "model"
    rng = parse_length_request(prompt)
    if rng is not None and valid_range(tuple(rng), max_words):
        return (int(rng[0]), int(rng[1])), "parser"
    return (int(default[0]), int(default[1])), "default"


def _label_answers(model, tok, prompts: list[str], batch_size: int, max_new_tokens: int, bar,
                   decode_kernel: str = "auto") -> list[Optional[str]]:
    """The model's greedy continuation of the labelling prompt of each question (None where the
    labelling prompt does not fit the model's context with max_new_tokens)."""
    from lwz.rollout import generate
    from lwz.tokenizer import encode_batch

    limit = model.config.max_position_embeddings - max_new_tokens
    out: list[Optional[str]] = [None] * len(prompts)
    for start in range(0, len(prompts), batch_size):
        part = list(range(start, min(start + batch_size, len(prompts))))
        ids = encode_batch(tok, [LABEL_PROMPT.replace("{question}", prompts[i].strip()) for i in part])
        fit = [(i, x) for i, x in zip(part, ids) if len(x) <= limit]
        if fit:
            batch = generate(model, [x for _, x in fit], n=1, max_new_tokens=max_new_tokens, greedy=True,
                             stop_token_ids=[tok.eos_token_id], stop_strings=["]", "\n"], tokenizer=tok,
                             decode_kernel=decode_kernel)
            for (i, _), resp in zip(fit, batch.response_ids):
                out[i] = tok.decode(resp, skip_special_tokens=True)
        bar.update(len(part))
    return out


def label_lengths(argv: list[str]) -> int:
    import torch

    from lwz.distributed import all_gather_objects, init_distributed, shutdown_distributed
    from lwz.metrics import Progress
    from lwz.model import Transformer
    from lwz.tokenizer import load_tokenizer

    p = _parser("label-lengths", "Label every prompt's target word range with a local model.",
                "tokenizer folder (default: the model folder)")
    p.add_argument("--model", metavar="PATH", required=True, help="local HF model folder (config.json + safetensors)")
    p.add_argument("--in", dest="inp", metavar="PATH", required=True, help="prompt JSONL (the trainer's format)")
    p.add_argument("--out", metavar="PATH", required=True, help="labelled JSONL (written atomically)")
    p.add_argument("--relabel", action="store_true", help="label records that already have a length_range too")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="prompts per batched generation")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens the model may write per answer")
    args, overrides = p.parse_known_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise DataError("--batch-size and --max-new-tokens must be >= 1")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise DataError(f"--model {args.model}: no config.json there (expected a local HF model folder)")
    check_output(args.out, args.inp)
    if args.tokenizer is None:
        args.tokenizer = args.model
    cfg = _load_cfg(args, overrides)
    max_words, default = cfg.rewards.length_max_words, tuple(cfg.rewards.default_length_range)
    objs, prompts, todo = [], [], []
    for lineno, obj in iter_jsonl(args.inp, DataError, "prompt file"):
        prompt, rng = parse_prompt_line(obj, f"{args.inp}:{lineno}")
        if rng is None or args.relabel:
            todo.append(len(objs))
        objs.append(obj)
        prompts.append(prompt)
    if not objs:
        raise DataError(f"{args.inp}: no prompts in file")
    tok = load_tokenizer(cfg.tokenizer.path)

    d = init_distributed()
    ok = False
    try:
        dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32
        model = Transformer.from_pretrained(args.model, dtype=dtype, device=d.device).eval()
        mine = todo[d.rank::d.world]
        bar = Progress(len(mine), "labelling", stream=None if d.is_main else io.StringIO())  # rank 0 draws
        answers = _label_answers(model, tok, [prompts[i] for i in mine], args.batch_size, args.max_new_tokens, bar,
                                 cfg.rollout.decode_kernel)
        bar.close()
        got = {}
        for part in all_gather_objects(dict(zip(mine, answers)), d.world):
            got.update(part)
        if d.is_main:
            counts = {"given": 0, "model": 0, "parser": 0, "default": 0}
            unfit = sum(a is None for a in got.values())
            rows = []
            for i, obj in enumerate(objs):
                if i in got:
                    rng, src = choose_range(got[i], prompts[i], max_words, default)
                    obj = {**obj, "length_range": list(rng), "length_source": src}
                else:
                    obj = {"length_source": "given", **obj}
                    src = "given"
                counts[src] += 1
                rows.append(obj)
            n = write_jsonl_atomic(args.out, rows)
            print(f"label-lengths: {n} records written to {args.out}: {counts['given']} kept their length_range, "
                  f"{counts['model']} labelled by the model, {counts['parser']} by the prompt's own request, "
                  f"{counts['default']} by the default {list(default)}"
                  f"{f' ({unfit} did not fit the model context)' if unfit else ''}", flush=True)
        ok = True
    finally:  # a failed rank does not wait at a barrier its peers may never reach
        shutdown_distributed(sync=ok)
    return 0


# --------------------------------------------------------------------------------------------
# tokenize

TOKENIZE_KINDS = (".jsonl", ".parquet", ".txt")


def expand_inputs(patterns: list[str]) -> list[str]:
    """The files of --in patterns (globs expanded, sorted, each file once, in pattern order)."""
    import glob

    out = []
    for pat in patterns:
        hits = sorted(glob.glob(pat, recursive=True)) if glob.has_magic(pat) else [pat]
        hits = [h for h in hits if os.path.isfile(h)]
        if not hits:
            raise DataError(f"--in {pat}: {'no file matches' if glob.has_magic(pat) else 'file not found'}")
        for h in hits:
            if not h.endswith(TOKENIZE_KINDS):
                raise DataError(f"--in {h}: expected a {', '.join(TOKENIZE_KINDS)} file")
            if os.path.realpath(h) not in map(os.path.realpath, out):
                out.append(h)
    return out


def _documents(path: str, text_field: str, txt_docs: str, bad: list, progress):
    """Texts of the documents of one input file (bad records appended to `bad` as file:line lines)."""
    if path.endswith(".txt"):
        with open(path, "rb") as f:
            raw = f.read()
        progress.update(len(raw))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.append(f"{path}: not valid UTF-8 (byte {e.start})")
            return
        if txt_docs == "file":
            yield text
        else:
            yield from re.split(r"\n\s*\n", text)
        return
    if path.endswith(".parquet"):
        pf = _open_parquet(path)
        size, rows = os.path.getsize(path), max(pf.metadata.num_rows, 1)
        for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
            for row, text in enumerate(batch.column(0).to_pylist()):
                if isinstance(text, str):
                    yield text
                else:
                    bad.append(f"{path}: a row's {text_field!r} is {type(text).__name__}, not a string")
            progress.update(size * batch.num_rows // rows)
        return
    for line, obj, err in _jsonl_rows(path, progress):
        if err is None and not (isinstance(obj, dict) and isinstance(obj.get(text_field), str)):
            err = f"no string field {text_field!r}"
        if err is not None:
            bad.append(f"{path}:{line}: {err}")
            continue
        yield obj[text_field]


def tokenize(argv: list[str]) -> int:
    import shutil
    import time

    import numpy as np

    from lwz import corpus as C
    from lwz.checkpoint import file_identity
    from lwz.metrics import Progress
    from lwz.tokenizer import encode_batch, load_tokenizer

    p = argparse.ArgumentParser(prog="python -m lwz.data tokenize",
                                description="Tokenise a pretraining corpus into uint32 token shards + a document index.")
    p.error = lambda msg: (_ for _ in ()).throw(DataError(f"tokenize: {msg} (see --help)"))
    p.add_argument("--in", dest="inp", metavar="PATH", action="append", required=True,
                   help=".jsonl / .parquet / .txt files or globs (repeatable; quote globs)")
    p.add_argument("--out", metavar="DIR", required=True, help="token folder to create")
    p.add_argument("--tokenizer", metavar="PATH", required=True, help="local HF tokenizer folder")
    p.add_argument("--text-field", default="text", help="document text field of .jsonl / column of .parquet")
    p.add_argument("--txt-docs", choices=("file", "blank-line"), default="file",
                   help=".txt: the whole file is one document, or each blank-line-separated block")
    p.add_argument("--shard-tokens", type=int, default=1 << 28, metavar="N", help="tokens per shard file at most")
    p.add_argument("--batch-docs", type=int, default=512, metavar="N", help="documents encoded per batch")
    args = p.parse_args(argv)
    if args.shard_tokens < 1 or args.batch_docs < 1:
        raise DataError("tokenize: --shard-tokens and --batch-docs must be >= 1")
    files = expand_inputs(args.inp)
    for f in files:
        check_output(args.out, f)
        if f.endswith(".parquet"):
            names = _open_parquet(f).schema_arrow.names
            if args.text_field not in names:
                raise DataError(f"--in {f}: no column {args.text_field!r} (columns: {', '.join(names)}); "
                                f"pass --text-field")
    tok = load_tokenizer(args.tokenizer)
    identity = dict(inputs=[file_identity(os.path.realpath(f)) for f in files],
                    tokenizer=C.tokenizer_identity(args.tokenizer), text_field=args.text_field,
                    txt_docs=args.txt_docs)
    out = args.out.rstrip("/") or "/"
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise DataError(f"--out {out} is a file; give a folder path")
        meta = C.read_meta(out)
        if meta is None and os.listdir(out):
            raise DataError(f"--out {out} is a non-empty folder that holds no token corpus; choose another --out")
        if meta is not None:
            if meta.get("identity") != identity:
                what = [k for k in identity if meta.get("identity", {}).get(k) != identity[k]]
                raise DataError(f"--out {out} holds a different corpus (its {', '.join(what)} differ); "
                                f"choose another --out or remove that folder")
            print(f"tokenize: {out} is up to date ({meta['num_documents']} documents, {meta['num_tokens']} tokens)")
            return 0
    eos = int(tok.eos_token_id)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    t0 = time.time()
    try:
        writer = C.ShardWriter(tmp, args.shard_tokens)
        bad, empty, n_docs = [], 0, 0
        max_id = -1
        bar = Progress(sum(os.path.getsize(f) for f in files), "tokenizing")

        def flush(texts):
            nonlocal max_id
            for ids in encode_batch(tok, texts):
                a = np.asarray(ids + [eos], dtype=np.int64)
                max_id = max(max_id, int(a.max()))
                writer.add(a)

        for f in files:
            texts = []
            for text in _documents(f, args.text_field, args.txt_docs, bad, bar):
                if not text.strip():
                    empty += 1
                    continue
                texts.append(text)
                n_docs += 1
                if len(texts) == args.batch_docs:
                    flush(texts)
                    texts = []
            flush(texts)
        bar.close()
        index = writer.close()
        if not n_docs:
            raise DataError(f"tokenize: no documents in {', '.join(files)}; {out} was not written")
        if max_id >= 2 ** 32:
            raise DataError(f"tokenize: token id {max_id} does not fit uint32")
        meta = dict(format=C.FORMAT, version=C.VERSION, identity=identity, tokenizer_path=args.tokenizer,
                    eos_token_id=eos, vocab_size=len(tok), max_token_id=max_id, num_documents=int(len(index)),
                    num_tokens=int(index[:, 2].sum()), shards=[C.shard_name(k) for k in range(len(writer.shards))],
                    shard_tokens=writer.shards, skipped_empty=empty, skipped_bad=len(bad))
        with open(os.path.join(tmp, C.META), "w") as fh:
            json.dump(meta, fh, indent=1)
        try:
            if os.path.isdir(out):  # an empty folder (checked above)
                os.rmdir(out)
            os.replace(tmp, out)
        except OSError as e:  # another run filled --out meanwhile: keep its folder, drop ours
            raise DataError(f"--out {out} was written by another process while tokenizing ({e.strerror}); "
                            f"it was left as it is") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"tokenize: {n_docs} documents, {meta['num_tokens']} tokens in {len(writer.shards)} shard(s) -> {out} "
          f"({time.time() - t0:.1f}s)")
    if empty:
        print(f"  empty documents skipped: {empty}")
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        print(f"  bad records skipped: {len(bad)} ({shown})")
    return 0


# --------------------------------------------------------------------------------------------

COMMANDS = {"prepare": prepare, "label-lengths": label_lengths, "tokenize": tokenize}


def main(argv: Optional[list[str]] = None) -> int:
    from lwz.corpus import CorpusError
    from lwz.model import ModelLoadError
    from lwz.tokenizer import TokenizerError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        got = f"unknown command {argv[0]!r}" if argv and not argv[0].startswith("-") else "no command"
        print(f"error: {got}; usage: python -m lwz.data {{{'|'.join(COMMANDS)}}} --help", file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (DataError, ConfigError, PromptDataError, TokenizerError, ModelLoadError, CorpusError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
