-- Onboarding without YAML (issue 13, item 9): partner, provider, operator, government and
-- auditor credentials are created, rotated and suspended through CredentialService.
--
-- managed_by_api: set by the first CredentialService action on the credential. From then on
-- a reference file load leaves the row alone (status, secret, role or kind, name), so a file
-- cannot silently reactivate a credential suspended through the API, nor bring back a secret
-- rotated away. The audit trail of those actions is operator_actions, as for every operator call.
ALTER TABLE operators ADD COLUMN managed_by_api boolean NOT NULL DEFAULT false;
ALTER TABLE partners ADD COLUMN managed_by_api boolean NOT NULL DEFAULT false;
