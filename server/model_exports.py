"""ExportModel's request checks and its metadata message."""

from __future__ import annotations

from typing import Any

from tuneforge.server.errors import FieldViolation, invalid_argument
from tuneforge.server.records import JobRecord
from tuneforge.server.spec_validation import ONNX_OPSETS
from tuneforge.v1 import job_spec_pb2, jobs_pb2


def check_export_request(request: jobs_pb2.ExportModelRequest) -> tuple[str, int]:
    """The format's name (`onnx`) and the opset (0 for formats other than ONNX); INVALID_ARGUMENT otherwise."""
    violations = []
    if request.format not in job_spec_pb2.ExportFormat.values() or request.format == 0:
        violations.append(FieldViolation("format", "HUGGING_FACE, MERGED_LORA, TORCHSCRIPT or ONNX"))
    opset = request.onnx_opset or 18
    if not ONNX_OPSETS[0] <= opset <= ONNX_OPSETS[1]:
        violations.append(FieldViolation("onnx_opset", f"between {ONNX_OPSETS[0]} and {ONNX_OPSETS[1]}, got {opset}"))
    if violations:
        raise invalid_argument(violations)
    name = job_spec_pb2.ExportFormat.Name(request.format).lower()
    return name, opset if request.format == job_spec_pb2.ONNX else 0


def model_export(metadata: dict[str, Any], record: JobRecord, own_file: bool) -> jobs_pb2.ModelExport:
    """The metadata message: the export's own file, or the artifact's tar for the folder formats."""
    check = metadata.get("check")
    message = jobs_pb2.ModelExport(
        format=job_spec_pb2.ExportFormat.Value(str(metadata["format"]).upper()),
        size_bytes=int(metadata["size_bytes"]) if own_file else record.artifact_size,
        sha256=str(metadata["sha256"]) if own_file else record.artifact_sha256,
        onnx_opset=int(metadata.get("opset", 0)),
    )
    if check:
        message.check.CopyFrom(
            jobs_pb2.ExportCheck(
                samples=check["samples"],
                max_abs_difference=check["max_abs_difference"],
                tolerance=check["tolerance"],
                passed=check["passed"],
                input_shapes={name: str(shape) for name, shape in check["input_shapes"].items()},
            )
        )
    return message
