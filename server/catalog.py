"""CatalogService: the eligible-product catalog (import, get, list, deactivate)."""

from __future__ import annotations

from subsidy_client.v1 import catalog_pb2_grpc

from server.operations import OperatorDeps


class CatalogService(catalog_pb2_grpc.CatalogServiceServicer):
    def __init__(self, deps: OperatorDeps) -> None:
        self._deps = deps
