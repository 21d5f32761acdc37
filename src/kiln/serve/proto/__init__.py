"""KServe V2 gRPC protocol messages (``inference.*``), wire-compatible with Triton's, and their conversions.

``grpc_service.proto`` and ``model_config.proto`` are the source; ``*_pb2.py`` and ``*_pb2.pyi`` are generated
from them by ``make proto`` (grpcio-tools) and shipped, so installing Kiln needs no protobuf compiler. The
generated modules register their messages in a private descriptor pool (``_pool``), so they load beside
``tritonclient.grpc``'s identically named ones. No gRPC import here: only ``kiln.serve.grpc`` imports grpc.
"""
