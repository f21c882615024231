"""What keeps quantize() from writing a wrong checkpoint, and how it behaves on long runs: the
per-block exactness check of the transforms, the end-to-end check against the dense model,
resuming an interrupted run, the memory it holds, and errors found before any work is done."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO, save_family_model, small_recipe
from safetensors.torch import load_file

from offline_quantizer import CheckpointRefused, TransformNotExact, quantize
from offline_quantizer import pipeline as P
from offline_quantizer import transforms as tf
from offline_quantizer.pipeline import work_dir_for

TWINQUANT = small_recipe({"rotation": {"kind": "learned", "steps": 2}}, {"smoothing": {"steps": 5}},
                         {"block_tuning": {"epochs": 1}}, nsamples=8, seqlen=48)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return save_family_model("gemma3", tmp_path_factory.mktemp("g3") / "dense")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_family_model("llama", tmp_path_factory.mktemp("ll") / "dense")


def _fold_ignoring_the_offset(block, family):
    """Norm folding as it was written for Llama alone: the weight is taken for the scale and set
    to 1, which on Gemma (scale 1 + w) doubles every normalised input."""
    for group in family.pre_norms:
        norm = block.get_submodule(group.norm)
        for name in group.readers:
            lin = block.get_submodule(name)
            lin.weight.data = lin.weight.data * norm.weight.data[None, :]
        norm.weight.data.fill_(1.0)


def test_a_transform_that_does_not_fold_exactly_stops_the_run_naming_it(gemma3, tmp_path, monkeypatch):
    """The Gemma-3 failure mode (a norm fold that ignores 1 + w) is caught at the first block,
    before anything is quantized; nothing is written and no work folder is left behind."""
    monkeypatch.setattr(tf, "fold_block_norms", _fold_ignoring_the_offset)
    out = str(tmp_path / "out")
    with pytest.raises(TransformNotExact, match=r"model\.layers\.0: norm folding changed what the block computes"):
        quantize(gemma3, TWINQUANT, "random", out, device="cpu")
    assert not os.path.exists(out) and not os.path.exists(work_dir_for(out))


def test_a_checkpoint_beyond_the_kl_bound_is_refused_and_can_be_written_on_request(llama, tmp_path):
    """max_kl below what 4 bits cost: refused with the KL, the worst block and its transforms
    named, the output not created; the finished blocks stay, and the same call with max_kl=None
    writes them without quantizing again."""
    out = str(tmp_path / "out")
    with pytest.raises(CheckpointRefused) as err:
        quantize(llama, TWINQUANT, "random", out, device="cpu", max_kl=1e-9)
    msg = str(err.value)
    assert "mean next-token KL" in msg and "Largest block error: model.layers." in msg
    assert "norm folding, rotation, smoothing, block tuning, quantization" in msg
    assert not os.path.exists(out) and os.path.isdir(work_dir_for(out))
    refused = err.value.result
    result = quantize(llama, TWINQUANT, "random", out, device="cpu", max_kl=None)
    assert result.resumed_at_block == 2 and os.path.isdir(out) and not os.path.exists(work_dir_for(out))
    assert result.check.mean_kl == refused.check.mean_kl
    meta = json.load(open(os.path.join(out, "config.json")))["quantization_config"]["metadata"]
    assert meta["end_to_end_check"]["mean_kl"] == round(result.check.mean_kl, 6)  # stored to 6 places
    assert meta["end_to_end_check"]["max_kl_bound"] is None
    card = open(os.path.join(out, "README.md")).read()
    assert "vllm serve" in card and f"{result.check.mean_kl:.4f}" in card


def test_non_finite_logits_are_refused_whatever_the_bound(llama, tmp_path, monkeypatch):
    class Overflowing(P.ServedLinear):
        def forward(self, x):
            return super().forward(x) * float("inf")

    monkeypatch.setattr(P, "ServedLinear", Overflowing)
    out = str(tmp_path / "out")
    with pytest.raises(CheckpointRefused, match="non-finite logits"):
        quantize(llama, small_recipe(rank=0, nsamples=4, seqlen=32), "random", out, device="cpu", max_kl=None)
    assert not os.path.exists(out)


def test_an_interrupted_run_resumes_at_the_next_block_and_writes_the_same_checkpoint(llama, tmp_path, monkeypatch):
    reference = str(tmp_path / "uninterrupted")
    quantize(llama, TWINQUANT, "random", reference, device="cpu")

    out = str(tmp_path / "out")
    original = P._quantize_block

    def interrupted(run, skeleton, i, *args):
        if i == 1:
            raise KeyboardInterrupt
        return original(run, skeleton, i, *args)

    monkeypatch.setattr(P, "_quantize_block", interrupted)
    with pytest.raises(KeyboardInterrupt, match="the same call resumes"):
        quantize(llama, TWINQUANT, "random", out, device="cpu")
    assert not os.path.exists(out)
    assert sorted(os.listdir(os.path.join(work_dir_for(out), "blocks"))) == ["block-00000.safetensors"]
    monkeypatch.setattr(P, "_quantize_block", original)
    with pytest.raises(FileExistsError, match="cannot be resumed"):  # another recipe must not pick it up
        quantize(llama, small_recipe(rank=0), "random", out, device="cpu")
    result = quantize(llama, TWINQUANT, "random", out, device="cpu")
    assert result.resumed_at_block == 1
    a = load_file(os.path.join(reference, "model.safetensors"))
    b = load_file(os.path.join(out, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_group_size_that_does_not_fit_fails_before_any_weight_is_read(tokenizer_dir, tmp_path):
    """SmolLM2's 576-wide layers and the default group of 128: the error names a layer and the
    group size that would fit, and comes from the config alone (no work folder is made)."""
    from vllm_twinquant.format import TwinQuantFormatError

    out = str(tmp_path / "out")
    with pytest.raises(TwinQuantFormatError, match=r"q_proj: group_size 128 does not divide its in_features 576 "
                                                    r"\(group size 64 divides every layer"):
        quantize(tokenizer_dir, "gptq", "random", out, device="cpu")
    assert not os.path.exists(work_dir_for(out))


def test_the_python_api_takes_a_loaded_model_and_a_list_of_texts(tokenizer_dir, tmp_path):
    """quantize(model, recipe, texts, output) with a PreTrainedModel and its tokenizer: the same
    kind of checkpoint as from a folder, calibrated on the texts (framed as the tokenizer frames
    them); the model passed in is left as it was."""
    from conftest import tiny_family_model
    from transformers import AutoTokenizer

    model = tiny_family_model("llama")
    model.config.vocab_size = 512
    before = {k: v.clone() for k, v in model.state_dict().items()}
    texts = [f"Document {i}: the mill by the river turned {i} times before noon." for i in range(60)]
    out = str(tmp_path / "out")
    result = quantize(model, small_recipe(rank=4, nsamples=4, seqlen=16, heldout=1), texts, out, device="cpu",
                      tokenizer=_small_vocab_tokenizer(AutoTokenizer.from_pretrained(tokenizer_dir)))
    assert result.check.windows == 1 and os.path.isfile(os.path.join(out, "model.safetensors"))
    meta = json.load(open(os.path.join(out, "config.json")))["quantization_config"]["metadata"]
    assert meta["calibration"]["data"] == "60 texts"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _small_vocab_tokenizer(tok):
    """SmolLM2's tokenizer with ids folded into a 512-token vocabulary (the tiny model's)."""
    class Folded:
        eos_token_id = 2

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [3 + i % 509 for i in tok(text, add_special_tokens=add_special_tokens)["input_ids"]]}

    return Folded()


MAKE_SCRIPT = textwrap.dedent("""
    import sys, torch, transformers as T
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=4096, num_hidden_layers=int(sys.argv[1]),
                        num_attention_heads=8, num_key_value_heads=8, head_dim=128)
    T.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(sys.argv[2] + "/dense")
