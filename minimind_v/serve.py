"""`minimind-v serve`: chat with a checkpoint about a picture, in the browser or through a JSON API.

Where it sits: after training, beside `chat.py`, which it reuses: the same prompt (`chat.prompt_ids`,
the picture after the first question), the same preprocessing (`image.preprocess`), the same
decoding (`generate.stream`). Only the transport is new:

    browser: web/index.html + app.js          POST /api/chat {"image", "messages", "stream", ...}
        |                                                  |
    Handler (one thread per request)   parse and check: a clear 4xx message for bad input
        |                              decode the picture from its bytes, as chat does from a file
    Engine.turn()                      wait in line: one generation at a time per model (FIFO);
        |                              a streamed request is told how many are ahead of it
    Engine.pieces()                    prompt ids -> generate.stream, one token at a time
    server-sent events                 `event: text` per piece, then `event: done` (tokens, tokens/s);
                                       a failed write (the client left) stops it before the next token

The standard library's `ThreadingHTTPServer` serves the page and the API (no new dependency),
in HTTP/1.0: one request per connection; a stream ends when the connection closes. `GET /api/info`
names the checkpoint, its parameter count, image size and queue length. The model is loaded in
one place, `load`, where other kinds of checkpoints plug in.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import collections
import contextlib
import ipaddress
import json
import mimetypes
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import torch

from .chat import image_settings, image_size, num_patches, prompt_ids, user_message
from .generate import stream
from .image import BadImage, read_pixels
from .lm import count_parameters
from .rundir import load_chat_model
from .tokenizer import IMAGE_TOKEN, SPECIAL_TOKENS

WEB = Path(__file__).parent / "web"                    # the page: index.html, app.js, style.css
PAGES = {"/": "index.html", "/index.html": "index.html", "/app.js": "app.js", "/style.css": "style.css"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp")
DRAIN_LIMIT = 64 << 20      # a too-large body up to this size is read and dropped, so the client sees the 413


class RequestError(ValueError):
    """Bad input from a client: answered with `status` and this message, and the server goes on."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ClientGone(Exception):
    """The request ends early: a write to its client failed (it left), or the server is stopping."""


# ----------------------------------------------------------------------------- model and pictures
def load(checkpoint, device: str = "cpu"):
    """A checkpoint directory -> (model in eval mode, tokenizer, config.json contents)."""
    return load_chat_model(checkpoint, device)


def checkpoint_name(checkpoint) -> str:
    """`demo/sft` for the folder demo/sft: the last two parts of the path say which run it is."""
    path = Path(checkpoint).resolve()
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def decode_image(image, size: int, max_bytes: int, alpha: str = "white", transform=None) -> torch.Tensor:
    """An image file as base64 (or a data: URL) -> (3, size, size), decoded with the same checks and
    preprocessed as chat and training do (`image.read_pixels`; `alpha`/`transform`: `chat.image_settings`)."""
    if not isinstance(image, str):
        raise RequestError(400, "\"image\" must be a base64 string")
    try:
        data = base64.b64decode(image.partition(",")[2] if image.startswith("data:") else image, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "\"image\" is not valid base64") from None
    if len(data) > max_bytes:
        raise RequestError(413, f"the image is {len(data) / 2 ** 20:.1f} MB; the limit is "
                                f"{max_bytes / 2 ** 20:g} MB (--max-upload-mb)")
    try:
        return read_pixels("the uploaded image", size, data=data, alpha=alpha, transform=transform)
    except BadImage as e:
        raise RequestError(400, str(e)) from None


def find_examples(checkpoint, folder=None, limit: int = 12) -> dict[str, Path]:
    """Example pictures for the page: the images in `folder`, or a demo checkpoint's test pictures."""
    if folder is not None:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"--examples {folder}: not a folder")
        files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    else:                        # `minimind-v demo --out D` writes D/sft and D/data/images/test_*.png
        files = sorted((Path(checkpoint).resolve().parent / "data" / "images").glob("test_*.png"))
    return {p.name: p for p in files[:limit]}


