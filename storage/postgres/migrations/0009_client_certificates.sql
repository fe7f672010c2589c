-- Mutual TLS per caller (issue 17, server/rpc/tls.py): a terminal or partner with
-- require_client_certificate must connect with a client certificate naming its id; the others
-- may (and a certificate, when presented, must name the caller that signed the call).
ALTER TABLE terminals ADD COLUMN require_client_certificate boolean NOT NULL DEFAULT false;
ALTER TABLE partners ADD COLUMN require_client_certificate boolean NOT NULL DEFAULT false;
