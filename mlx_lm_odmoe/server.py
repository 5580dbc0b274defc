"""``mlx_lm_odmoe.server``: mlx_lm.server plus expert-cache statistics.

Same flags as ``mlx_lm.server``. Adds ``GET /v1/experts/stats`` (JSON) and
puts the same figures in ``/health``. It also keeps serving when one
request fails (say, a disk read error): that request gets an error — a JSON
500, or an ``error`` event closing its stream — and the generation loop
restarts for everyone else, where stock mlx-lm's batched loop would stop.
A model that cannot load is not retried: the error is logged once,
``/health`` answers 503 with it, and every request gets a 503 naming it.
Stats are readable from any thread at any time; a failure to read them is
a 500, never a 200.
"""

import json
import logging
import weakref
from queue import Empty as QueueEmpty


def expert_stats(model) -> dict:
    from .runtime import runtime_of

    return runtime_of(model).stats().to_dict(expert_use=False)  # expert_use is large; Python has it


def _make_classes():
    import mlx_lm.server as server

    class ExpertStatsHandler(server.APIHandler):
        def _model(self):
            return self.response_generator.model_provider.model

        def do_GET(self):
            path = self.path.split("?")[0].rstrip("/")
            if path == "/v1/experts/stats":
                return self._send_stats()
            if path == "/health":
                return self._send_health()
            return super().do_GET()

        def _stats_or_none(self):
            model = self._model()
            if model is None or getattr(model, "expert_runtime", None) is None:
                return None
            return expert_stats(model)

        def _send_json(self, status, body):
            data = json.dumps(body).encode()
            self._set_completion_headers(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()

        def _send_stats(self):
            failure = self.response_generator.load_error
            if failure is not None:
                return self._send_json(503, {"error": f"the model could not be loaded: {failure}"})
            try:
                stats = self._stats_or_none()
            except Exception as e:  # a stats read must never take the server down
                logging.exception("reading expert stats failed")
                return self._send_json(500, {"error": f"reading expert stats failed: {e}"})
            if stats is None:
                return self._send_json(503, {"error": "no odmoe model is loaded yet"})
            self._send_json(200, stats)

        def _send_health(self):
            generator = self.response_generator
            if generator.load_error is not None:
                return self._send_json(
                    503,
                    {
                        "status": "unavailable",
                        "error": f"the model could not be loaded: {generator.load_error}",
                    },
                )
            if not generator.is_healthy:
                return self._send_json(
                    503, {"status": "unavailable", "error": "generation thread died"}
                )
            body = {"status": "ok"}
            try:
                stats = self._stats_or_none()
            except Exception as e:
                logging.exception("reading expert stats failed")
                return self._send_json(
                    500, {"status": "error", "error": f"reading expert stats failed: {e}"}
                )
            if stats is not None:
                body["experts"] = stats
            self._send_json(200, body)

        def do_POST(self):
            failure = self.response_generator.load_error
            if failure is None:
                return super().do_POST()
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)  # the body, unread, would desync keep-alive
            self._send_json(
                503,
                {
                    "error": {
                        "message": f"the model could not be loaded: {failure}",
                        "type": type(failure).__name__,
                    }
                },
            )

        def handle_completion(self, request, stop_words):
            try:
                return super().handle_completion(request, stop_words)
            except Exception as e:
                logging.error(f"request failed: {e}")
                message = {"error": {"message": str(e), "type": type(e).__name__}}
                if self.stream:
                    self.wfile.write(f"data: {json.dumps(message)}\n\n".encode())
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                else:
                    self._headers_buffer = []  # drop the unsent 200
                    self._send_json(500, message)

    class ResilientResponseGenerator(server.ResponseGenerator):
        def __init__(self, *args, **kwargs):
            self._epoch = 0
            self._last_error = None
            self.load_error = None  # why the model cannot be served, if it cannot
            self._queue_epoch = weakref.WeakKeyDictionary()
            super().__init__(*args, **kwargs)

        def _run_generate(self):
            if not self._load_model():
                return
            while not self._stop:
                try:
                    self._generate()
                    return
                except Exception as e:
                    logging.exception(f"generation failed, restarting the loop: {e}")
                    self._last_error = e
                    self._epoch += 1

        def _load_model(self) -> bool:
            """Load once; a model that cannot load is not retried (the
            error would repeat, as a busy loop)."""
            from .loading import resolve_model_path

            try:
                if self.model_provider.cli_args.model:  # a clear error for a missing folder
                    resolve_model_path(self.model_provider.cli_args.model)
                self.model_provider.load_default()
                return True
            except Exception as e:
                logging.error(f"cannot load the model: {type(e).__name__}: {e}")
                self.load_error = e
                self._generation_failed = True
                return False

        def _next_request(self, timeout=None):
            # Between steps and when idle, on the generation thread: fold in
            # route counts a stats reader on another thread asked for.
            model = self.model_provider.model
            runtime = getattr(model, "expert_runtime", None)
            store = getattr(runtime, "_store", None)
            if store is not None:
                store.telemetry.service()
            return super()._next_request(timeout)

        def _await_response(self, response_queue):
            epoch = self._queue_epoch.setdefault(response_queue, self._epoch)
            while True:
                try:
                    return response_queue.get(timeout=0.25)
                except QueueEmpty:
                    if self._epoch != epoch:
                        raise RuntimeError(f"generation failed: {self._last_error}") from None
                    if not self.generation_available():
                        raise RuntimeError("generation thread died") from None

    return server, ExpertStatsHandler, ResilientResponseGenerator


def main():
    server, handler, generator = _make_classes()
    stock_http = server._run_http_server

    def run_http_server(host, port, response_generator, **kwargs):
        kwargs.setdefault("handler_class", handler)
        return stock_http(host, port, response_generator, **kwargs)

    # mlx-lm's main() builds these by module-level name.
    server._run_http_server = run_http_server
    server.ResponseGenerator = generator
    server.main()


if __name__ == "__main__":
    main()
