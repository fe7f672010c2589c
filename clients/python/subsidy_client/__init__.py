"""Python client for the subsidy authorization gateway.

``subsidy_client.v1`` holds the generated protobuf and gRPC code (with typed stubs);
``AuthorizationClient`` is the thin typed client terminals use, ``QualificationClient`` partner
apps', ``ExchangeClient`` other providers', ``MerchantClient``, ``CredentialClient`` and
``ReportingClient`` operators';
``subsidy_client.errors`` the exceptions, one class per ErrorInfo reason.
"""

from subsidy_client.client import (
    AuthorizationClient,
    CredentialClient,
    ExchangeClient,
    Line,
    MerchantClient,
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
    "CredentialClient",
    "ExchangeClient",
    "Line",
    "MerchantClient",
    "QualificationClient",
    "ReportingClient",
    "RetryPolicy",
    "SignedClient",
    "SubsidyError",
    "TlsConfig",
    "open_channel",
]
