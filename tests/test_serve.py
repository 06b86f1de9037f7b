"""`minimind-v serve` through its HTTP API: every answer equals `chat.reply` on the same inputs (the
reference path), bad requests get a 4xx with a message and leave the server serving, concurrent
requests wait in line and all come back right, a client that leaves stops its generation, and
Ctrl-C stops the command cleanly."""
from __future__ import annotations

import base64
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from minimind_v.chat import load_pixels, prompt_ids, reply, stream_reply, user_message
from minimind_v.checkpoint import atomic_save
from minimind_v.config import LMConfig
from minimind_v.demo import run as run_demo
from minimind_v.generate import generate
from minimind_v.lm import MiniMindLM
from minimind_v.rundir import WEIGHTS, write_config
from minimind_v.serve import Engine, Server, checkpoint_name, find_examples, is_loopback, load
from minimind_v.vlm import MiniMindVLM

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo(tmp_path_factory, one_thread):
    """A quick demo run (seconds), with enough SFT steps that it answers in words, not only <|im_end|>."""
    out = tmp_path_factory.mktemp("serve") / "demo"
    run_demo(out, seed=0, quick=True, threads=1, log=lambda m: None, sft_steps=300)
    return out


def start(engine, examples=None, **kw):
    """A Server on a free loopback port, serving in a thread; returns it (stop with stop(server))."""
    server = Server(engine, "127.0.0.1", 0, examples, log=lambda m: None, **kw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop(server):
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def served(demo):
    model, tok, info = load(demo / "sft")
    server = start(Engine(model, tok, checkpoint_name(demo / "sft"), info["stage"]), find_examples(demo / "sft"),
                   max_upload_mb=0.5)
    yield server, model, tok
    stop(server)


def records(demo, n):
    """(image path, question) of the first n held-out records."""
    lines = (demo / "data" / "sft_test.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    return [(demo / "data" / "images" / r["image"], r["conversations"][0]["content"].replace("<image>", "").strip())
            for r in map(json.loads, lines)]


def b64(path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def call(server, method, path, body=None, headers=None):
    """One request -> (status, parsed JSON or raw bytes)."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    if isinstance(body, dict):
        body = json.dumps(body)
    conn.request(method, path, body=body, headers=headers or {})
    res = conn.getresponse()
    data = res.read()
    conn.close()
    if res.getheader("Content-Type", "").startswith("application/json"):
        data = json.loads(data)
    return res.status, data


def events(server, body):
    """A streamed chat -> [(event name, data)]."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    conn.request("POST", "/api/chat", body=json.dumps({**body, "stream": True}))
    res = conn.getresponse()
    assert res.status == 200 and res.getheader("Content-Type").startswith("text/event-stream")
    text = res.read().decode()
    conn.close()
    return [(m[1], json.loads(m[2])) for m in re.finditer(r"event: (\w+)\ndata: (.*)\n\n", text)]


def reference_tokens(model, tok, messages, pixels, n):
    """How many tokens the greedy reply has (the ids chat.stream_reply decodes)."""
    ids = torch.tensor([prompt_ids(tok, messages, model.cfg.num_patches)])
    new = generate(model, ids, n, eos_id=tok.eos_id, images=pixels[None])[0, ids.shape[1]:].tolist()
    return new.index(tok.eos_id) if tok.eos_id in new else len(new)


# ----------------------------------------------------------------------------- answers
def test_info_page_and_examples(served, demo):
    server, model, _ = served
    status, info = call(server, "GET", "/api/info")
    assert status == 200
    assert info["parameters"] == sum(p.numel() for p in model.parameters()) > 0
    assert (info["name"], info["stage"], info["image_size"], info["kind"], info["queue"]) == \
           (f"{demo.name}/sft", "sft", 48, "vlm", 0)
    assert info["examples"] == sorted(p.name for p in (demo / "data" / "images").glob("test_*.png"))[:12]
    status, png = call(server, "GET", "/examples/" + info["examples"][0])
    assert status == 200 and png == (demo / "data" / "images" / info["examples"][0]).read_bytes()
    status, page = call(server, "GET", "/")
    assert status == 200 and b'<script src="/app.js">' in page
    for path in ("/app.js", "/style.css"):
        status, data = call(server, "GET", path)
        assert status == 200 and data == (ROOT / "minimind_v" / "web" / path[1:]).read_bytes()


def test_whole_and_streamed_answers_equal_chat_reply(served, demo):
    server, model, tok = served
    answers = []
    for image, question in records(demo, 6):
        pixels = load_pixels([image], 48)
        msgs = [user_message(question, 1)]
        want = reply(model, tok, msgs, pixels, 24)
        body = {"image": b64(image), "messages": [{"role": "user", "content": question}], "max_new_tokens": 24}
        status, whole = call(server, "POST", "/api/chat", body)
        assert status == 200 and whole["text"] == want
        assert whole["tokens"] == reference_tokens(model, tok, msgs, pixels, 24)
        got = events(server, body)
        assert [e for e, _ in got[:1] + got[-1:]] == ["start", "done"]
        assert "".join(d["text"] for e, d in got if e == "text") == want
        assert got[-1][1]["tokens"] == whole["tokens"] and got[-1][1]["tokens_per_s"] > 0
        answers.append(want)
        # a second turn about the same picture: the history goes back with the new question
        history = [{"role": "user", "content": question}, {"role": "assistant", "content": want},
                   {"role": "user", "content": "And the top right?"}]
        status, second = call(server, "POST", "/api/chat", {"image": b64(image), "messages": history,
                                                             "max_new_tokens": 24})
        assert status == 200 and second["text"] == reply(model, tok, [msgs[0]] + history[1:], pixels, 24)
    assert sum(a != "" for a in answers) >= 3 and len(set(answers)) >= 2     # real, varied answers


def test_sampling_settings_reach_the_sampler(served, demo):
    server, model, tok = served
    image, question = records(demo, 1)[0]
    pixels, msgs = load_pixels([image], 48), [user_message(question, 1)]
    body = {"image": b64(image), "messages": [{"role": "user", "content": question}], "max_new_tokens": 12,
            "temperature": 1.5, "top_p": 0.9, "seed": 7}
    want = "".join(stream_reply(model, tok, msgs, pixels, 12, temperature=1.5, top_p=0.9, seed=7))
    assert call(server, "POST", "/api/chat", body)[1]["text"] == want
    seeds = {call(server, "POST", "/api/chat", {**body, "seed": s})[1]["text"] for s in range(6)}
    assert len(seeds) > 1                                                     # the seed is used, not ignored


def test_a_compiled_engine_answers_what_eager_chat_answers(demo, monkeypatch):
    """`serve --compile`: replies decode through the compiled step (spied on), with the same text."""
    import minimind_v.generate as gen
    built, real = [], gen.compiled_step
    monkeypatch.setattr(gen, "compiled_step", lambda **kw: built.append(kw) or real(**kw))
    model, tok, info = load(demo / "sft")
    server = start(Engine(model, tok, "compiled", info["stage"], compile=True))
    try:
        for image, question in records(demo, 2):
            want = reply(model, tok, [user_message(question, 1)], load_pixels([image], 48), 16)
            body = {"image": b64(image), "messages": [{"role": "user", "content": question}], "max_new_tokens": 16}
            status, got = call(server, "POST", "/api/chat", body)
            assert status == 200 and got["text"] == want
    finally:
        stop(server)
    assert built == [{"fullgraph": True}] * 2


def test_a_language_model_checkpoint_chats_without_pictures(tmp_path, demo):
    _, tok, _ = load(demo / "sft")
    cfg = LMConfig(vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, max_seq_len=64)
    torch.manual_seed(0)
    write_config(tmp_path / "lm", cfg, "sft", tok.model_file)
    atomic_save(MiniMindLM(cfg).state_dict(), tmp_path / "lm" / WEIGHTS)
    model, tok, info = load(tmp_path / "lm")
    server = start(Engine(model, tok, "lm"))
    try:
        msgs = [{"role": "user", "content": "What colour is the circle?"}]
        status, got = call(server, "POST", "/api/chat", {"messages": msgs, "max_new_tokens": 8})
        assert status == 200 and got["text"] == reply(model, tok, msgs, None, 8)
        status, err = call(server, "POST", "/api/chat", {"messages": msgs, "image": b64(records(demo, 1)[0][0])})
        assert status == 400 and "takes no image" in err["error"]
        # a conversation longer than the context is refused; a long max_new_tokens is cut to what fits
        status, err = call(server, "POST", "/api/chat", {"messages": [{"role": "user", "content": "red " * 80}]})
        assert status == 400 and "context" in err["error"]
        status, got = call(server, "POST", "/api/chat", {"messages": msgs, "max_new_tokens": 1000})
        assert status == 200 and got["text"] == reply(model, tok, msgs, None, 64 - len(prompt_ids(tok, msgs, 0)))
    finally:
        stop(server)


# ----------------------------------------------------------------------------- bad requests
def png_bytes(demo):
    return (demo / "data" / "images" / "test_000000.png").read_bytes()


BAD = [  # (name, method, path, body (dict, str, bytes or a function of the demo folder), status, message)
    ("image mark without an image", "POST", "/api/chat",
     {"messages": [{"role": "user", "content": "<image> What colour is it?"}]}, 400, "mark"),
    ("two marks, one image", "POST", "/api/chat",
     lambda d: {"image": b64(d / "data/images/test_000000.png"),
                "messages": [{"role": "user", "content": "<image><image> hi"}]}, 400, "mark"),
    ("a text file as the image", "POST", "/api/chat",
     {"image": base64.b64encode(b"hello, not a picture").decode(), "messages": [{"role": "user", "content": "hi"}]},
     400, "the uploaded image: cannot be read as a picture"),
    ("half a PNG", "POST", "/api/chat",
     lambda d: {"image": base64.b64encode(png_bytes(d)[:len(png_bytes(d)) // 2]).decode(),
                "messages": [{"role": "user", "content": "hi"}]}, 400, "image the uploaded image: "),
    ("not base64", "POST", "/api/chat", {"image": "@@@@", "messages": [{"role": "user", "content": "hi"}]},
     400, "base64"),
    ("an image over --max-upload-mb", "POST", "/api/chat",
     {"image": base64.b64encode(bytes(600_000)).decode(), "messages": [{"role": "user", "content": "hi"}]},
     413, "limit is 0.5 MB"),
    ("a huge body", "POST", "/api/chat", b"x" * (40 << 20), 413, "limit"),
    ("malformed JSON", "POST", "/api/chat", '{"messages": [', 400, "not valid JSON"),
    ("a JSON list", "POST", "/api/chat", "[1, 2]", 400, "JSON object"),
    ("no messages", "POST", "/api/chat", {"image": None}, 400, "messages"),
    ("a message without content", "POST", "/api/chat", {"messages": [{"role": "user"}]}, 400, "messages[0]"),
    ("a bad role", "POST", "/api/chat", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0]"),
    ("ending with the assistant", "POST", "/api/chat",
     {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]}, 400, "last message"),
    ("a template token in the text", "POST", "/api/chat",
     {"messages": [{"role": "user", "content": "hi<|im_end|>"}]}, 400, "template token"),
    ("temperature as text", "POST", "/api/chat",
     {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ("top_p 0", "POST", "/api/chat", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ("max_new_tokens 0", "POST", "/api/chat",
     {"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 0}, 400, "max_new_tokens"),
    ("max_new_tokens 2.5", "POST", "/api/chat",
     {"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 2.5}, 400, "an integer"),
    ("max_new_tokens Infinity", "POST", "/api/chat",
     '{"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": Infinity}', 400, "max_new_tokens"),
    ("temperature NaN", "POST", "/api/chat",
     '{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature"),
    ("GET the chat API", "GET", "/api/chat", None, 405, "POST"),
    ("PUT the chat API", "PUT", "/api/chat", "{}", 405, "PUT"),
    ("POST the page", "POST", "/", "{}", 405, "/api/chat"),
    ("DELETE the info", "DELETE", "/api/info", None, 405, "DELETE"),
    ("an unknown path", "GET", "/nope", None, 404, "/nope"),
    ("an unknown API", "POST", "/api/nope", "{}", 404, "/api/nope"),
    ("an unknown example", "GET", "/examples/../config.json", None, 404, "no such path"),
]


@pytest.mark.parametrize("name, method, path, body, status, message", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_a_4xx_with_a_message_and_the_server_goes_on(served, demo, name, method, path, body,
                                                                      status, message):
    server, model, tok = served
    got_status, got = call(server, method, path, body(demo) if callable(body) else body)
    assert got_status == status and message in got["error"], got
    image, question = records(demo, 1)[0]
    status, ok = call(server, "POST", "/api/chat", {"image": b64(image), "max_new_tokens": 8,
                                                    "messages": [{"role": "user", "content": question}]})
    assert status == 200 and ok["text"] == reply(model, tok, [user_message(question, 1)], load_pixels([image], 48), 8)


def raw_request(server, head: bytes, body: bytes = b""):
    """Send bytes as they are (no Content-Length added); -> (status, error message)."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    conn.connect()
    conn.sock.sendall(head + body)
    res = http.client.HTTPResponse(conn.sock)
    res.begin()
    data = json.loads(res.read())
    conn.close()
    return res.status, data["error"]


def test_bodies_without_a_length_or_claiming_too_much_are_refused(served):
    server, *_ = served
    for head in (b"", b"Content-Length: -5\r\n", b"Content-Length: many\r\n"):
        status, error = raw_request(server, b"POST /api/chat HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
        assert status == 411 and "Content-Length header" in error
    status, error = raw_request(server, b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n")
    assert status == 413 and "9536.7 MB" in error       # answered at once, without reading 10 GB
    assert call(server, "GET", "/api/info")[0] == 200


# ----------------------------------------------------------------------------- queue and disconnects
def test_twenty_concurrent_requests_wait_in_line_and_all_answer_right(served, demo):
    server, model, tok = served
    engine = server.engine
    cases = records(demo, 10) * 2
    want = [reply(model, tok, [user_message(q, 1)], load_pixels([img], 48), 16) for img, q in cases]
    results, errors = [None] * 20, []

    def client(i):
        image, question = cases[i]
        body = {"image": b64(image), "messages": [{"role": "user", "content": question}], "max_new_tokens": 16}
        try:
            if i % 2:
                results[i] = ("whole", call(server, "POST", "/api/chat", body)[1]["text"], None)
            else:
                got = events(server, body)
                results[i] = ("stream", "".join(d["text"] for e, d in got if e == "text"),
                              next(d["ahead"] for e, d in got if e == "queue"))
        except Exception as e:                       # reported below, with the request's number
            errors.append((i, repr(e)))

    with engine.turn():                              # hold the model: every request must queue behind
        threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while call(server, "GET", "/api/info")[1]["queue"] < 21 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert call(server, "GET", "/api/info")[1]["queue"] == 21
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    assert [r[1] for r in results] == want
    aheads = [r[2] for r in results if r[0] == "stream"]
    assert len(set(aheads)) == 10 and all(1 <= a <= 20 for a in aheads)   # each told its own place in line
    assert engine.queue_length() == 0


def test_a_client_that_leaves_stops_its_generation(demo):
    """A random model that never says <|im_end|>, slowed to 20 ms a token: 200 tokens take 4 s."""
    _, tok, info = load(demo / "sft")
    torch.manual_seed(0)
    model = MiniMindVLM(load(demo / "sft")[0].cfg).eval()
    with torch.no_grad():
        model.lm.embed_tokens.weight.mul_(20.0)
        model.lm.embed_tokens.weight[tok.eos_id] = 0.0          # its logit is 0, below the largest one
    image, question = records(demo, 1)[0]
    pixels = load_pixels([image], 48)
    assert reference_tokens(model, tok, [user_message(question, 1)], pixels, 200) == 200
    fast = model.forward
    model.forward = lambda *a, **k: (time.sleep(0.02), fast(*a, **k))[1]
    engine = Engine(model, tok, "random")
    server = start(engine)
    try:
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
        conn.request("POST", "/api/chat", body=json.dumps({
            "image": b64(image), "messages": [{"role": "user", "content": question}], "max_new_tokens": 200,
            "stream": True}))
        res = conn.getresponse()
        while b"event: text" not in res.fp.readline():              # the first piece arrived
            pass
        res.close()
        conn.close()
        deadline = time.monotonic() + 60
        while engine.queue_length() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.queue_length() == 0
        assert 1 <= engine.generated < 200, engine.generated        # stopped early, not at max_new_tokens
        before = engine.generated
        status, whole = call(server, "POST", "/api/chat", {"image": b64(image), "max_new_tokens": 20,
                                                           "messages": [{"role": "user", "content": question}]})
        assert status == 200 and whole["tokens"] == 20 and engine.generated == before + 20
    finally:
        stop(server)


# ----------------------------------------------------------------------------- the command
def test_is_loopback():
    assert all(map(is_loopback, ["127.0.0.1", "localhost", "::1", "127.1.2.3"]))
    assert not any(map(is_loopback, ["0.0.0.0", "192.168.1.5", "::", "example.com"]))


def test_the_command_serves_and_ctrl_c_stops_it_cleanly(demo):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "minimind_v", "serve", "--checkpoint", str(demo / "sft"),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = proc.stdout.readline()
        m = re.search(r"on http://127\.0\.0\.1:(\d+)/", line)
        assert m and "12 example pictures" in line, line
        conn = http.client.HTTPConnection("127.0.0.1", int(m[1]), timeout=30)
        conn.request("GET", "/api/info")
        assert json.loads(conn.getresponse().read())["name"] == f"{demo.name}/sft"
        conn.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert proc.stdout.read().strip().endswith("minimind-v serve: stopped")
    finally:
        proc.kill()
        proc.wait()


def test_missing_checkpoint_or_examples_folder_is_a_clear_error(tmp_path, demo, capsys):
    from minimind_v.cli import main
    assert main(["serve", "--checkpoint", str(tmp_path)]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(demo / "sft"), "--examples", str(tmp_path / "none")]) == 2
    assert f"--examples {tmp_path / 'none'}: not a folder" in capsys.readouterr().err
