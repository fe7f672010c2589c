// Page texts in Chinese (the default) and English (with the report's Chinese terms), and the
// language toggle. The choice is kept in localStorage; no cookie, nothing sent to the server.
"use strict";

const TEXTS = {
  zh: {
    title: "以旧换新补贴资金监管",
    subtitle: "萧山区商务局 · 只读",
    login_title: "政府监管登录",
    login_hint: "请使用政府（只读）凭证登录：凭证编号与密钥。",
    caller_id: "凭证编号",
    secret: "密钥",
    login: "登录",
    logout: "退出",
    toggle: "English",
    error_invalid: "凭证编号或密钥不正确。",
    error_denied: "此凭证不是政府（只读）凭证，不能使用监管看板。",
    error_unavailable: "网关暂时无法连接，请稍后再试。",
    error_busy: "当前登录人数已满，请稍后再试。",
    error_expired: "会话已结束，请重新登录。",
    live_connecting: "正在连接…",
    live_live: "实时",
    live_reconnecting: "重新连接中…",
    taken_at: "数据时间",
    budgets: "预算消耗（按活动与品类）",
    budget: "预算",
    released: "已释放",
    spent: "已核销",
    reserved: "冻结中",
    refunded: "已退款",
    remaining: "剩余",
    used: "使用率",
    claims_per_minute: "领取/分钟",
    redemptions_per_minute: "核销/分钟",
    burn_per_minute: "消耗/分钟",
    exhaustion: "预计耗尽",
    not_burning: "暂无消耗",
    burn_down: "剩余预算走势",
    today: "今日数据（截至目前，T+1 口径）",
    campaign: "活动",
    category: "品类",
    consumers: "享受补贴人数",
    sales: "核销笔数",
    redeemed: "核销金额",
    order: "订单金额",
    refunds: "退款笔数",
    refunded_amount: "核销退款金额",
    clawed_back_amount: "追回金额",
    report_tickets: "投诉 受理/办结/超时",
    merchants: "核销商家数",
    district_total: "全区合计",
    top_merchants: "今日商户排行（按核销金额）",
    merchant: "商户",
    alerts: "预警",
    no_alerts: "暂无预警",
    reports: "已发布日报",
    business_date: "业务日期",
    cut_at: "生成时间",
    rows: "行数",
    content_hash: "内容哈希",
    download: "下载",
    csv_rows: "明细 CSV",
    csv_budgets: "预算 CSV",
    xlsx: "Excel",
    none: "暂无",
    unavailable: "暂不可用",
    alert_threshold: "{subject} 预算使用已达 {threshold}%（当前 {observed}%）",
    alert_surge: "商户 {merchant} 近一小时补贴销售 {observed}，远高于其基线 {baseline}",
    reconciliation: "账单核对（支付渠道结算文件）",
    channel: "渠道",
    file: "文件",
    file_lines: "文件行数",
    matched: "一致",
    exceptions: "异常",
    channel_net: "渠道补贴净额",
    ledger_net: "台账补贴净额",
    show_exceptions: "查看异常",
    exceptions_of: "异常明细：",
    status: "状态",
    line: "行号",
    channel_txn: "渠道交易号",
    authorization: "授权编号",
    channel_subsidy: "渠道补贴",
    ledger_subsidy: "台账补贴",
    difference: "差额",
    truncated: "仅显示前 {count} 行，完整内容请下载。",
    complaints: "投诉受理（消费者与商户工单）",
    tickets_opened: "新增工单",
    tickets_resolved: "已解决",
    tickets_rejected: "已驳回",
    tickets_overdue: "超时",
    tickets_opened_today: "今日新增",
    tickets_resolved_today: "今日解决",
    tickets_overdue_today: "今日新增中超时",
    tickets_open_now: "待处理积压",
    tickets_overdue_now: "积压中超时",
    RECONCILIATION_STATUS_MATCHED: "一致",
    RECONCILIATION_STATUS_AMOUNT_MISMATCH: "金额不符",
    RECONCILIATION_STATUS_MISSING_IN_LEDGER: "台账缺失",
    RECONCILIATION_STATUS_MISSING_IN_CHANNEL: "渠道缺失",
    RECONCILIATION_STATUS_DUPLICATE_IN_FILE: "文件重复",
    RECONCILIATION_STATUS_BAD_LINE: "格式错误",
  },
  en: {
    title: "Trade-in subsidy fund supervision",
    subtitle: "Xiaoshan District Commerce Bureau · read-only",
    login_title: "Government sign-in",
    login_hint: "Sign in with a government (read-only) credential: its id and secret.",
    caller_id: "Credential id",
    secret: "Secret",
    login: "Sign in",
    logout: "Sign out",
    toggle: "中文",
    error_invalid: "Unknown credential id or wrong secret.",
    error_denied: "This is not a government (read-only) credential; the dashboard is not for it.",
    error_unavailable: "The gateway does not answer; try again shortly.",
    error_busy: "Too many people are signed in; try again shortly.",
    error_expired: "Your session ended; sign in again.",
    live_connecting: "Connecting…",
    live_live: "Live",
    live_reconnecting: "Reconnecting…",
    taken_at: "As of",
    budgets: "Budget burn-down by campaign and category",
    budget: "Budget",
    released: "Released",
    spent: "Spent (已核销)",
    reserved: "Reserved",
    refunded: "Refunded",
    remaining: "Remaining",
    used: "Used",
    claims_per_minute: "Claims/min",
    redemptions_per_minute: "Redemptions/min",
    burn_per_minute: "Burn/min",
    exhaustion: "Projected exhaustion",
    not_burning: "not burning",
    burn_down: "Remaining budget over time",
    today: "Today so far (T+1 figures)",
    campaign: "Campaign",
    category: "Category",
    consumers: "Consumers",
    sales: "Sales",
    redeemed: "Redeemed (核销金额)",
    order: "Order amount (订单金额)",
    refunds: "Refunds",
    refunded_amount: "Refunded (核销退款金额)",
    clawed_back_amount: "Clawed back (追回金额)",
    report_tickets: "Tickets opened / resolved / overdue",
    merchants: "Merchants (核销商家数)",
    district_total: "District total (全区合计)",
    top_merchants: "Top merchants today (by redeemed subsidy)",
    merchant: "Merchant",
    alerts: "Alerts",
    no_alerts: "No alerts",
    reports: "Published daily reports",
    business_date: "Business day",
    cut_at: "Cut at",
    rows: "Rows",
    content_hash: "Content hash",
    download: "Download",
    csv_rows: "Rows CSV",
    csv_budgets: "Budgets CSV",
    xlsx: "Excel",
    none: "none",
    unavailable: "unavailable",
    alert_threshold: "{subject}: budget use reached {threshold}% (now {observed}%)",
    alert_surge: "Merchant {merchant}: subsidised sales in the last hour {observed}, far above its baseline {baseline}",
    reconciliation: "Bill reconciliation (账单核对) with the payment channels",
    channel: "Channel",
    file: "File",
    file_lines: "File lines",
    matched: "Matched",
    exceptions: "Exceptions",
    channel_net: "Channel net subsidy",
    ledger_net: "Ledger net subsidy",
    show_exceptions: "Show exceptions",
    exceptions_of: "Exceptions of run",
    status: "Status",
    line: "Line",
    channel_txn: "Channel txn id",
    authorization: "Authorization",
    channel_subsidy: "Channel subsidy",
    ledger_subsidy: "Ledger subsidy",
    difference: "Difference",
    truncated: "The first {count} lines only; download the file for all.",
    complaints: "Complaints desk (投诉受理): consumer and merchant tickets",
    tickets_opened: "Opened",
    tickets_resolved: "Resolved",
    tickets_rejected: "Rejected",
    tickets_overdue: "Overdue",
    tickets_opened_today: "Opened today",
    tickets_resolved_today: "Resolved today",
    tickets_overdue_today: "Of today's, overdue",
    tickets_open_now: "Open backlog",
    tickets_overdue_now: "Of the backlog, overdue",
    RECONCILIATION_STATUS_MATCHED: "matched",
    RECONCILIATION_STATUS_AMOUNT_MISMATCH: "amount mismatch",
    RECONCILIATION_STATUS_MISSING_IN_LEDGER: "missing in ledger",
    RECONCILIATION_STATUS_MISSING_IN_CHANNEL: "missing in channel",
    RECONCILIATION_STATUS_DUPLICATE_IN_FILE: "duplicate in file",
    RECONCILIATION_STATUS_BAD_LINE: "bad line",
  },
};