# ----------------------------------------------------------------------------- one model, one line
class Engine:
    """A loaded model that generates for one request at a time; the others wait in line (FIFO)."""

    def __init__(self, model, tok, name: str, stage: str | None = None, compile: bool = False):
        self.model, self.tok, self.name, self.stage = model, tok, name, stage
        self.compile = compile                            # decode through generate's compiled static-cache step
        self.params = count_parameters(model)
        self.device = next(model.parameters()).device
        self.patches = num_patches(model)                 # 0 for a language model: it takes no picture
        self.image_size = image_size(model) if self.patches else None
        self.generated = 0                                # tokens generated since the start
        self.stopping = threading.Event()                 # set at shutdown: running generations end
        self._line: collections.deque = collections.deque()   # tickets; the first one generates
        self._cond = threading.Condition()

    def queue_length(self) -> int:                        # requests generating or waiting
        return len(self._line)

    def info(self) -> dict:
        return {"name": self.name, "stage": self.stage, "parameters": self.params,
                "kind": "vlm" if self.patches else "lm", "image_size": self.image_size,
                "num_patches": self.patches, "context": self.model.max_seq_len, "queue": self.queue_length()}

    @contextlib.contextmanager
    def turn(self, on_wait=None):
        """`with engine.turn():` the body runs once every request ahead of this one is done. on_wait(ahead)
        is called (outside the lock) when the number ahead changes and every 5 s; if it raises, we leave."""
        ticket = object()
        with self._cond:
            self._line.append(ticket)
        try:
            last = None
            while True:
                with self._cond:
                    ahead = self._line.index(ticket)
                    if ahead and ahead == last:
                        self._cond.wait(timeout=5.0)
                        ahead = self._line.index(ticket)
                if self.stopping.is_set():
                    raise ClientGone("the server is shutting down")
                if ahead == 0:
                    break
                if on_wait is not None:
                    on_wait(ahead)
                last = ahead
            yield
        finally:
            with self._cond:
                self._line.remove(ticket)
                self._cond.notify_all()

    def prepare(self, body: dict, max_image_bytes: int) -> dict:
        """A request's JSON -> the generation's inputs; anything wrong -> RequestError(400/413)."""
        messages = check_messages(body.get("messages"))
        pixels = None
        if body.get("image") is not None:
            if not self.patches:
                raise RequestError(400, f"{self.name} is a language model: it takes no image")
            pixels = decode_image(body["image"], self.image_size, max_image_bytes,
                                  **image_settings(self.model))[None]                 # (1, 3, S, S)
        n_images = 0 if pixels is None else 1
        marks = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
        if marks > n_images:
            raise RequestError(400, f"the messages hold {marks} {IMAGE_TOKEN} mark(s) but the request has "
                                    f"{n_images} image(s) (send the picture as \"image\", base64)")
        if marks < n_images:     # no <image> mark: the picture goes after the first question, as in `chat`
            first = next(i for i, m in enumerate(messages) if m["role"] == "user")
            position = (getattr(self.model, "run_info", None) or {}).get("image_position", "after")
            messages[first] = user_message(messages[first]["content"], n_images, position)
        ids = prompt_ids(self.tok, messages, self.patches)
        room = self.model.max_seq_len - len(ids)
        if room < 1:
            raise RequestError(400, f"the conversation is {len(ids)} tokens; the model's context is "
                                    f"{self.model.max_seq_len}: start a new chat")
        return {"ids": ids, "pixels": pixels,
                "max_new_tokens": min(number(body, "max_new_tokens", 128, 1, 100_000, int), room),
                "temperature": number(body, "temperature", 0.0, 0.0, 100.0),
                "top_p": number(body, "top_p", None, 0.0, 1.0),
                "seed": number(body, "seed", None, 0, 2 ** 63 - 1, int)}

    def pieces(self, job: dict, stats: dict):
        """Yield the reply's text piece by piece, as `chat.stream_reply` does; count tokens in `stats`.
        Stops at `<|im_end|>`, max_new_tokens or shutdown; the caller stops it by asking no more."""
        tok = self.tok
        ids = torch.tensor([job["ids"]], device=self.device)                     # (1, T)
        images = None if job["pixels"] is None else job["pixels"][None].to(self.device)   # (1, 1, 3, S, S)
        new, shown = [], ""
        stats.update(tokens=0, started=time.perf_counter())
        for nxt in stream(self.model, ids, job["max_new_tokens"], temperature=job["temperature"],
                          top_p=job["top_p"], eos_id=tok.eos_id, images=images, seed=job["seed"],
                          compile=self.compile):
            if int(nxt[0]) == tok.eos_id or self.stopping.is_set():
                break
            new.append(int(nxt[0]))
            stats["tokens"] += 1
            self.generated += 1
            text = tok.decode(new)
            if not text.endswith("\ufffd"):             # wait for the rest of a multi-byte character
                yield text[len(shown):]
                shown = text
        text = tok.decode(new)
        if len(text) > len(shown):
            yield text[len(shown):]


