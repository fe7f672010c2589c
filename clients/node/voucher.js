#!/usr/bin/env node
'use strict';
// A partner app claims a voucher for a consumer, a till redeems it; one JSON line per step.
//
//   node voucher.js <credentials.json> [campaign] [gtin] [unit_price_fen]
//
// credentials.json: the file `make run` writes to .keys/credentials.json (its first partner app
// and first terminal are used). The consumer's ID number is made up, valid and new each run.

const crypto = require('node:crypto');
const fs = require('node:fs');
const { createClient } = require('./subsidy-client');

/** A well-formed resident ID number: Xiaoshan region code, a birth date, a sequence, and the
 * GB 11643 check character. */
function madeUpIdNumber() {
  const born = new Date(Date.UTC(1960, 0, 1) + crypto.randomInt(365 * 40) * 86_400_000);
  const first =
    '330109' + born.toISOString().slice(0, 10).replaceAll('-', '') + String(crypto.randomInt(1000)).padStart(3, '0');
  const weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
  const sum = [...first].reduce((total, digit, index) => total + Number(digit) * weights[index], 0);
  return first + '10X98765432'[sum % 11];
}

async function main() {
  const [credentialsPath, campaignId = 'demo-vouchers-xiaoshan', gtin = '6901234000061', price = '2580'] =
    process.argv.slice(2);
  if (!credentialsPath) throw new Error('usage: node voucher.js <credentials.json> [campaign] [gtin] [unit_price_fen]');
  const credentials = JSON.parse(fs.readFileSync(credentialsPath, 'utf8'));
  const [partnerId, partnerSecret] = Object.entries(credentials.partners)[0];
  const [terminalId, terminalSecret] = Object.entries(credentials.terminals)[0];
  const app = createClient({ target: credentials.target, terminalId: partnerId, secret: partnerSecret });
  const till = createClient({ target: credentials.target, terminalId, secret: terminalSecret });
  try {
    // The phone is at the Xiaoshan District government, as AMap reports it (GCJ-02).
    const claimed = await app.claimQualification({
      campaign_id: campaignId,
      category: 'general',
      consumer: { id_number: madeUpIdNumber() },
      device_location: {
        location: { latitude: 30.177543, longitude: 120.264463, coordinate_system: 'COORDINATE_SYSTEM_GCJ02', accuracy_m: 15 },
        fix_time: { seconds: Math.floor(Date.now() / 1000), nanos: 0 },
        mock_location: false,
      },
    });
    const { decision, decline_reason, qualification } = claimed;
    console.log(JSON.stringify({ step: 'claim', decision, decline_reason, state: qualification && qualification.state }));
    if (decision !== 'CLAIM_DECISION_ISSUED') throw new Error(`not issued: ${decline_reason}`);

    const paid = await till.authorize({
      campaign_id: campaignId,
      consumer_key: qualification.consumer_key,
      channel: 'CHANNEL_POS',
      lines: [{ line_id: '1', gtin, unit_price_fen: Number(price), serial_number: '' }],
      redemption_code: qualification.redemption_code,
    });
    console.log(JSON.stringify({ step: 'redeem', decision: paid.decision, subsidy_fen: paid.subsidy_fen }));
    if (paid.decision !== 'DECISION_APPROVED') throw new Error(`not approved: ${paid.decline_reason}`);

    const held = await app.getQualification(qualification.redemption_code);
    console.log(JSON.stringify({ step: 'get', state: held.state, authorization_id: held.authorization_id }));

    // The sale completes: the capture makes the voucher used.
    await till.capture(paid.authorization_id);
    const used = await app.getQualification(qualification.redemption_code);
    console.log(JSON.stringify({ step: 'capture', state: used.state }));
  } finally {
    app.close();
    till.close();
  }
}

main().catch((error) => {
  const { code, codeName, reason, details, metadata } = error;
  console.error(JSON.stringify({ error: error.message, code, codeName, reason, details, metadata }));
  process.exitCode = 1;
});
