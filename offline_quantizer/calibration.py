"""Token windows for calibration, the end-to-end check and perplexity, as the model sees text.

Documents are tokenized without special tokens and joined with EOS. A window then starts with
whatever the tokenizer itself puts before a text (`special_prefix`: Llama-3's
<|begin_of_text|>, Gemma's <bos>; nothing for tokenizers that add nothing, such as SmolLM2's or
Qwen's), so a model trained with a BOS token is measured and calibrated in the regime it was
trained in: each window is prefix + (seqlen - len(prefix)) tokens of the stream, and perplexity
scores the stream's tokens only.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import torch


class CalibrationError(ValueError):
    """Calibration data that cannot give the windows asked for; the message names the source."""


def special_prefix(tokenizer) -> list[int]:
    """The token ids the tokenizer adds before a text (its post-processor / add_bos_token)."""
    probe = "The"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i])
    return []


def read_texts(path: str) -> list[str]:
    """Documents of a .jsonl file ({"text": ...} per line) or a text file (one per line)."""
    if not os.path.exists(path):
        raise CalibrationError(f"{path}: no such file")
    texts = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if path.endswith(".jsonl"):
                try:
                    texts.append(str(json.loads(line)["text"]))
                except (ValueError, KeyError, TypeError):
                    raise CalibrationError(f"{path}, line {n}: expected a JSON object with a 'text' field") from None
            else:
                texts.append(line)
    if not texts:
        raise CalibrationError(f"{path}: no text")
    return texts


def _stream(tokenizer, texts: list[str], need: int) -> list[int]:
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"] + [eos])
        if len(ids) >= need:
            break
    return ids


@dataclass
class Windows:
    calib: torch.Tensor  # [nsamples, seqlen] token ids
    heldout: torch.Tensor  # [heldout, seqlen], from documents the calibration windows never see
    source: str  # what they came from, for the checkpoint's metadata
    prefix: int = 0  # leading special tokens of every window (not scored as predictions)


def make_windows(data, tokenizer, nsamples: int, seqlen: int, heldout: int, seed: int,
                 vocab_size: int | None = None) -> Windows:
    """Calibration and held-out windows from `data`: a .jsonl/.txt path, a list of strings, a
    tensor of token ids [n, seqlen] (the last `heldout` rows are held out), or "random" (uniform
    random token ids, for speed tests; needs vocab_size)."""
    if isinstance(data, str) and data == "random":
        if not vocab_size:
            raise CalibrationError("random calibration needs the model's vocab_size")
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab_size, (nsamples + heldout, seqlen), generator=g)
        return Windows(ids[:nsamples], ids[nsamples:], "random-tokens")
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype not in (torch.int32, torch.int64) or data.shape[0] <= heldout:
            raise CalibrationError(f"calibration tokens: expected an integer tensor [n > {heldout}, seqlen], got "
                                   f"{data.dtype} {list(data.shape)}")
        data = data.long()
        return Windows(data[: data.shape[0] - heldout], data[data.shape[0] - heldout :], "token-tensor")
    if tokenizer is None:
        raise CalibrationError("calibration text needs a tokenizer (pass tokenizer=, or the model as a folder)")
    if isinstance(data, str):
        texts, source = read_texts(data), os.path.basename(data)
    elif isinstance(data, (list, tuple)) and all(isinstance(t, str) for t in data):
        texts, source = list(data), f"{len(data)} texts"
    else:
        raise CalibrationError(f"calibration data {type(data).__name__}: expected a file path, a list of strings, "
                               "a token tensor or 'random'")
    prefix = special_prefix(tokenizer)
    body = seqlen - len(prefix)
    if body < 1:
        raise CalibrationError(f"seqlen {seqlen} leaves no room after the tokenizer's {len(prefix)} leading tokens")
    rng = random.Random(seed)
    texts = texts[:]
    rng.shuffle(texts)
    # held-out windows come from the documents at the end of the shuffled list, calibration from the rest
    held_ids: list[int] = []
    cut = len(texts)
    if heldout:
        while cut > 0 and len(held_ids) < heldout * body + 1:
            cut -= 1
            held_ids = _stream(tokenizer, [texts[cut]], 0) + held_ids
        if len(held_ids) < body or cut == 0:
            raise CalibrationError(f"{source}: too little text for {heldout} held-out windows of {seqlen} tokens and "
                                   "calibration besides; give more text or set calibration.heldout: 0")
    ids = _stream(tokenizer, texts[:cut], nsamples * body * 2)
    if len(ids) < body + 1:
        raise CalibrationError(f"{source}: only {len(ids)} tokens for calibration, need at least {body + 1}")
    stream = torch.tensor(ids)
    starts = [rng.randrange(0, len(ids) - body) for _ in range(nsamples)]
    pre = torch.tensor(prefix, dtype=torch.long)
    calib = torch.stack([torch.cat([pre, stream[s : s + body]]) for s in starts])
    held = torch.tensor(held_ids)
    n_held = min(heldout, len(held_ids) // body)
    heldw = torch.stack([torch.cat([pre, held[i * body : (i + 1) * body]]) for i in range(n_held)]) if n_held else \
        torch.zeros(0, seqlen, dtype=torch.long)
    return Windows(calib, heldw, source, len(prefix))


def eval_windows(tokenizer, path: str, seqlen: int, max_windows: int) -> tuple[list[list[int]], int]:
    """Consecutive windows over the documents of `path` in file order, each starting with the
    tokenizer's special prefix; returns (windows, prefix length)."""
    prefix = special_prefix(tokenizer)
    body = seqlen - len(prefix)
    ids = _stream(tokenizer, read_texts(path), body * max_windows)
    n = min(len(ids) // body, max_windows)
    if n == 0:
        raise CalibrationError(f"{path}: fewer than {body} tokens")
    return [prefix + ids[i * body : (i + 1) * body] for i in range(n)], len(prefix)
