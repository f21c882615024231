"""Writing a TwinQuant checkpoint folder: all or nothing.

The tensors arrive in groups (one decoder block at a time), are written into safetensors shards
of at most `SHARD_BYTES`, and the folder is filled beside the output as a hidden temporary
folder, validated against the format (`vllm_twinquant.format.validate_checkpoint`) and renamed
into place only then, so an interrupted or refused run never leaves a loadable half checkpoint.
Every file is world-readable (0644), so a serving user other than the writer can load it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable

import torch

from vllm_twinquant import format as fmt

SHARD_BYTES = 2 << 30
_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
              torch.int32: "I32", torch.int8: "I8", torch.int64: "I64", torch.uint8: "U8", torch.bool: "BOOL"}


def _nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty(0, dtype=dtype).element_size()


class _Group:
    """Tensors to write: a dict in memory, or a safetensors file read only when its turn comes."""

    def __init__(self, item):
        self.item = item
        if isinstance(item, dict):
            self.meta = {k: (tuple(t.shape), t.dtype) for k, t in item.items()}
        else:
            self.meta = {k: (shape, dtype) for k, (_, shape, dtype) in fmt.checkpoint_tensors_of_file(item).items()}

    def tensors(self) -> dict[str, torch.Tensor]:
        if isinstance(self.item, dict):
            return self.item
        from safetensors.torch import load_file

        return load_file(self.item)


def _write_streaming(path: str, groups: list[_Group], names: list[str], metadata: dict) -> None:
    """One safetensors file holding `names`, written group by group (one group in memory at a time)."""
    wanted = set(names)
    header, offset = {"__metadata__": metadata}, 0
    for g in groups:
        for name, (shape, dtype) in g.meta.items():
            if name in wanted:
                n = _nbytes(shape, dtype)
                header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
                offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for g in groups:
            if not wanted.intersection(g.meta):
                continue
            tensors = g.tensors()
            for name in g.meta:
                if name in wanted:
                    t = tensors[name].detach().to("cpu").contiguous()
                    f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            del tensors


def write_checkpoint(output_dir: str, groups: Iterable, config: dict, files_from: str | None = None,
                     readme: str | None = None) -> None:
    """Write `groups` (dicts of tensors, or paths of safetensors files, e.g. one per block),
    `config` (config.json, with quantization_config) and, from the folder `files_from`, the
    tokenizer and other small files; validate; rename into place. At most one group is in memory."""
    if os.path.exists(output_dir):
        raise FileExistsError(f"{output_dir} already exists; remove it or choose another folder")
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".twinquant-partial-", dir=parent)
    meta = {"format": "pt", "quant_method": fmt.QUANT_METHOD, "format_version": str(fmt.FORMAT_VERSION)}
    try:
        groups = [_Group(g) for g in groups]
        shards: list[list[str]] = [[]]
        size = total = 0
        seen: set[str] = set()
        for g in groups:
            for name, (shape, dtype) in g.meta.items():
                if name in seen:
                    raise ValueError(f"tensor {name} is written twice")
                seen.add(name)
                n = _nbytes(shape, dtype)
                if shards[-1] and size + n > SHARD_BYTES:
                    shards.append([])
                    size = 0
                shards[-1].append(name)
                size += n
                total += n
        if len(shards) == 1:
            _write_streaming(os.path.join(tmp, "model.safetensors"), groups, shards[0], meta)
        else:
            index = {"metadata": {"total_size": total}, "weight_map": {}}
            for j, names in enumerate(shards):
                fn = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
                _write_streaming(os.path.join(tmp, fn), groups, names, meta)
                index["weight_map"].update(dict.fromkeys(names, fn))
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        if files_from and os.path.isdir(files_from):
            skip = ("config.json", "model.safetensors.index.json", "README.md")
            for fn in os.listdir(files_from):
                src = os.path.join(files_from, fn)
                if (os.path.isfile(src) and fn not in skip and not fn.startswith(".")
                        and not fn.endswith((".safetensors", ".bin", ".pt", ".pth", ".gguf"))):
                    shutil.copy2(src, os.path.join(tmp, fn))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        if readme is not None:
            with open(os.path.join(tmp, "README.md"), "w") as f:
                f.write(readme)
        for fn in os.listdir(tmp):
            os.chmod(os.path.join(tmp, fn), 0o644)
        os.chmod(tmp, 0o755)
        fmt.validate_checkpoint(tmp)
        os.replace(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_tensors(ckpt: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (all shards)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for fn in sorted(os.listdir(ckpt)):
        if fn.endswith(".safetensors"):
            out.update(load_file(os.path.join(ckpt, fn)))
    return out
