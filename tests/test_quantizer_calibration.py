"""Windows of text as the model's tokenizer frames them: the special prefix (BOS) is found from
the tokenizer itself, calibration and held-out windows come from disjoint documents, and
twinquant-eval's perplexity through vLLM equals transformers' on the same BOS-framed windows."""

import json
import os

import pytest
import torch

from offline_quantizer.calibration import CalibrationError, eval_windows, make_windows, special_prefix

DOCS = [f"Article {i}. The harbour of town {i} kept {i % 7} boats and a lighthouse painted {c}."
        for i, c in enumerate(["red", "white", "blue", "green"] * 30)]


@pytest.fixture(scope="module")
def bos_tokenizer_dir(tokenizer_dir, tmp_path_factory):
    """SmolLM2's tokenizer made to put its BOS token (id 1) before every text, as Llama-3's and
    Gemma's tokenizers do."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    bos = tok.convert_ids_to_tokens(1)
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 1)])
    out = tmp_path_factory.mktemp("bos-tok")
    tok.save_pretrained(out)
    return str(out)


def test_the_special_prefix_is_what_the_tokenizer_puts_before_a_text(tokenizer_dir, bos_tokenizer_dir):
    from transformers import AutoTokenizer

    assert special_prefix(AutoTokenizer.from_pretrained(tokenizer_dir)) == []
    assert special_prefix(AutoTokenizer.from_pretrained(bos_tokenizer_dir)) == [1]


def test_calibration_windows_start_with_bos_and_held_out_text_is_never_calibrated_on(bos_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bos_tokenizer_dir)
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    w = make_windows(str(path), tok, nsamples=6, seqlen=24, heldout=3, seed=0)
    assert w.prefix == 1 and w.calib.shape == (6, 24) and w.heldout.shape == (3, 24)
    assert bool((w.calib[:, 0] == 1).all()) and bool((w.heldout[:, 0] == 1).all())
    assert not bool((w.calib[:, 1:] == 1).any())  # BOS only where the tokenizer would put it
    calib_text = {tuple(r[i : i + 12].tolist()) for r in w.calib[:, 1:] for i in range(0, 12)}
    held_text = {tuple(r[i : i + 12].tolist()) for r in w.heldout[:, 1:] for i in range(0, 12)}
    assert not calib_text & held_text
    again = make_windows(str(path), tok, nsamples=6, seqlen=24, heldout=3, seed=0)
    assert torch.equal(again.calib, w.calib) and torch.equal(again.heldout, w.heldout)
    with pytest.raises(CalibrationError, match="too little text"):
        make_windows(DOCS[:2], tok, nsamples=2, seqlen=24, heldout=3, seed=0)
    with pytest.raises(CalibrationError, match=r"calib.txt: no such file"):
        make_windows(str(tmp_path / "calib.txt"), tok, 2, 24, 0, 0)


def test_perplexity_through_vllm_equals_transformers_on_bos_framed_windows(bos_tokenizer_dir, tmp_path, capsys):
    """twinquant-eval on a dense tiny Llama whose tokenizer adds BOS: every window starts with it,
    the BOS itself is not scored, and the result is transformers' perplexity of the same windows."""
    from conftest import save_family_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offline_quantizer.evaluate import main as eval_main

    dense = save_family_model("llama", tmp_path / "dense", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(bos_tokenizer_dir)
    tok.save_pretrained(dense)
    evalf = tmp_path / "eval.jsonl"
    evalf.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:40]))
    # the tiny model's vocabulary is 512 ids: keep the windows inside it
    windows, prefix = eval_windows(tok, str(evalf), 32, 3)
    assert prefix == 1 and all(w[0] == 1 and len(w) == 32 for w in windows)
    assert max(max(w) for w in windows) < 49152

    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    model.resize_token_embeddings(49152)
    model.save_pretrained(dense)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            lp = torch.log_softmax(model(input_ids=torch.tensor([w])).logits[0].double(), -1)
            nll -= float(lp[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum())
            n += len(w) - 1
    want = float(torch.exp(torch.tensor(nll / n)))
    eval_main([dense, "--eval", str(evalf), "--seqlen", "32", "--max-windows", "3"])
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["tokens"] == n and got["special_prefix_tokens"] == 1
    assert got["ppl"] == pytest.approx(want, rel=1e-3)
    assert os.path.basename(str(evalf)) == got["eval_file"]


def test_prepare_refuses_a_tokenizer_whose_special_tokens_are_not_the_ones_the_gguf_config_names(tokenizer_dir):
    """The EOS joins the articles of every calibration and evaluation window: a transformers release that
    converts the GGUF's tokenizer with another EOS than the model's config (5.17: <|im_start|>) changes every
    window, and perplexities with it, so twinquant-prepare refuses it and names both."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from offline_quantizer.prepare import check_special_tokens

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=2, unk_token_id=0)
    check_special_tokens(tok, config)  # the prepared model's tokenizer agrees with SmolLM2's config
    tok.eos_token = "<|im_start|>"
    with pytest.raises(ValueError, match=r"eos '<\|im_start\|>' \(id 1\), the config says id 2 \('<\|im_end\|>'\)"):
        check_special_tokens(tok, config)
