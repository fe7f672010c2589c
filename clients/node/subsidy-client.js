'use strict';
// A minimal client for subsidy.v1.AuthorizationService (terminals) and
// subsidy.v1.QualificationService (partner apps), built from protos/ at runtime (no generated
// code). Every call is signed over its exact request bytes, so this module
// serializes each request itself, signs the bytes and hands them to grpc-js unchanged.

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTOS = path.resolve(__dirname, '../../protos');
const SERVICE = 'subsidy.v1.AuthorizationService';
const QUALIFICATIONS = 'subsidy.v1.QualificationService';

// keepCase: fields keep their proto names (request_id, unit_price_fen, ...).
// longs: Number is exact for fen amounts below 2^53. google/protobuf/timestamp.proto comes
// from proto-loader's bundled well-known types.
const definition = protoLoader.loadSync(['subsidy/v1/authorization.proto', 'subsidy/v1/qualification.proto'], {
  includeDirs: [PROTOS],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
});
const methods = { ...definition[SERVICE], ...definition[QUALIFICATIONS] };

// google.rpc.Status, ErrorInfo and BadRequest (public googleapis messages, not bundled with
// proto-loader), declared here to decode the grpc-status-details-bin trailer.
const rpc = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        rpc: {
          nested: {
            Any: { fields: { type_url: { type: 'string', id: 1 }, value: { type: 'bytes', id: 2 } } },
            Status: {
              fields: {
                code: { type: 'int32', id: 1 },
                message: { type: 'string', id: 2 },
                details: { rule: 'repeated', type: 'Any', id: 3 },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: 'string', id: 1 },
                domain: { type: 'string', id: 2 },
                metadata: { keyType: 'string', type: 'string', id: 3 },
              },
            },
            BadRequest: {
              fields: { field_violations: { rule: 'repeated', type: 'FieldViolation', id: 1 } },
              nested: {
                FieldViolation: {
                  fields: { field: { type: 'string', id: 1 }, description: { type: 'string', id: 2 } },
                },
              },
            },
          },
        },
      },
    },
  },
});
const Status = rpc.lookupType('google.rpc.Status');
const ErrorInfo = rpc.lookupType('google.rpc.ErrorInfo');
const BadRequest = rpc.lookupType('google.rpc.BadRequest');
const ERROR_INFO_URL = 'type.googleapis.com/google.rpc.ErrorInfo';
const BAD_REQUEST_URL = 'type.googleapis.com/google.rpc.BadRequest';
const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

/** A failed call: `code` (numeric gRPC status), `codeName`, `reason` (ErrorInfo reason, e.g.
 * INVALID_FIELD), `details` (server message), `metadata` (ErrorInfo metadata),
 * `fieldViolations` (the google.rpc.BadRequest's [{field, description}], for an invalid field)
 * and `field` (the invalid field's path, e.g. lines[0].gtin, or ''). */
class SubsidyError extends Error {
  constructor(code, reason, details, metadata, fieldViolations = []) {
    const codeName = CODE_NAMES[code] || String(code);
    super(`${codeName} ${reason}: ${details}`);
    this.name = 'SubsidyError';
    this.code = code;
    this.codeName = codeName;
    this.reason = reason;
    this.details = details;
    this.metadata = metadata;
    this.fieldViolations = fieldViolations;
    this.field = fieldViolations.length ? fieldViolations[0].field : metadata.field || '';
  }
}

function toSubsidyError(error) {
  let reason = CODE_NAMES[error.code] || String(error.code);
  let metadata = {};
  const violations = [];
  const [raw] = (error.metadata && error.metadata.get('grpc-status-details-bin')) || [];
  if (raw) {
    for (const detail of Status.decode(raw).details) {
      if (detail.type_url === ERROR_INFO_URL) {
        const info = ErrorInfo.decode(detail.value);
        reason = info.reason;
        metadata = { ...info.metadata };
      } else if (detail.type_url === BAD_REQUEST_URL) {
        for (const { field, description } of BadRequest.decode(detail.value).field_violations) {
          violations.push({ field, description });
        }
      }
    }
  }
  return new SubsidyError(error.code, reason, error.details || '', metadata, violations);
}