""")
MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from offline_quantizer import quantize, recipe as rcp
    folder = sys.argv[1]
    r = rcp.recipe_from_dict({"name": "mem",
                              "calibration": {"nsamples": 4, "seqlen": 64, "batch_size": 4, "heldout": 1},
                              "stages": [{"split": {"rank": 16}}, {"residual": {"method": "rtn", "group_size": 128}}]})
    quantize(folder + "/dense", r, "random", folder + "/tq", device="cpu")
    print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def test_memory_holds_about_one_block_whatever_the_number_of_blocks(tmp_path):
    """Peak RSS of quantizing a Llama of 1024-wide blocks (33.6 MB each in bf16, 67 MB in fp32) with
    2 and with 10 blocks: the eight more blocks (268 MB in bf16) add less than three quarters of
    that (holding the model whole, as transformers loads it, would add all of it; what is added is
    the allocator's fragmentation, which levels off after a few blocks: +140 MB measured here)."""
    peaks = {}
    for n in (2, 10):
        folder = tmp_path / f"m{n}"
        folder.mkdir()
        subprocess.run([sys.executable, "-c", MAKE_SCRIPT, str(n), str(folder)], check=True, cwd=REPO, timeout=900)
        proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(folder)], capture_output=True, text=True,
                              cwd=REPO, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        peaks[n] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]
    per_block_mib = (4 * 1024 * 1024 + 3 * 1024 * 4096) * 2 / 2**20
    assert peaks[10] - peaks[2] < 0.75 * 8 * per_block_mib, peaks
