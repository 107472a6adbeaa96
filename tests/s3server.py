"""A real S3 endpoint for tests: moto's server mode on 127.0.0.1, stoppable and restartable."""
from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3:
    """A moto S3 server on 127.0.0.1 that can be stopped and started again (its data lives on in this
    process, as a real server's would on disk)."""

    def __init__(self, port: int, bucket: str):
        self.port, self.bucket = port, bucket
        self.url = f"s3://{bucket}/store"
        self.server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def client(self):
        import boto3

        return boto3.client("s3")

    def keys(self, prefix: str = "store/") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def running_s3(monkeypatch, *, key_id: str = "testing", secret: str = "testing", object_cache=None):
    """A fixture body: a moto S3 server on 127.0.0.1 with a fresh bucket, and the environment a caspec store
    reads to reach it (``object_cache``: where to keep fetched objects; default: caspec's own). Yields the server."""
    import uuid

    server = S3(free_port(), f"caspec-{uuid.uuid4().hex[:12]}")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    if object_cache is not None:
        monkeypatch.setenv("CASPEC_OBJECT_CACHE", str(object_cache))
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "CASPEC_STORE"):
        monkeypatch.delenv(name, raising=False)
    server.start()
    try:
        server.client().create_bucket(Bucket=server.bucket)
        yield server
    finally:
        server.stop()
