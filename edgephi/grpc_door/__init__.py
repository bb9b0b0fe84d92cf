"""The gRPC front door (``edgephi.v1.InferenceService``): proto ⇄ domain conversion (:mod:`.messages`), the
servicer (:mod:`.servicer`), one table from domain error to status (:mod:`.status`), the interceptors
(:mod:`.interceptors`) and the server with health, reflection and TLS (:mod:`.server`).

The only package besides the daemon's wiring that imports grpc; the core (:mod:`edgephi.service`) knows no
transport.
"""
