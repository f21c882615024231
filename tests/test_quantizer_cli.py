"""Recipes as data and the `twinquant-quantize` command line: presets load, bad recipes are
named errors, the command line is a thin wrapper that prints errors without a traceback."""

import json
import os
import stat
import subprocess
import sys

import pytest
import yaml

from offline_quantizer import recipe as rcp
from offline_quantizer.cli import main as cli


def test_every_preset_is_a_valid_recipe_with_a_description():
    names = rcp.presets()
    assert {"rtn", "gptq", "svd-split", "twinquant-fast", "twinquant-w4a16", "twinquant-w4a16-e2e",
            "twinquant-w4a4-resq"} <= set(names)
    for name in names:
        r = rcp.load_recipe(name)
        assert r.name == name and r.description
        assert rcp.recipe_from_dict(yaml.safe_load(yaml.safe_dump(r.to_dict()))).to_dict() == r.to_dict()


@pytest.mark.parametrize(
    "data,match",
    [
        (
            {"stages": [{"residual": {"group_size": 100}}]},
            r"stage 'residual': group_size = 100; expected one of \[32, 64",
        ),
        ({"stages": [{"residual": {"gruop_size": 64}}]}, r"stage 'residual': unknown key\(s\) \['gruop_size'\]"),
        ({"stages": [{"split": {"rank": 4}}]}, "no 'residual' stage"),
        ({"stages": [{"residual": {}}, {"rotation": {}}]}, "out of order"),
        ({"stages": [{"residual": {"group_size": "64"}}]}, r"group_size = '64'; expected int"),
        ({"stages": [{"rotate": {}}]}, r"stage 0 is 'rotate'; stages are \['rotation'"),
        ({"stages": [{"activations": {"bits": 4, "subspace": 64}}, {"residual": {}}]}, "needs a 'rotation' stage"),
        ({"stages": [{"split": {"rank": -1}}, {"residual": {}}]}, r"stage 'split': rank = -1; expected a value >= 0"),
        (
            {"calibration": {"nsample": 3}, "stages": [{"residual": {}}]},
            r"stage 'calibration': unknown key\(s\) \['nsample'\]",
        ),
        (
            {"stages": [{"residual": {}}, {"end_to_end": {"rounds": [{"lrs": [], "lr_from_previous": True}]}}]},
            "round 0: give either lrs or lr_from_previous",
        ),
    ],
)
def test_a_bad_recipe_is_an_error_naming_the_stage_and_key(data, match):
    with pytest.raises(rcp.RecipeError, match=match):
        rcp.recipe_from_dict(data)


def test_overrides_change_one_value_and_add_a_missing_stage():
    base = rcp.load_recipe("gptq")
    r = rcp.with_overrides(base, {"split.rank": 8, "calibration.nsamples": 16, "residual.group_size": 64})
    assert r.rank == 8 and r.calibration.nsamples == 16 and r.get(rcp.Residual).group_size == 64
    assert [rcp.stage_name(s) for s in r.stages] == ["split", "residual"]
    assert base.rank == 0  # the preset itself is untouched
    with pytest.raises(rcp.RecipeError, match="expected STAGE.KEY=VALUE"):
        rcp.with_overrides(base, {"rank": 8})


def test_the_command_line_prints_the_recipe_it_would_run(capsys):
    cli(["--recipe", "twinquant-w4a16", "--rank", "8", "--set", "rotation.steps=5", "--print-recipe"])
    printed = yaml.safe_load(capsys.readouterr().out)
    r = rcp.recipe_from_dict(printed)
    assert r.rank == 8 and r.get(rcp.Rotation).steps == 5 and r.name == "twinquant-w4a16"
    cli(["--list-recipes"])
    listed = capsys.readouterr().out
    assert all(name in listed for name in rcp.presets())


def test_the_accuracy_table_script_runs_valid_recipes_one_per_row():
    """benchmarks/accuracy/smollm2_table.sh --recipes prints the recipe of every quantized row through
    twinquant-quantize --print-recipe: an unknown flag or override fails it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "accuracy", "smollm2_table.sh")
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    proc = subprocess.run(["bash", script, "--recipes"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split(maxsplit=2)[1] for line in open(script) if line.startswith("q ")]
    docs = proc.stdout.split("--- # ")[1:]
    assert [d.split("\n", 1)[0] for d in docs] == rows and len(rows) > 20
    recipes = {d.split("\n", 1)[0]: rcp.recipe_from_dict(yaml.safe_load(d.split("\n", 1)[1])) for d in docs}
    assert recipes["tq-attn-tune4-r4-g64-c128"].to_dict()["stages"] == rcp.load_recipe("twinquant-w4a16").to_dict()[
        "stages"]
    assert {type(s).__name__ for s in recipes["twinquant-r4-g64"].stages} >= {"Rotation", "Smoothing", "Split"}


def test_every_option_says_what_it_does_and_its_default(capsys):
    with pytest.raises(SystemExit):
        cli(["--help"])
    text = capsys.readouterr().out
    for opt in ("--model", "--output", "--calib", "--recipe", "--rank", "--group-size", "--set", "--device",
                "--seed", "--max-kl", "--no-resume"):
        assert opt in text
    assert "(default: twinquant-w4a16" in text and "(required)" in text and "(default: 1.0" in text


def test_the_command_line_reports_errors_in_one_line(tokenizer_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["--model", tokenizer_dir, "--output", str(tmp_path / "o")])
    assert e.value.code == 2 and "the following arguments are required: --calib" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli(["--model", tokenizer_dir, "--output", str(tmp_path / "o"), "--calib", "random", "--recipe", "gptq"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: model.layers.0.self_attn.q_proj: group_size 128")
    assert "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        cli(["--model", tokenizer_dir, "--output", str(tmp_path / "o"), "--calib", "random", "--recipe", "nope"])
    assert "no such file and no such preset" in capsys.readouterr().err


def test_the_command_writes_a_world_readable_checkpoint_from_a_recipe_file(tiny_dense, tmp_path):
    """twinquant-quantize as installed, with a YAML recipe: the summary is printed, every file of
    the checkpoint is readable by other users, and the recipe is recorded in it."""
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(yaml.safe_dump({"name": "mine", "calibration": {"nsamples": 4, "seqlen": 32, "heldout": 1},
                                      "stages": [{"split": {"rank": 4}}, {"residual": {"group_size": 64}}]}))
    out = tmp_path / "ckpt"
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "twinquant-quantize"), "--model", tiny_dense,
                           "--output", str(out), "--calib", "random", "--recipe", str(recipe), "--device", "cpu"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["recipe"] == "mine" and summary["check"]["finite"]
    for fn in os.listdir(out):
        assert stat.S_IMODE(os.stat(out / fn).st_mode) == 0o644, fn
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    cfg = json.load(open(out / "config.json"))
    assert cfg["quantization_config"]["metadata"]["recipe"]["name"] == "mine"
