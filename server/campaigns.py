"""CampaignService: create, update and read campaigns; live budget status."""

from __future__ import annotations

from subsidy_client.v1 import campaign_pb2_grpc

from server.operations import OperatorDeps


class CampaignService(campaign_pb2_grpc.CampaignServiceServicer):
    def __init__(self, deps: OperatorDeps) -> None:
        self._deps = deps
