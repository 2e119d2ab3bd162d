"""The object store: one interface, two backends (SPEC §11.1).

* :class:`LocalObjectStore` — a directory (the embedded default). Objects are written to a
  temporary file and renamed into place, so a reader never sees half an object.
* :class:`S3ObjectStore` — any S3-compatible endpoint through boto3 (path-style addressing by
  default). Uploads are multipart with ``part_size`` parts; a failed or interrupted upload is
  aborted, so no orphaned parts stay behind. Reads are ranged and streamed.

Keys are validated with :func:`~.capabilities.validate_key` before any backend sees them.
Errors: :class:`~scaigrid.errors.ObjectNotFound` (404) for a missing key and
:class:`~scaigrid.errors.ObjectStoreUnavailable` (503, ``retry_after``) when the backend
cannot be reached.
boto3 is synchronous; its calls run in worker threads so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import boto3
import structlog
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from scaigrid.errors import (
    ObjectExists,
    ObjectNotFound,
    ObjectStoreUnavailable,
    RangeNotSatisfiable,
)
from scaigrid.modules.scaibunker.storage.capabilities import validate_key
from scaigrid.modules.scaibunker.storage.settings import StorageSettings

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

log = structlog.get_logger(__name__)

READ_CHUNK_BYTES: Final = 1024 * 1024
T = TypeVar("T")


@dataclass(frozen=True)
class ObjectInfo:
    """``size`` in bytes and an opaque ``etag``."""

    size: int
    etag: str


@dataclass(frozen=True)
class PutResult:
    """What a completed upload stored: ``size`` bytes with hex ``sha256``."""

    key: str
    size: int
    sha256: str


@dataclass
class ObjectRead:
    """An open ranged read: bytes ``start..end`` (inclusive) of an object of ``total`` bytes.

    Iterate ``chunks`` exactly once; it closes the underlying stream when done.
    """

    total: int
    start: int
    end: int
    chunks: AsyncIterator[bytes]

    @property
    def length(self) -> int:
        """Bytes in the range."""
        return self.end - self.start + 1


class ObjectStore(ABC):
    """The backend-neutral object store."""

    @abstractmethod
    async def put(
        self, key: str, chunks: AsyncIterator[bytes], *, if_absent: bool = False
    ) -> PutResult:
        """Store the streamed ``chunks`` at ``key`` (replacing it) and hash them on the fly.

        If ``chunks`` raises, nothing is stored and no partial data remains.

        Args:
            key: object key.
            chunks: the body.
            if_absent: store only if no object is at ``key`` (first writer wins; the check
                is atomic with the final commit of the object).

        Raises:
            ObjectExists: ``if_absent`` and the key is taken (nothing is stored).
        """

    @abstractmethod
    async def get(self, key: str, start: int = 0, end: int | None = None) -> ObjectRead:
        """Open bytes ``start..end`` (inclusive; ``end`` None = to the last byte).

        Raises:
            ObjectNotFound: no object at ``key``.
            RangeNotSatisfiable: ``start`` lies beyond the object.
        """

    @abstractmethod
    async def head(self, key: str) -> ObjectInfo:
        """Size and etag. Raises :class:`ObjectNotFound`."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove the object. Raises :class:`ObjectNotFound`."""

    @abstractmethod
    async def list_keys(self, prefix: str) -> list[str]:
        """Keys starting with ``prefix``, sorted."""

    async def close(self) -> None:
        """Release clients and connections (nothing to release by default)."""
        return None


def _check_range(total: int, start: int, end: int | None) -> int:
    if start < 0 or (start >= total and total > 0) or (end is not None and end < start):
        raise RangeNotSatisfiable(f"range {start}-{end} outside object of {total} bytes")
    last = total - 1 if end is None else min(end, total - 1)
    return last


