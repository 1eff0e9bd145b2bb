"""hvm.trace: exit records, the tracer, and the summary / Perfetto / plot views of a trace file."""
from hvm.trace.record import ExitRecord
from hvm.trace.tracer import TraceConfig, Tracer

__all__ = ["ExitRecord", "TraceConfig", "Tracer"]
