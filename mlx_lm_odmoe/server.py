"""``mlx_lm_odmoe.server``: mlx_lm.server plus expert-cache statistics.

Same flags as ``mlx_lm.server``. Adds ``GET /v1/experts/stats`` (JSON) and
puts the same figures in ``/health``. It also keeps serving when one
request fails (say, a disk read error): that request gets an error — a JSON
500, or an ``error`` event closing its stream — and the generation loop
restarts for everyone else, where stock mlx-lm's batched loop would stop.
"""

import json
import logging
import weakref
from queue import Empty as QueueEmpty


def expert_stats(model) -> dict:
    from .runtime import runtime_of

    s = runtime_of(model).stats()
    s.pop("expert_use", None)  # large; available from Python
    s["per_layer"] = {str(l): v for l, v in s["per_layer"].items()}
    return s


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
            try:
                return expert_stats(model)
            except Exception as e:  # a stats read must never take the server down
                return {"error": str(e)}

        def _send_json(self, status, body):
            data = json.dumps(body).encode()
            self._set_completion_headers(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()

        def _send_stats(self):
            stats = self._stats_or_none()
            if stats is None:
                return self._send_json(503, {"error": "no odmoe model is loaded yet"})
            self._send_json(200, stats)

        def _send_health(self):
            healthy = self.response_generator.is_healthy
            body = {"status": "ok" if healthy else "unavailable"}
            stats = self._stats_or_none()
            if stats is not None:
                body["experts"] = stats
            self._send_json(200 if healthy else 503, body)

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
            self._queue_epoch = weakref.WeakKeyDictionary()
            super().__init__(*args, **kwargs)

        def _run_generate(self):
            while not self._stop:
                try:
                    self._generate()
                    return
                except Exception as e:
                    logging.exception(f"generation failed, restarting the loop: {e}")
                    self._last_error = e
                    self._epoch += 1

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
