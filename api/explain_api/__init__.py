"""What the client and the server share: the ``explain.v1`` stubs and the grounding dataset format.

- :mod:`.explain_pb2`, :mod:`.explain_pb2_grpc`: protobuf and gRPC stubs generated from
  ``proto/explain/v1/explain.proto`` (``make proto``; never edited by hand).
- :mod:`.summary`: ``ExplanationSummary`` computed from an explanation's tensors (the server
  fills every response with it; a client can recompute it), and its message conversions.
- :mod:`.grounding`: the grounding dataset format, which the server's ``shapes-scenes`` writes
  and the client's ``explain-eval`` reads.
"""
