"""MerchantService: merchants, stores, terminals and their credentials."""

from __future__ import annotations

from subsidy_client.v1 import merchant_pb2_grpc

from server.operations import OperatorDeps


class MerchantService(merchant_pb2_grpc.MerchantServiceServicer):
    def __init__(self, deps: OperatorDeps) -> None:
        self._deps = deps
