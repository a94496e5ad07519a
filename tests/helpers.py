"""Small builders shared by the tests."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: the variables of the session's shared forecast dataset (conftest.py: ``forecast_shards``)
FORECAST_VARS = ["land_sea_mask", "orography", "2m_temperature", "10m_v_component_of_wind", "geopotential_500",
                 "temperature_850"]


def tiny_model(default_vars, img_size=(16, 32), patch_size=2, **kw):
    from climax import ClimaX

    cfg = dict(embed_dim=64, depth=2, decoder_depth=1, num_heads=4, drop_path=0.0, drop_rate=0.0)
    cfg.update(kw)
    return ClimaX(default_vars, img_size=img_size, patch_size=patch_size, **cfg)


class _CountingApp:
    """WSGI middleware: body bytes and number of the GET responses, per request path."""

    def __init__(self, app):
        import threading
        from collections import defaultdict

        self.app = app
        self.lock = threading.Lock()
        self.bytes: dict[str, int] = defaultdict(int)
        self.requests: dict[str, int] = defaultdict(int)

    def __call__(self, environ, start_response):
        body = self.app(environ, start_response)
        if environ.get("REQUEST_METHOD") != "GET":
            return body
        path = environ.get("PATH_INFO", "")

        def counted():
            try:
                for chunk in body:
                    with self.lock:
                        self.bytes[path] += len(chunk)
                    yield chunk
            finally:
                with self.lock:
                    self.requests[path] += 1
                if hasattr(body, "close"):
                    body.close()

        return counted()

    def reset(self):
        with self.lock:
            self.bytes.clear()
            self.requests.clear()

    def served(self, prefix: str) -> tuple[int, int]:
        """(bytes, requests) of the GETs of object keys under ``bucket/prefix`` (path style)."""
        key = "/" + prefix.lstrip("/")
        with self.lock:
            return (sum(v for k, v in self.bytes.items() if k.startswith(key)),
                    sum(v for k, v in self.requests.items() if k.startswith(key)))


class CountingS3Server:
    """moto's S3 API on 127.0.0.1 (a free port) behind a counter of the bytes it serves: what the
    server sends, counted on the server, while clients (s3fs) run unchanged."""

    def start(self):
        """Start; returns (s3fs storage_options, counter with ``served(prefix)`` and ``reset()``)."""
        import logging
        import threading

        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.app = _CountingApp(DomainDispatcherApplication(create_backend_app))
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True, request_handler=MotoRequestHandler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        host, port = self.server.server_address[:2]
        opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
        return opts, self.app

    def stop(self):
        self.server.shutdown()
        self.thread.join()
