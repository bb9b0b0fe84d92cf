"""edgephi: a private Phi-4 (W4A16) server for an edge box — streaming gRPC over vLLM's async engine."""

__version__ = "0.1.0"
