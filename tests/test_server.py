"""mlx_lm.server and mlx_lm_odmoe.server on odmoe models, over real HTTP."""

import shutil
import threading
import time

import pytest
from serving import Server

MIN_BUDGET = {"MLX_LM_ODMOE_EXPERT_CACHE": "min"}


@pytest.fixture(scope="module")
def stock_server(models, tmp_path_factory):
    s = Server(
        "mlx_lm.server",
        models("qwen2_moe", "odmoe"),
        tmp_path_factory.mktemp("srv") / "log",
        env=MIN_BUDGET,
    )
    yield s
    s.stop()


def test_completions_plain_and_streamed(stock_server):
    status, reply = stock_server.post(
        "/v1/completions", {"prompt": "def hello", "max_tokens": 6, "temperature": 0}
    )
    assert status == 200 and reply["usage"]["completion_tokens"] > 0
    events = stock_server.stream(
        "/v1/completions", {"prompt": "def hello", "max_tokens": 6, "temperature": 0}
    )
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0].get("text", "") for e in events[:-1])
    assert text == reply["choices"][0]["text"]  # greedy: same tokens either way


def test_chat_turns_reuse_the_prompt_cache(stock_server):
    messages = [{"role": "user", "content": "def hello(world):"}]
    status, first = stock_server.post(
        "/v1/chat/completions", {"messages": messages, "max_tokens": 6, "temperature": 0}
    )
    assert status == 200
    messages += [first["choices"][0]["message"], {"role": "user", "content": "and again"}]
    status, second = stock_server.post(
        "/v1/chat/completions", {"messages": messages, "max_tokens": 6, "temperature": 0}
    )
    assert status == 200
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_concurrent_clients(stock_server):
    results = []

    def ask(i):
        results.append(
            stock_server.post(
                "/v1/completions", {"prompt": f"x = {i}", "max_tokens": 5, "temperature": 0}
            )
        )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [s for s, _ in results] == [200] * 4


@pytest.fixture()
def odmoe_server(models, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(models("qwen2_moe", "odmoe"), folder)
    s = Server("mlx_lm_odmoe.server", folder, tmp_path / "log", env=MIN_BUDGET)
    s.folder = folder
    yield s
    s.stop()


def test_expert_stats_over_http(odmoe_server):
    status, reply = odmoe_server.post("/v1/completions", {"prompt": "def hello", "max_tokens": 5})
    assert status == 200
    status, stats = odmoe_server.get("/v1/experts/stats")
    assert status == 200
    for key in (
        "budget_bytes",
        "resident_bytes",
        "hits",
        "misses",
        "bytes_read",
        "fetch_latency_p50_ms",
        "fetch_latency_p99_ms",
        "per_layer",
    ):
        assert key in stats
    assert stats["misses"] > 0 and stats["bytes_read"] > 0
    assert stats["per_layer"]["0"]["hit_rate"] is not None
    status, health = odmoe_server.get("/health")
    assert (
        status == 200
        and health["status"] == "ok"
        and health["experts"]["misses"] >= stats["misses"]
    )


def test_a_read_error_fails_one_request_and_the_server_keeps_serving(odmoe_server):
    shard = next((odmoe_server.folder / "experts").glob("experts-*.safetensors"))
    good = shard.read_bytes()
    odmoe_server.post(
        "/v1/completions", {"prompt": "warm", "max_tokens": 2}
    )  # shard opened and checked
    with open(shard, "r+b") as f:  # same inode: the open file is now short
        f.truncate(len(good) // 4)
    try:
        status, reply = odmoe_server.post(
            "/v1/completions", {"prompt": "def broken(x):", "max_tokens": 8}
        )
        assert status == 500 and shard.name in reply["error"]["message"]
        events = odmoe_server.stream(
            "/v1/completions", {"prompt": "class Broken:", "max_tokens": 8}
        )
        assert "error" in events[-2] and events[-1] == "[DONE]"
    finally:
        with open(shard, "r+b") as f:
            f.write(good)
    status, reply = odmoe_server.post(
        "/v1/completions", {"prompt": "def fine(x):", "max_tokens": 5}
    )
    assert status == 200 and reply["usage"]["completion_tokens"] > 0
    assert odmoe_server.get("/health")[0] == 200


@pytest.fixture(scope="module")
def resident_server(models, tmp_path_factory):
    """The default budget: every expert resident, routes counted lazily."""
    s = Server(
        "mlx_lm_odmoe.server", models("qwen2_moe", "odmoe"), tmp_path_factory.mktemp("srv") / "log"
    )
    yield s
    s.stop()


def test_stats_after_a_completion_with_every_expert_resident(resident_server):
    status, _ = resident_server.post("/v1/completions", {"prompt": "def hello", "max_tokens": 6})
    assert status == 200
    status, stats = resident_server.get("/v1/experts/stats")
    assert status == 200, stats
    assert stats["misses"] == 0 and stats["hits"] > 0
    status, health = resident_server.get("/health")
    assert status == 200 and health["status"] == "ok" and health["experts"]["hits"] >= stats["hits"]


def test_stats_are_readable_while_clients_generate(resident_server):
    statuses, done = [], threading.Event()

    def poll():
        while not done.is_set():
            statuses.append(resident_server.get("/v1/experts/stats")[0])
            statuses.append(resident_server.get("/health")[0])

    def ask(i):
        resident_server.post(
            "/v1/completions", {"prompt": f"y = {i}", "max_tokens": 24, "temperature": 0}
        )

    poller = threading.Thread(target=poll)
    clients = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    poller.start()
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    done.set()
    poller.join()
    assert len(statuses) > 4 and set(statuses) == {200}


def _truncate_shard(folder):
    shard = next((folder / "experts").glob("experts-*.safetensors"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    return shard.name


@pytest.mark.parametrize("case", ["missing folder", "budget too small", "truncated shard"])
def test_a_model_that_cannot_load_is_reported_once_and_the_server_idles(case, models, tmp_path):
    folder, env = tmp_path / "model", {}
    if case == "missing folder":
        folder, named = tmp_path / "does-not-exist", "does-not-exist does not exist"
    else:
        shutil.copytree(models("qwen2_moe", "odmoe"), folder)
        if case == "budget too small":
            env, named = {"MLX_LM_ODMOE_EXPERT_CACHE": "1KB"}, "too small"
        else:
            named = _truncate_shard(folder)
    s = Server("mlx_lm_odmoe.server", folder, tmp_path / "log", env=env, ready=(503,))
    try:
        status, health = s.get("/health")
        assert status == 503 and health["status"] == "unavailable" and named in health["error"]
        status, reply = s.post("/v1/completions", {"prompt": "def f", "max_tokens": 4})
        assert status == 503 and named in reply["error"]["message"]
        assert s.get("/v1/experts/stats")[0] == 503
        before = s.cpu_seconds()
        time.sleep(2)
        assert s.cpu_seconds() - before < 0.5  # idle, not retrying
        log = s.log_path.read_text()
        assert log.count("cannot load the model") == 1 and "Traceback" not in log
    finally:
        s.stop()