const CATEGORIES = {
  zh: { fridge: "冰箱", washer: "洗衣机", tv: "电视", phone: "手机", air_conditioner: "空调", dishwasher: "洗碗机",
        computer: "电脑", general: "通用消费券" },
  en: {},
};

function language() {
  const chosen = window.localStorage.getItem("dashboard-language");
  return chosen === "en" ? "en" : "zh";
}

function t(key, values) {
  let text = TEXTS[language()][key] ?? key;
  for (const [name, value] of Object.entries(values || {})) text = text.replaceAll(`{${name}}`, String(value));
  return text;
}

function categoryName(category) {
  return CATEGORIES[language()][category] ?? category;
}

function applyTexts(root) {
  document.documentElement.lang = language() === "zh" ? "zh-CN" : "en";
  for (const element of (root || document).querySelectorAll("[data-i18n]")) {
    element.textContent = t(element.dataset.i18n);
  }
  document.title = t("title");
}

function installToggle(onChange) {
  const button = document.getElementById("lang-toggle");
  button.addEventListener("click", () => {
    window.localStorage.setItem("dashboard-language", language() === "zh" ? "en" : "zh");
    applyTexts();
    if (onChange) onChange();
  });
  applyTexts();
}

// Yuan text from the server (exact, computed from integer fen) with thousands separators.
function formatYuan(amount) {
  const text = amount.yuan;
  const negative = text.startsWith("-");
  const [whole, cents] = (negative ? text.slice(1) : text).split(".");
  const grouped = whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  return `${negative ? "-" : ""}¥${grouped}.${cents}`;
}
