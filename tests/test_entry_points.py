"""Stock mlx-lm entry points load odmoe folders with no extra flags.

Each runs in a fresh interpreter, as a user would start it.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}


def run(args, timeout=300):
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def console(name):
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} is not installed; install the package with pip first")
    return str(path)


def test_interpreter_start_registers_types_without_importing_mlx():
    out = run(
        [
            sys.executable,
            "-c",
            "import sys; print('mlx' in sys.modules, "
            "any(type(f).__name__ == 'OdmoeModelFinder' for f in sys.meta_path))",
        ]
    )
    assert out.split() == ["False", "True"]


@pytest.mark.parametrize("kind", ["qwen2_moe", "kimi_k2"])
def test_mlx_lm_generate_cli(models, kind):
    out = run(
        [
            console("mlx_lm.generate"),
            "--model",
            str(models(kind, "odmoe")),
            "--prompt",
            "def hello",
            "--max-tokens",
            "8",
            "--temp",
            "0",
        ]
    )
    assert "Generation:" in out and "tokens-per-sec" in out


def test_python_dash_m_mlx_lm_generate(models):
    out = run(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "generate",
            "--model",
            str(models("qwen2_moe", "odmoe_q4")),
            "--prompt",
            "def hello",
            "--max-tokens",
            "8",
        ]
    )
    assert "Generation:" in out


def test_mlx_lm_load_in_fresh_interpreter(models):
    code = (
        "import sys, mlx_lm, mlx_lm_odmoe\n"
        f"model, tok = mlx_lm.load({str(models('kimi_k2', 'odmoe'))!r})\n"
        "print(type(model).__module__)\n"
        "text = mlx_lm.generate(model, tok, prompt='def hello', max_tokens=5)\n"
        "print(mlx_lm_odmoe.stats(model)['hits'] > 0)\n"
    )
    out = run([sys.executable, "-c", code]).split()
    assert out[0] == "mlx_lm_odmoe.models.kimi_k2_odmoe" and out[-1] == "True"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlx_lm_server_serves_a_completion(models, tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [
            console("mlx_lm.server"),
            "--model",
            str(models("qwen2_moe", "odmoe")),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**ENV, "MLX_LM_ODMOE_EXPERT_CACHE": "50%"},
    )
    try:
        body = json.dumps({"prompt": "def hello", "max_tokens": 8, "temperature": 0}).encode()
        deadline = time.time() + 180
        while True:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/completions",
                    data=body,
                    headers={"Content-Type": "application/json"},
                )
                reply = json.loads(urllib.request.urlopen(req, timeout=60).read())
                break
            except (ConnectionError, urllib.error.URLError):
                assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                assert time.time() < deadline, "server did not answer in time"
                time.sleep(0.5)
        assert reply["choices"][0]["text"] is not None
        assert reply["usage"]["completion_tokens"] > 0
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
        log.close()