/** The signature recipe (see clients/python/subsidy_client/signing.py). */
function signedMetadata(secret, fullMethod, terminalId, body) {
  const timestamp = String(Date.now());
  const nonce = crypto.randomBytes(18).toString('base64url'); // 24 chars of [A-Za-z0-9_-]
  const bodyDigest = crypto.createHash('sha256').update(body).digest('hex');
  const message = `${fullMethod}\n${terminalId}\n${timestamp}\n${nonce}\n${bodyDigest}`;
  const metadata = new grpc.Metadata();
  metadata.set('x-subsidy-terminal', terminalId);
  metadata.set('x-subsidy-timestamp', timestamp);
  metadata.set('x-subsidy-nonce', nonce);
  metadata.set('x-subsidy-signature', crypto.createHmac('sha256', Buffer.from(secret, 'utf8')).update(message).digest('hex'));
  return metadata;
}

// TLS to the gateway. tls: { caFile, certFile, keyFile } (PEM files): caFile is the CA that
// signed the gateway's certificate (omitted: the system's roots); certFile and keyFile are this
// caller's client certificate for mutual TLS (it must name the caller id that signs the calls).
// Without the option, the environment decides: SUBSIDY_GATEWAY_CA (a CA file) turns TLS on, and
// SUBSIDY_CLIENT_CERTS (a folder of <caller id>.pem and .key, as `make certs` writes in
// .certs/clients) adds the caller's certificate. Neither: plaintext (loopback development).
function channelCredentials(tls, callerId) {
  const read = (file) => (file ? fs.readFileSync(file) : null);
  let settings = tls;
  if (settings === undefined) {
    const ca = process.env.SUBSIDY_GATEWAY_CA;
    const folder = process.env.SUBSIDY_CLIENT_CERTS;
    if (!ca && !folder) return grpc.credentials.createInsecure();
    settings = { caFile: ca };
    if (folder) Object.assign(settings, { certFile: path.join(folder, `${callerId}.pem`), keyFile: path.join(folder, `${callerId}.key`) });
  }
  if (!settings) return grpc.credentials.createInsecure();
  if (Boolean(settings.certFile) !== Boolean(settings.keyFile)) throw new Error('tls: certFile and keyFile go together');
  return grpc.credentials.createSsl(read(settings.caFile), read(settings.keyFile), read(settings.certFile));
}

/** tls: see channelCredentials; null forces plaintext whatever the environment says. */
function createClient({ target, terminalId, secret, deadlineMs = 5000, tls = undefined }) {
  const client = new grpc.Client(target, channelCredentials(tls, terminalId));

  function call(name, request) {
    const method = methods[name];
    const body = method.requestSerialize(request); // the exact bytes that are signed and sent
    const metadata = signedMetadata(secret, method.path, terminalId, body);
    return new Promise((resolve, reject) => {
      client.makeUnaryRequest(
        method.path,
        (bytes) => bytes,
        method.responseDeserialize,
        body,
        metadata,
        { deadline: Date.now() + deadlineMs },
        (error, response) => (error ? reject(toSubsidyError(error)) : resolve(response)),
      );
    });
  }

  return {
    /** request: an AuthorizeRequest as a plain object with proto field names. */
    authorize: (request) => call('Authorize', { request_id: crypto.randomUUID(), ...request }),
    capture: (authorizationId, requestId = crypto.randomUUID()) =>
      call('Capture', { request_id: requestId, authorization_id: authorizationId }),
    getAuthorization: (authorizationId) =>
      call('GetAuthorization', { authorization_id: authorizationId }).then((response) => response.authorization),
    /** For partner apps. request: a ClaimQualificationRequest as a plain object (the ID number
     * in consumer.id_number; the gateway turns it into the consumer key). */
    claimQualification: (request) => call('ClaimQualification', { request_id: crypto.randomUUID(), ...request }),
    getQualification: (redemptionCode) =>
      call('GetQualification', { redemption_code: redemptionCode }).then((response) => response.qualification),
    close: () => client.close(),
  };
}

module.exports = { createClient, channelCredentials, signedMetadata, SubsidyError };
