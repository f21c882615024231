"""README's CPU commands, run as written: quantize (CLI and Python), serve and ask, evaluate, benchmark.

The commands are read from README.md's sections, so the page cannot drift from what works. They run in a
temporary folder that links the repository's `models/` (made by `twinquant-prepare`) and `benchmarks/`; the
only changes made to a command are the port of the server (a free one instead of 8000) and `--limit` on
lm_eval (LM_EVAL_LIMIT articles of the 1,000: the whole task took over 30 minutes on the 2-core CI machine).
Lines marked `# GPU` are left out (no GPU here); the GPU path is checked by `benchmarks/e2e/cuda_plugin_check.py`
on a GPU.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()
BIN = os.path.dirname(sys.executable)
LM_EVAL_LIMIT = 20

pytestmark = [
    pytest.mark.serve,
    pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, "models", "smollm2-135m-instruct")),
                       reason="models/ not prepared (scripts/test.sh runs twinquant-prepare first)"),
]


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end >= 0 else None]


def _commands(title: str) -> list[str]:
    """The shell commands of a section: its 4-space indented lines outside fenced blocks, continuations joined."""
    cmds, cur, fenced = [], "", False
    for line in _section(title).splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if fenced or not line.startswith("    "):
            continue
        cur += line.strip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        cmds.append(cur)
        cur = ""
    return [c for c in cmds if not re.search(r"#\s*GPU\b", c)]


def _python_block(title: str) -> str:
    m = re.search(r"```python\n(.*?)```", _section(title), re.S)
    assert m, f"README section {title!r} has no Python example"
    return m.group(1)


def _env() -> dict:
    return dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""), PYTHONPATH=ROOT)


def _workdir(tmp_path_factory, name):
    d = tmp_path_factory.mktemp(name)
    for link in ("models", "benchmarks"):
        os.symlink(os.path.join(ROOT, link), d / link)
    return d


def _run(cmd: str, cwd, timeout: int = 1800, stdout_only: bool = False) -> str:
    p = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"`{cmd}` failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p.stdout if stdout_only else p.stdout + p.stderr


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory):
    """The Quantize section's commands, run once for the tests below."""
    d = _workdir(tmp_path_factory, "readme-cli")
    outputs = [_run(c, d) for c in _commands("Quantize")]
    return d, outputs


def _checkpoint(d) -> str:
    m = re.search(r"--output (\S+)", _commands("Quantize")[0])
    return os.path.join(d, m.group(1))


def test_the_quantize_commands_write_a_twinquant_checkpoint_and_list_the_presets(cli_dir):
    d, outputs = cli_dir
    cfg = json.load(open(os.path.join(_checkpoint(d), "config.json")))
    assert cfg["quantization_config"]["quant_method"] == "twinquant"
    listed = outputs[1]
    import yaml

    from offline_quantizer import presets
    for name in presets():
        assert name in listed, f"--list-recipes does not show {name}"
    printed = yaml.safe_load(outputs[2][outputs[2].index("name:"):]) if "name:" in outputs[2] else None
    assert printed and printed["name"] == "twinquant-w4a16", outputs[2][:500]


def test_the_python_example_writes_the_same_checkpoint_as_the_cli(cli_dir, tmp_path_factory):
    d, _ = cli_dir
    d2 = _workdir(tmp_path_factory, "readme-python")
    out = _run(f"{sys.executable} - <<'EOF'\n{_python_block('Quantize')}EOF", d2, stdout_only=True)
    path, bits, kl = out.strip().splitlines()[-1].split()
    assert float(bits) > 4 and 0 <= float(kl) < 1.0
    ckpt_cli, ckpt_py = _checkpoint(d), os.path.join(d2, path)
    files = sorted(f for f in os.listdir(ckpt_cli) if f.endswith(".safetensors"))
    assert files == sorted(f for f in os.listdir(ckpt_py) if f.endswith(".safetensors"))
    for f in files:
        a, b = load_file(os.path.join(ckpt_cli, f)), load_file(os.path.join(ckpt_py, f))
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].equal(b[k]), f"{f}:{k} differs between the CLI and the Python API"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_cpu_serve_command_answers_the_chat_request(cli_dir, tmp_path):
    d, _ = cli_dir
    serve, request = [c for c in _commands("Serve") if "vllm serve" in c], _commands("Serve")[-1]
    assert len(serve) == 1 and "# CPU" in serve[0] and request.startswith("curl")
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(["bash", "-c", f"{serve[0].split('#')[0]} --port {port}"], cwd=d, env=_env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 900
        while True:
            assert proc.poll() is None, "vllm serve exited:\n" + open(tmp_path / "serve.log").read()[-4000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, "not up in 15 min:\n" + open(tmp_path / "serve.log").read()[-4000:]
            time.sleep(2)
        reply = json.loads(_run(request.replace("localhost:8000", f"localhost:{port}") + " -sS", d, timeout=300))
        assert reply["choices"][0]["message"]["content"].strip(), reply
        assert "twinquant:" in open(tmp_path / "serve.log").read(), "no kernel line in the server's log"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_the_evaluate_and_benchmark_commands_run_on_the_cpu(cli_dir):
    d, _ = cli_dir
    cmds = _commands("Evaluate and benchmark")
    assert [c.split()[0] for c in cmds] == ["twinquant-eval", "lm_eval", "vllm"]
    out = _run(cmds[0], d)
    ppl = float(re.search(r"\"ppl\": ([0-9.]+)", out).group(1))
    assert 10 < ppl < 40, out[-2000:]
    out = _run(f"{cmds[1]} --limit {LM_EVAL_LIMIT}", d)
    assert re.search(r"word_perplexity\s*\|[^|]*\|\s*[0-9.]+", out), out[-3000:]
    out = _run(cmds[2], d)
    assert re.search(r"Throughput: [0-9.]+ requests/s", out), out[-3000:]
