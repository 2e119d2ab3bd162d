"""Snapshot tests share the storage fixtures (moto S3 server, proxy processes)."""

from tests.storage.conftest import proxies, s3_server, secret_key

__all__ = ["proxies", "s3_server", "secret_key"]