class LocalObjectStore(ObjectStore):
    """Objects as files under ``root`` (key ``a/b`` → ``root/a/b``); temp files in
    ``root/.tmp``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / ".tmp"
        self._tmp.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    async def put(
        self, key: str, chunks: AsyncIterator[bytes], *, if_absent: bool = False
    ) -> PutResult:
        path = self._path(key)
        if if_absent and path.exists():
            raise ObjectExists(f"an object is already stored at {key}")
        tmp = self._tmp / uuid.uuid4().hex
        digest = hashlib.sha256()
        size = 0
        try:
            with tmp.open("wb") as out:
                async for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    await asyncio.to_thread(out.write, chunk)
            path.parent.mkdir(parents=True, exist_ok=True)
            if if_absent:
                # link(2) fails when the name exists: the check and the commit are one step.
                try:
                    os.link(tmp, path)
                except FileExistsError as exc:
                    raise ObjectExists(f"an object is already stored at {key}") from exc
            else:
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return PutResult(key, size, digest.hexdigest())

    async def get(self, key: str, start: int = 0, end: int | None = None) -> ObjectRead:
        path = self._path(key)
        try:
            handle = path.open("rb")
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"no object at {key}") from exc
        total = os.fstat(handle.fileno()).st_size
        try:
            last = _check_range(total, start, end)
        except Exception:
            handle.close()
            raise

        async def chunks() -> AsyncIterator[bytes]:
            try:
                handle.seek(start)
                left = last - start + 1
                while left > 0:
                    data = await asyncio.to_thread(handle.read, min(READ_CHUNK_BYTES, left))
                    if not data:
                        break
                    left -= len(data)
                    yield data
            finally:
                handle.close()

        return ObjectRead(total, start, last, chunks())

    async def head(self, key: str) -> ObjectInfo:
        try:
            st = self._path(key).stat()
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"no object at {key}") from exc
        return ObjectInfo(st.st_size, f'"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"')

    async def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"no object at {key}") from exc

    async def list_keys(self, prefix: str) -> list[str]:
        base = self.root / "scaibunker"
        if not base.is_dir():
            return []
        keys = [str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file()]
        return sorted(k for k in keys if k.startswith(prefix))


class S3ObjectStore(ObjectStore):
    """Objects in one S3 bucket through boto3.

    Args:
        client: a boto3 S3 client (see :func:`build_store`).
        bucket: the bucket name; created on :meth:`ensure_bucket` if missing.
        part_size: multipart part size in bytes (>= 5 MiB).
    """

    def __init__(self, client: S3Client, bucket: str, part_size: int) -> None:
        self.client = client
        self.bucket = bucket
        self.part_size = part_size

    async def _call(self, fn: Callable[..., T], **kwargs: Any) -> T:
        try:
            return await asyncio.to_thread(fn, **kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectNotFound(f"no object at {kwargs.get('Key')}") from exc
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise ObjectExists(f"an object is already stored at {kwargs.get('Key')}") from exc
            if code == "InvalidRange":
                raise RangeNotSatisfiable("range outside the object") from exc
            log.warning("storage.s3_error", code=code, op=getattr(fn, "__name__", "?"))
            raise ObjectStoreUnavailable(f"object store error {code}", retry_after=5) from exc
        except BotoCoreError as exc:
            log.warning("storage.s3_unreachable", error=str(exc))
            raise ObjectStoreUnavailable("object store unreachable", retry_after=5) from exc

    async def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist."""
        try:
            await self._call(self.client.head_bucket, Bucket=self.bucket)
        except ObjectNotFound:
            await self._call(self.client.create_bucket, Bucket=self.bucket)

    async def put(
        self, key: str, chunks: AsyncIterator[bytes], *, if_absent: bool = False
    ) -> PutResult:
        validate_key(key)
        # ``If-None-Match: *`` on the final PUT / CompleteMultipartUpload makes S3 refuse
        # (412) when another writer committed first; the HEAD only saves a doomed upload.
        condition: dict[str, Any] = {"IfNoneMatch": "*"} if if_absent else {}
        if if_absent:
            with contextlib.suppress(ObjectNotFound):
                await self.head(key)
                raise ObjectExists(f"an object is already stored at {key}")
        digest = hashlib.sha256()
        size = 0
        buffer = bytearray()
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        try:
            async for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                buffer += chunk
                while len(buffer) >= self.part_size:
                    if upload_id is None:
                        created = await self._call(
                            self.client.create_multipart_upload, Bucket=self.bucket, Key=key
                        )
                        upload_id = created["UploadId"]
                    part = bytes(buffer[: self.part_size])
                    del buffer[: self.part_size]
                    number = len(parts) + 1
                    done = await self._call(
                        self.client.upload_part,
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=part,
                    )
                    parts.append({"PartNumber": number, "ETag": done["ETag"]})
            if upload_id is None:
                await self._call(
                    self.client.put_object,
                    Bucket=self.bucket,
                    Key=key,
                    Body=bytes(buffer),
                    **condition,
                )
            else:
                if buffer:
                    number = len(parts) + 1
                    done = await self._call(
                        self.client.upload_part,
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=bytes(buffer),
                    )
                    parts.append({"PartNumber": number, "ETag": done["ETag"]})
                await self._call(
                    self.client.complete_multipart_upload,
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    **condition,
                )
        except BaseException:
            if upload_id is not None:
                with contextlib.suppress(ObjectStoreUnavailable, ObjectNotFound):
                    await asyncio.shield(
                        self._call(
                            self.client.abort_multipart_upload,
                            Bucket=self.bucket,
                            Key=key,
                            UploadId=upload_id,
                        )
                    )
                log.info("storage.multipart_aborted", key=key, parts=len(parts))
            raise
        return PutResult(key, size, digest.hexdigest())

    async def get(self, key: str, start: int = 0, end: int | None = None) -> ObjectRead:
        validate_key(key)
        info = await self.head(key)
        last = _check_range(info.size, start, end)
        if info.size == 0:
            response = await self._call(self.client.get_object, Bucket=self.bucket, Key=key)
        else:
            response = await self._call(
                self.client.get_object, Bucket=self.bucket, Key=key, Range=f"bytes={start}-{last}"
            )
        body = response["Body"]

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while True:
                    data = await asyncio.to_thread(body.read, READ_CHUNK_BYTES)
                    if not data:
                        break
                    yield data
            finally:
                body.close()

        return ObjectRead(info.size, start, last, chunks())

    async def head(self, key: str) -> ObjectInfo:
        validate_key(key)
        response = await self._call(self.client.head_object, Bucket=self.bucket, Key=key)
        return ObjectInfo(int(response["ContentLength"]), str(response.get("ETag", "")))

    async def delete(self, key: str) -> None:
        await self.head(key)
        await self._call(self.client.delete_object, Bucket=self.bucket, Key=key)

    async def list_keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = await self._call(self.client.list_objects_v2, **kwargs)
            keys.extend(obj["Key"] for obj in page.get("Contents", []) if "Key" in obj)
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return sorted(keys)

    async def pending_uploads(self, prefix: str) -> list[str]:
        """Keys of multipart uploads started and neither completed nor aborted."""
        page = await self._call(
            self.client.list_multipart_uploads, Bucket=self.bucket, Prefix=prefix
        )
        return [u["Key"] for u in page.get("Uploads", []) if "Key" in u]

    async def close(self) -> None:
        self.client.close()


def build_store(settings: StorageSettings, data_dir: Path) -> ObjectStore:
    """The store ``settings`` select: S3 at ``s3_endpoint``, or a directory under
    ``data_dir/objects`` (or ``storage_dir``)."""
    if settings.effective_backend() == "local":
        return LocalObjectStore(settings.storage_dir or data_dir / "objects")
    client = boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        region_name=settings.s3_region,
        aws_access_key_id=(
            settings.s3_access_key_id.get_secret_value() if settings.s3_access_key_id else None
        ),
        aws_secret_access_key=(
            settings.s3_secret_access_key.get_secret_value()
            if settings.s3_secret_access_key
            else None
        ),
        config=Config(
            s3={"addressing_style": "path" if settings.s3_path_style else "virtual"},
            connect_timeout=settings.s3_timeout_s,
            read_timeout=settings.s3_timeout_s,
            retries={"max_attempts": 3, "mode": "standard"},
            max_pool_connections=32,
        ),
    )
    return S3ObjectStore(client, settings.s3_bucket, settings.s3_part_size_bytes)
