"""Generated gRPC stubs for ``edgephi.v1`` (built from ``protos/edgephi/v1`` by ``hatch_build.py``)."""
