"""A minimal OpenAI-compatible chat-completions server for a local model (testing and offline demos only).

    python -m mule.serve --model smollm2-135m --port 8765
    mule data qa ... generator.base_url=http://127.0.0.1:8765/v1 generator.model=smollm2-135m

It answers POST /v1/chat/completions one request at a time with mule's local generator (greedy at temperature 0,
else seeded sampling), with every message of the request (a worked example sent as a prior user/assistant turn
included). Answers are kept in memory while it runs, so a request sent again with the same settings is answered
without generating (the same text it would generate); nothing is written to disk. It is not a production server:
use vLLM, llama.cpp or Ollama.
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from mule.generators import GeneratorConfig, LocalGenerator


def make_handler(generator: LocalGenerator, lock: threading.Lock) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if not self.path.rstrip("/").endswith("/chat/completions"):
                return self._send(404, {"error": {"message": f"unknown path {self.path}"}})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                messages = body["messages"]
            except (ValueError, KeyError, TypeError):
                return self._send(400, {"error": {"message": "expected a JSON body with messages"}})
            with lock:  # one generation at a time; settings come from the request
                generator.config.temperature = float(body.get("temperature", 0.0))
                generator.config.max_tokens = int(body.get("max_tokens", 256))
                (text,) = generator.generate([messages], progress=False)
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            self._send(200, {"object": "chat.completion", "model": generator.config.model, "choices": [choice]})

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mule.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="hub id, folder or embedded name")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    generator = LocalGenerator(GeneratorConfig(backend="local", model=args.model, dtype=args.dtype), None)
    server = HTTPServer((args.host, args.port), make_handler(generator, threading.Lock()))
    print(f"serving {args.model} at http://{args.host}:{server.server_port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
