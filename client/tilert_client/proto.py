"""The generated messages and service stubs, under short stable names.

Everything else (this SDK and the server) imports them from here rather than from
the generated module path, so a change of code-generation layout touches one file.
"""

from tilert_client._proto.tilert.v1 import text_generation_pb2 as pb
from tilert_client._proto.tilert.v1 import text_generation_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TextGeneration"].full_name

__all__ = ["SERVICE_NAME", "pb", "pb_grpc"]
