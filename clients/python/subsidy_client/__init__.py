"""Python client for the subsidy authorization gateway.

``subsidy_client.v1`` holds the generated protobuf and gRPC code (with typed stubs);
``AuthorizationClient`` is the thin typed client partner apps and terminals use.
"""

from subsidy_client.client import (
    AuthorizationClient,
    ExchangeClient,
    Line,
    QualificationClient,
    ReportingClient,
    RetryPolicy,
    SignedClient,
    TlsConfig,
    open_channel,
)
from subsidy_client.errors import SubsidyError

__all__ = [
    "AuthorizationClient",
    "ExchangeClient",
    "Line",
    "QualificationClient",
    "ReportingClient",
    "RetryPolicy",
    "SignedClient",
    "SubsidyError",
    "TlsConfig",
    "open_channel",
]
