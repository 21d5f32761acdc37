"""The descriptor pool that holds Kiln's ``inference.*`` protocol messages.

Triton's client (``tritonclient.grpc``) registers messages with the same full names (``inference.ModelInferRequest``
...) in protobuf's default pool, and a pool refuses a second definition of a name. Kiln's generated modules add
their files here instead (``make proto`` rewrites that one line of protoc's output), so a process can import
both: a test driving Kiln's server with tritonclient, or an application that serves with Kiln and calls Triton.
On the wire only names and numbers matter, and they are the same.
"""

from __future__ import annotations

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
