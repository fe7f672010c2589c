// Charts drawn in the page as inline SVG (no library): a stacked budget bar, a burn-down line
// and horizontal bars for the top merchants.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function svgElement(name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  if (text !== undefined) element.textContent = text;
  return element;
}

// Budget as one bar: net spent, reserved, what is left; a tick where the released part ends.
function budgetBar(budget) {
  const width = 400, height = 18;
  const total = Math.max(budget.budget.fen, 1);
  const spent = Math.max(budget.spent.fen, 0); // net of refunds already
  const reserved = Math.max(budget.reserved.fen, 0);
  const svg = svgElement("svg", { viewBox: `0 0 ${width} ${height}`, class: "bar", role: "img" });
  svg.append(svgElement("rect", { x: 0, y: 0, width, height, class: "bar-rest" }));
  const spentWidth = (width * Math.min(spent, total)) / total;
  const reservedWidth = (width * Math.min(reserved, total - Math.min(spent, total))) / total;
  svg.append(svgElement("rect", { x: 0, y: 0, width: spentWidth, height, class: "bar-spent" }));
  svg.append(svgElement("rect", { x: spentWidth, y: 0, width: reservedWidth, height, class: "bar-reserved" }));
  if (budget.released.fen < budget.budget.fen) {
    const x = (width * budget.released.fen) / total;
    svg.append(svgElement("line", { x1: x, x2: x, y1: 0, y2: height, class: "bar-released" }));
  }
  return svg;
}

// Remaining budget over the snapshots seen since the page opened (solid), and on to zero at
// the projected exhaustion time (dashed) when the poller projects one.
function burnDown(points, budgetFen, exhaustionAt) {
  const width = 400, height = 120, pad = 4;
  const svg = svgElement("svg", { viewBox: `0 0 ${width} ${height}`, class: "burn", role: "img" });
  svg.append(svgElement("rect", { x: 0, y: 0, width, height, class: "burn-frame" }));
  if (points.length === 0) return svg;
  const start = points[0].at;
  let end = Math.max(points[points.length - 1].at, start + 60_000);
  const exhaustion = exhaustionAt ? Date.parse(exhaustionAt) : null;
  if (exhaustion && exhaustion > end) end = Math.min(exhaustion, end + 24 * 3_600_000);
  const top = Math.max(budgetFen, 1);
  const x = (at) => pad + ((width - 2 * pad) * (at - start)) / (end - start);
  const y = (fen) => height - pad - ((height - 2 * pad) * Math.max(fen, 0)) / top;
  const path = points.map((point, index) => `${index ? "L" : "M"}${x(point.at).toFixed(1)},${y(point.fen).toFixed(1)}`);
  svg.append(svgElement("path", { d: path.join(" "), class: "burn-line" }));
  const last = points[points.length - 1];
  if (exhaustion && exhaustion > last.at) {
    const d = `M${x(last.at).toFixed(1)},${y(last.fen).toFixed(1)} L${x(Math.min(exhaustion, end)).toFixed(1)},${y(0)}`;
    svg.append(svgElement("path", { d, class: "burn-projection" }));
  }
  svg.append(svgElement("circle", { cx: x(last.at), cy: y(last.fen), r: 3, class: "burn-point" }));
  return svg;
}

// One bar per merchant, scaled to the largest redeemed amount, labelled with its yuan text.
function merchantBars(merchants) {
  const rowHeight = 22, width = 400, labelWidth = 150;
  const height = Math.max(merchants.length, 1) * rowHeight;
  const svg = svgElement("svg", { viewBox: `0 0 ${width} ${height}`, class: "merchant-bars", role: "img" });
  const largest = Math.max(1, ...merchants.map((merchant) => merchant.redeemed.fen));
  merchants.forEach((merchant, index) => {
    const top = index * rowHeight;
    const barWidth = ((width - labelWidth - 90) * merchant.redeemed.fen) / largest;
    svg.append(svgElement("text", { x: 0, y: top + 15, class: "bar-label" }, merchant.merchant_name || merchant.merchant_id));
    svg.append(svgElement("rect", { x: labelWidth, y: top + 4, width: barWidth, height: 14, class: "bar-spent" }));
    svg.append(svgElement("text", { x: labelWidth + barWidth + 4, y: top + 15, class: "bar-value" }, formatYuan(merchant.redeemed)));
  });
  return svg;
}
