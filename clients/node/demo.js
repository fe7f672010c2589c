#!/usr/bin/env node
'use strict';
// Authorize one line, capture it, read it back; one JSON line per step.
//
//   node demo.js <credentials.json> [campaign] [gtin] [unit_price_fen]
//
// credentials.json: {"target": "127.0.0.1:50051", "terminals": {"<terminal id>": "<secret>", ...}}
// (the file `make run` writes to .keys/credentials.json). The first terminal is used.

const crypto = require('node:crypto');
const fs = require('node:fs');
const { createClient } = require('./subsidy-client');

async function main() {
  const [credentialsPath, campaignId = 'demo-tradein-2026', gtin = '6901234000016', price = '459900'] =
    process.argv.slice(2);
  if (!credentialsPath) throw new Error('usage: node demo.js <credentials.json> [campaign] [gtin] [unit_price_fen]');
  const credentials = JSON.parse(fs.readFileSync(credentialsPath, 'utf8'));
  const [terminalId, secret] = Object.entries(credentials.terminals)[0];
  const client = createClient({ target: credentials.target, terminalId, secret });
  try {
    const authorized = await client.authorize({
      request_id: crypto.randomUUID(),
      campaign_id: campaignId,
      consumer_key: crypto.randomBytes(32).toString('hex'),
      channel: 'CHANNEL_POS',
      lines: [
        {
          line_id: '1',
          gtin,
          unit_price_fen: Number(price),
          serial_number: 'SN' + crypto.randomBytes(8).toString('hex').toUpperCase(),
        },
      ],
    });
    const { decision, authorization_id, subsidy_fen, payable_fen, decline_reason } = authorized;
    console.log(JSON.stringify({ step: 'authorize', decision, authorization_id, subsidy_fen, payable_fen, decline_reason }));
    if (decision !== 'DECISION_APPROVED') throw new Error(`not approved: ${decline_reason}`);

    const captured = (await client.capture(authorization_id)).authorization;
    console.log(JSON.stringify({ step: 'capture', state: captured.state, subsidy_fen: captured.subsidy_fen }));

    const read = await client.getAuthorization(authorization_id);
    console.log(JSON.stringify({ step: 'get', state: read.state, subsidy_fen: read.subsidy_fen }));
    if (read.state !== 'AUTHORIZATION_STATE_CAPTURED') throw new Error(`unexpected state ${read.state}`);
  } finally {
    client.close();
  }
}

main().catch((error) => {
  const { code, codeName, reason, details, metadata } = error;
  console.error(JSON.stringify({ error: error.message, code, codeName, reason, details, metadata }));
  process.exitCode = 1;
});
