"""Whether a tracer is recording: a leaf module (it imports only torch), so that ``packing``,
``ops`` and ``modeling`` can all ask without importing one another."""

import torch

_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # (torch >= 2.6 has it)


def tracing() -> bool:
    """Whether a tracer (dynamo, export, jit.trace, fx) is recording this call: then the ops take
    their custom-op form, and the model skips its data-dependent input checks."""
    return (
        torch.compiler.is_compiling()
        or _is_exporting()
        or torch.jit.is_tracing()
        or torch.fx._symbolic_trace.is_fx_symbolic_tracing()
    )


def compiling_with_dynamic_shapes() -> bool:
    """Whether torch.compile (not torch.export, jit.trace or fx) records this call with ops of
    data-dependent output size allowed in the graph
    (``torch._dynamo.config.capture_dynamic_output_shape_ops``, off by default): only then can
    the graph pack a padded batch (its number of real tokens a symbol) without a graph break.
    (torch 2.11's ``torch.compiler.is_exporting()`` reads True under torch.compile too, so there
    this is False.)"""
    return (torch.compiler.is_compiling() and not _is_exporting()
            and torch._dynamo.config.capture_dynamic_output_shape_ops)


def onnx_exporting() -> bool:
    """Whether torch.onnx.export is recording this call (through jit.trace, or through
    torch.export for the dynamo exporter); the cheap tracer flags first, so that eager calls pay
    nanoseconds (torch.onnx.is_in_onnx_export imports on every call)."""
    return (torch.jit.is_tracing() or _is_exporting()) and torch.onnx.is_in_onnx_export()


__all__ = ["compiling_with_dynamic_shapes", "onnx_exporting", "tracing"]