def check_messages(messages) -> list[dict]:
    """[{"role", "content"}, ...], roles user/assistant/system, ending with the user's question."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "\"messages\" must be a non-empty list of {\"role\", \"content\"}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) \
                or m.get("role") not in ("user", "assistant", "system"):
            raise RequestError(400, f"messages[{i}] must be {{\"role\": \"user\"|\"assistant\"|\"system\", "
                                    f"\"content\": string}}")
        for special in SPECIAL_TOKENS:
            if special in m["content"]:
                raise RequestError(400, f"messages[{i}] holds the template token {special}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise RequestError(400, "the last message must be the user's question (\"role\": \"user\")")
    return out


def number(body: dict, key: str, default, lo, hi, kind=float):
    """body[key] as `kind` within [lo, hi] (top_p: above 0), or the default when absent or null."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi \
            or (key == "top_p" and value == 0) or (kind is int and value != int(value)):
        raise RequestError(400, f"\"{key}\" must be {'an integer' if kind is int else 'a number'} in [{lo}, {hi}]"
                                f"{' above 0' if key == 'top_p' else ''}, got {value!r}")
    return kind(value)


# ----------------------------------------------------------------------------- HTTP
class Handler(BaseHTTPRequestHandler):
    server_version = "minimind-v"
    server: "Server"

    def do_GET(self):
        path = urlsplit(self.path).path
        try:
            if path in PAGES:
                name = PAGES[path]
                self.send_bytes(200, (WEB / name).read_bytes(), mimetypes.guess_type(name)[0] + "; charset=utf-8")
            elif path == "/api/info":
                self.send_json(200, {**self.server.engine.info(), "examples": list(self.server.examples),
                                     "max_upload_mb": self.server.max_upload_mb})
            elif path.startswith("/examples/") and path[len("/examples/"):] in self.server.examples:
                file = self.server.examples[path[len("/examples/"):]]
                self.send_bytes(200, file.read_bytes(), mimetypes.guess_type(file.name)[0] or "image/png")
            elif path == "/api/chat":
                raise RequestError(405, "use POST for /api/chat")
            else:
                raise RequestError(404, f"no such path: {path}")
        except RequestError as e:
            self.send_json(e.status, {"error": str(e)})

    def do_POST(self):
        path = urlsplit(self.path).path
        try:
            if path != "/api/chat":
                raise RequestError(405 if path in PAGES or path == "/api/info" else 404,
                                   f"POST goes to /api/chat, not {path}")
            body = self.read_json()
            job = self.server.engine.prepare(body, self.server.max_upload_mb * 2 ** 20)
        except RequestError as e:
            self.send_json(e.status, {"error": str(e)})
            return
        if body.get("stream"):
            self.chat_stream(job)
        else:
            self.chat_whole(job)

    def not_allowed(self):
        self.send_json(405, {"error": f"method {self.command} is not allowed (GET the page, POST /api/chat)"})

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = not_allowed

    # --- the chat itself
    def chat_whole(self, job):
        stats = {}
        try:
            with self.server.engine.turn():
                text = "".join(self.server.engine.pieces(job, stats))
        except ClientGone as e:
            return self.send_json(503, {"error": str(e)})
        self.send_json(200, {"text": text, **summary(stats)})
        self.server.log_chat(stats)

    def chat_stream(self, job):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        stats = {}
        try:
            with self.server.engine.turn(on_wait=lambda ahead: self.event("queue", {"ahead": ahead})):
                self.event("start", {"max_new_tokens": job["max_new_tokens"]})
                with contextlib.closing(self.server.engine.pieces(job, stats)) as pieces:
                    for piece in pieces:
                        self.event("text", {"text": piece})     # raises ClientGone: no next token
            self.event("done", summary(stats))
            self.server.log_chat(stats)
        except ClientGone:
            self.server.log_chat(stats, "the client left; stopped")

    def event(self, name: str, data: dict) -> None:
        """One server-sent event; a failed write means the client is gone."""
        try:
            self.wfile.write(f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode())
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as e:
            raise ClientGone(str(e)) from None

    # --- plumbing
    def read_json(self) -> dict:
        length = self.headers.get("Content-Length", "")
        if not length.strip().isdigit():
            raise RequestError(411, "send the JSON body with a Content-Length header (its size in bytes)")
        n = int(length)
        if n > self.server.max_body:
            if n <= DRAIN_LIMIT:          # read and drop it: a client still sending would not see the answer
                while n > 0 and (chunk := self.rfile.read(min(n, 1 << 16))):
                    n -= len(chunk)
            self.close_connection = True
            raise RequestError(413, f"the request body is {int(length) / 2 ** 20:.1f} MB; the limit is "
                                    f"{self.server.max_body / 2 ** 20:.1f} MB (--max-upload-mb "
                                    f"{self.server.max_upload_mb:g} for the image)")
        raw = self.rfile.read(n)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object {\"messages\": [...], ...}")
        return body

    def send_bytes(self, status: int, data: bytes, content_type: str) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            pass

    def send_json(self, status: int, obj: dict) -> None:
        self.send_bytes(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json; charset=utf-8")

    def log_message(self, format, *args):     # the access log only with --verbose
        if self.server.verbose:
            super().log_message(format, *args)


def summary(stats: dict) -> dict:
    seconds = time.perf_counter() - stats["started"] if "started" in stats else 0.0
    return {"tokens": stats.get("tokens", 0), "seconds": round(seconds, 4),
            "tokens_per_s": round(stats.get("tokens", 0) / seconds, 2) if seconds > 0 else 0.0}


class Server(ThreadingHTTPServer):
    """The HTTP server around one Engine; `serve_forever()` in a thread, `shutdown()` to stop."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8000, examples=None,
                 max_upload_mb: float = 8.0, log=print, verbose: bool = False):
        self.engine, self.examples, self.log, self.verbose = engine, dict(examples or {}), log, verbose
        self.max_upload_mb = max_upload_mb                                  # the decoded image
        self.max_body = int(max_upload_mb * 2 ** 20 * 4 / 3) + (1 << 20)  # base64 is 4/3 of the bytes, + the text
        if ":" in host:
            self.address_family = socket.AF_INET6
        try:
            super().__init__((host, port), Handler)
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def log_chat(self, stats: dict, note: str = "answered") -> None:
        s = summary(stats)
        self.log(f"{note}: {s['tokens']} tokens in {s['seconds']:.2f}s ({s['tokens_per_s']:.1f} tokens/s); "
                 f"{self.engine.queue_length()} in line")


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ----------------------------------------------------------------------------- command line
def cli(argv: list[str]) -> int:
    """`minimind-v serve --checkpoint DIR [--host 127.0.0.1] [--port 8000]`"""
    p = argparse.ArgumentParser(prog="minimind-v serve", description="Chat with a checkpoint about a picture "
                                "in the browser (and through a JSON API at /api/chat).")
    p.add_argument("--checkpoint", required=True, help="directory written by `minimind-v train` or `demo`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    p.add_argument("--examples", help="folder of example pictures the page offers (default: a demo "
                                      "checkpoint's held-out test pictures)")
    p.add_argument("--max-upload-mb", type=float, default=8.0, help="largest image accepted (default 8)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--verbose", action="store_true", help="log every HTTP request")
    p.add_argument("--compile", action="store_true", help="decode with a compiled step (faster per token; each "
                                                          "new prompt-length bucket compiles once, seconds)")
    a = p.parse_args(argv)
    model, tok, info = load(a.checkpoint, a.device)
    engine = Engine(model, tok, checkpoint_name(a.checkpoint), info.get("stage"), compile=a.compile)
    examples = find_examples(a.checkpoint, a.examples)
    if not is_loopback(a.host):
        print(f"minimind-v serve: warning: listening on {a.host}, so other machines can reach this server; "
              f"it has no authentication", file=sys.stderr, flush=True)
    server = Server(engine, a.host, a.port, examples, a.max_upload_mb, log=lambda m: print(m, flush=True),
                    verbose=a.verbose)
    signal.signal(signal.SIGINT, signal.default_int_handler)         # Ctrl-C -> KeyboardInterrupt, here
    signal.signal(signal.SIGTERM, signal.default_int_handler)        # and `kill` stops as cleanly
    thread = threading.Thread(target=server.serve_forever, name="serve", daemon=True)
    try:
        thread.start()
        print(f"serving {engine.name} ({engine.params:,} parameters, {len(examples)} example pictures) on "
              f"{server.url}  (Ctrl-C stops)", flush=True)
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        pass
    engine.stopping.set()                # generations in progress end before their next token
    if thread.is_alive():
        server.shutdown()
    server.server_close()
    print("minimind-v serve: stopped", flush=True)
    return 0
