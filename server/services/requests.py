"""The AuthorizationService's request messages, checked and canonicalised in place with the
pure rules of server/domain/validation.py (which raise ``InvalidField``; the gRPC edge answers
INVALID_ARGUMENT naming the field). Every key and the payload hash are derived from the
canonical form, so a request and its re-spelt retry are the same request."""

from __future__ import annotations

from subsidy_client.v1 import authorization_pb2

from server.domain import validation
from server.domain.errors import InvalidField

LifecycleRequest = authorization_pb2.CaptureRequest | authorization_pb2.VoidRequest | authorization_pb2.RefundRequest

KNOWN_CHANNELS = frozenset(authorization_pb2.Channel.values()) - {authorization_pb2.CHANNEL_UNSPECIFIED}


def check_authorize(request: authorization_pb2.AuthorizeRequest, max_lines: int) -> authorization_pb2.AuthorizeRequest:
    """Validates an Authorize request and canonicalises it in place (returned for convenience)."""
    request.request_id = validation.canonical_request_id(request.request_id)
    request.campaign_id = validation.canonical_campaign_id(request.campaign_id)
    # Who pays (README "Which caller sends which consumer identity"): consumer_key (a partner
    # app), consumer_id_number (a till that read an ID card; keyed by the servicer), or
    # neither with a redemption code (the qualification's owner, resolved by the script).
    if request.consumer_key and request.consumer_id_number:
        raise InvalidField("consumer_id_number", "send either consumer_key or consumer_id_number, not both")
    if request.consumer_key or not (request.consumer_id_number or request.redemption_code):
        request.consumer_key = validation.canonical_consumer_key(request.consumer_key)
    if request.channel not in KNOWN_CHANNELS:
        raise InvalidField("channel", "must be CHANNEL_POS or CHANNEL_ONLINE")
    for line, (line_id, gtin, serial) in zip(
        request.lines, validation.canonical_lines(request.lines, max_lines), strict=True
    ):
        line.line_id = line_id
        line.gtin = gtin
        if serial:
            line.serial_number = serial
    if request.redemption_code:
        request.redemption_code = validation.canonical_redemption_code(request.redemption_code)
        # A qualification of a LINE-scope rule is one discount on one line, so its payment has
        # one line; a BASKET rule's covers several. Only the rule knows: authorize.lua refuses
        # the first kind with more lines (VOUCHER_NEEDS_ONE_LINE, INVALID_ARGUMENT naming lines).
    return request


def check_lifecycle(request: LifecycleRequest) -> None:
    """Canonicalises a Capture / Void / Refund request's identifiers in place."""
    request.request_id = validation.canonical_request_id(request.request_id)
    request.authorization_id = validation.canonical_authorization_id(request.authorization_id)


def check_capture(request: authorization_pb2.CaptureRequest) -> None:
    check_lifecycle(request)
    request.channel_reference = validation.canonical_channel_reference(request.channel_reference)


def check_refund(request: authorization_pb2.RefundRequest, max_lines: int) -> None:
    check_lifecycle(request)
    request.channel_reference = validation.canonical_channel_reference(request.channel_reference)
    for index, line_id in enumerate(validation.canonical_line_ids(request.line_ids, max_lines)):
        request.line_ids[index] = line_id
