"""FileService: uploads verified by size and SHA-256 before anything is stored, listing, download, delete."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc
from google.protobuf import empty_pb2

from tuneforge.server import convert
from tuneforge.server.auth.access import UNLIMITED, QuotaLookup, no_quotas
from tuneforge.server.auth.caller import current_caller
from tuneforge.server.db import StoreRunner
from tuneforge.server.errors import ApiError, FieldViolation, invalid_argument, is_disk_full, quota_exceeded
from tuneforge.server.metrics.service_metrics import ServiceMetrics
from tuneforge.server.names import new_id, parse_name
from tuneforge.server.pagination import make_token, parse_page
from tuneforge.server.records import FileRecord
from tuneforge.server.servicers.errors import streaming, unary
from tuneforge.server.servicers.tenancy import REQUEST_ID_RULE, request_id_ok, scoped_request_id, visible
from tuneforge.server.storage import CHUNK_BYTES, Storage, Upload
from tuneforge.server.store.base import JobStore, QuotaExceeded
from tuneforge.v1 import files_pb2, files_pb2_grpc

SHA256 = re.compile(r"^[0-9a-f]{64}$")
SAFE_FILENAME = re.compile(r"^[\w][\w .+-]{0,254}$")
Context: TypeAlias = Any  # grpc.aio.ServicerContext (grpcio ships no type stubs)


class FileServicer(files_pb2_grpc.FileServiceServicer):
    """Thin: checks requests, moves bytes between the stream and storage, records metadata in the store."""

    def __init__(
        self,
        store: JobStore,
        db: StoreRunner,
        storage: Storage,
        max_upload_bytes: int,
        metrics: ServiceMetrics | None = None,
        quotas: QuotaLookup = no_quotas,
        idle_timeout_s: float = 30.0,
    ):
        self._idle_timeout_s = idle_timeout_s
        self._store = store
        self._db = db
        self._storage = storage
        self._max_upload_bytes = max_upload_bytes
        self._metrics = metrics or ServiceMetrics()
        self._quotas = quotas

    @unary
    async def UploadFile(
        self, request_iterator: AsyncIterator[files_pb2.UploadFileRequest], context: Context
    ) -> files_pb2.File:
        try:
            stored = await self._upload(request_iterator)
        except ApiError as exc:
            self._metrics.uploads_rejected.labels(exc.reason.lower()).inc()
            raise
        except OSError as exc:
            self._metrics.uploads_rejected.labels("storage_full" if is_disk_full(exc) else "storage_error").inc()
            raise
        except asyncio.CancelledError:
            self._metrics.uploads_rejected.labels("cancelled").inc()
            raise
        return stored

    async def _upload(self, request_iterator: AsyncIterator[files_pb2.UploadFileRequest]) -> files_pb2.File:
        messages = aiter(request_iterator)
        first = await self._next(messages)
        if first is None or first.WhichOneof("content") != "metadata":
            raise invalid_argument([FieldViolation("metadata", "the first message must carry the metadata")])
        metadata = first.metadata
        self._check_metadata(metadata)
        tenant = current_caller().tenant
        request_id = scoped_request_id(metadata.request_id)
        if request_id:
            existing = await self._db.call(self._store.file_for_request, request_id)
            if existing is not None:
                return convert.file_to_proto(existing)
        await self._check_quota(tenant, metadata.size_bytes)
        upload = self._storage.begin_upload()
        try:
            await self._receive(messages, upload, metadata.size_bytes)
            self._verify(upload, metadata)
            file_id = new_id("file")
            await asyncio.to_thread(self._storage.commit_upload, upload, file_id)
            record = FileRecord(
                file_id,
                metadata.filename,
                files_pb2.File.Purpose.Name(metadata.purpose),
                upload.size_bytes,
                upload.sha256,
                time.time(),
                tenant,
            )
            quota = self._quotas(tenant).max_stored_bytes
            try:
                stored = await self._db.call(
                    self._store.create_file, record, request_id, quota if quota < UNLIMITED else None
                )
            except QuotaExceeded as exceeded:
                self._storage.delete_file(file_id)
                raise _stored_bytes_exceeded(tenant, exceeded.used, upload.size_bytes, quota) from None
            if stored.id != file_id:  # a concurrent repeat of the same request_id won
                self._storage.delete_file(file_id)
            else:
                self._metrics.uploaded_bytes.inc(upload.size_bytes)
            return convert.file_to_proto(stored)
        finally:
            upload.discard()  # no-op once committed

    def _check_metadata(self, metadata: files_pb2.UploadFileMetadata) -> None:
        problems = []
        if not SAFE_FILENAME.fullmatch(metadata.filename) or metadata.filename in (".", ".."):
            problems.append(FieldViolation("metadata.filename", "required: a base name of letters, digits, ' ._+-'"))
        if metadata.purpose != files_pb2.File.DATASET:
            problems.append(FieldViolation("metadata.purpose", "required: DATASET"))
        if metadata.size_bytes < 0:
            problems.append(FieldViolation("metadata.size_bytes", "must not be negative"))
        if not SHA256.fullmatch(metadata.sha256):
            problems.append(FieldViolation("metadata.sha256", "required: 64 lower-case hex digits"))
        if metadata.request_id and not request_id_ok(metadata.request_id):
            problems.append(FieldViolation("metadata.request_id", REQUEST_ID_RULE))
        if problems:
            raise invalid_argument(problems)
        if metadata.size_bytes > self._max_upload_bytes:
            raise ApiError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "UPLOAD_TOO_LARGE",
                f"{metadata.size_bytes} bytes is over the {self._max_upload_bytes}-byte upload limit",
                {"limit_bytes": str(self._max_upload_bytes)},
            )

    async def _check_quota(self, tenant: str, size_bytes: int) -> None:
        """The tenant's largest upload, and its stored bytes with this upload added."""
        quota = self._quotas(tenant)
        if size_bytes > quota.max_upload_bytes:
            limit = quota.max_upload_bytes
            message = f"{size_bytes} bytes is over tenant {tenant}'s {limit}-byte upload limit"
            raise quota_exceeded(tenant, "max_upload_bytes", limit, message)
        if quota.max_stored_bytes < UNLIMITED:  # early: checked again, atomically, when the file is recorded
            stored = await self._db.call(self._store.stored_bytes, tenant)
            if stored + size_bytes > quota.max_stored_bytes:
                raise _stored_bytes_exceeded(tenant, stored, size_bytes, quota.max_stored_bytes)

    async def _next(self, messages: AsyncIterator[files_pb2.UploadFileRequest]) -> files_pb2.UploadFileRequest | None:
        """The next message; DEADLINE_EXCEEDED when the client sends nothing for the idle timeout (a stalled upload
        must not hold a call, a stream and a temp file for ever)."""
        try:
            return await asyncio.wait_for(anext(messages, None), self._idle_timeout_s)
        except TimeoutError:
            raise ApiError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "UPLOAD_IDLE",
                f"the upload sent nothing for {self._idle_timeout_s:g} s and was dropped; nothing was stored",
                {"idle_timeout_s": f"{self._idle_timeout_s:g}"},
            ) from None

    async def _receive(
        self, messages: AsyncIterator[files_pb2.UploadFileRequest], upload: Upload, declared_bytes: int
    ) -> None:
        while (message := await self._next(messages)) is not None:
            if message.WhichOneof("content") != "chunk":
                raise invalid_argument([FieldViolation("metadata", "only the first message may carry metadata")])
            if len(message.chunk) > CHUNK_BYTES:
                raise invalid_argument([FieldViolation("chunk", f"chunks must be at most {CHUNK_BYTES} bytes")])
            upload.write(message.chunk)
            if upload.size_bytes > declared_bytes:
                raise _size_mismatch(declared_bytes, upload.size_bytes, "more than")

    @staticmethod
    def _verify(upload: Upload, metadata: files_pb2.UploadFileMetadata) -> None:
        if upload.size_bytes != metadata.size_bytes:
            raise _size_mismatch(metadata.size_bytes, upload.size_bytes, "only")
        if upload.sha256 != metadata.sha256:
            raise ApiError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "DIGEST_MISMATCH",
                f"the content's SHA-256 is {upload.sha256}, not the declared {metadata.sha256}; nothing was stored",
                {"declared_sha256": metadata.sha256, "actual_sha256": upload.sha256},
                [FieldViolation("metadata.sha256", "does not match the content")],
            )

    @unary
    async def GetFile(self, request: files_pb2.GetFileRequest, context: Context) -> files_pb2.File:
        return convert.file_to_proto(await self._get(request.name))

    @unary
    async def ListFiles(self, request: files_pb2.ListFilesRequest, context: Context) -> files_pb2.ListFilesResponse:
        page = parse_page(request.page_size, request.page_token)
        records, cursor = await self._db.call(self._store.list_files, page.size, page.cursor, current_caller().scope)
        return files_pb2.ListFilesResponse(
            files=[convert.file_to_proto(r) for r in records], next_page_token=make_token(cursor)
        )

    @unary
    async def DeleteFile(self, request: files_pb2.DeleteFileRequest, context: Context) -> empty_pb2.Empty:
        record = await self._get(request.name)
        await self._db.call(self._store.delete_file, record.id)
        self._storage.delete_file(record.id)
        return empty_pb2.Empty()

    @streaming
    async def DownloadFile(
        self, request: files_pb2.DownloadFileRequest, context: Context
    ) -> AsyncIterator[files_pb2.DownloadFileResponse]:
        record = await self._get(request.name)
        yield files_pb2.DownloadFileResponse(file=convert.file_to_proto(record))
        for chunk in self._storage.read_file(record.id):
            yield files_pb2.DownloadFileResponse(chunk=chunk)

    async def _get(self, name: str) -> FileRecord:
        return visible(await self._db.call(self._store.get_file, parse_name(name, "files")), name)


def _stored_bytes_exceeded(tenant: str, stored: int, size_bytes: int, limit: int) -> ApiError:
    message = f"tenant {tenant} stores {stored} bytes; {size_bytes} more would pass its {limit}-byte quota"
    return quota_exceeded(tenant, "max_stored_bytes", limit, message)


def _size_mismatch(declared: int, received: int, how: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "SIZE_MISMATCH",
        f"declared {declared} bytes but received {how} {received}; nothing was stored",
        {"declared_bytes": str(declared), "received_bytes": str(received)},
        [FieldViolation("metadata.size_bytes", "does not match the content")],
    )
