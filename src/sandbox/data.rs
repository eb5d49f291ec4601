//! The sandbox's billing data: invoices, their line items and the summaries built from them,
//! generated once from the seed so that every run with the same seed serves the same bytes.
//!
//! Money is held in minor units (cents; whole yen for JPY) so that sums are exact: the line items'
//! `totalForCustomer` add up to their invoice's `totalCharges`, and a currency's `balanceAmount`
//! is the sum of `totalCharges - paidAmount` over its invoices, split by `invoiceType` in
//! `details`. Field names and JSON types follow the Partner Center docs' examples (reference §5).

use std::collections::HashSet;

use serde_json::{json, Value};

/// The "no date" sentinel the real API writes (reference §5.1).
const NO_DATE: &str = "0001-01-01T00:00:00";

/// The newest invoice date; older invoices step back from here. Fixed, never the wall clock.
const ANCHOR: (i64, u32, u32) = (2024, 5, 16);

/// Days between consecutive invoices (plus up to three days of jitter, so dates stay ordered).
const INVOICE_SPACING_DAYS: i64 = 12;

/// A currency the sandbox bills in.
#[derive(Debug)]
pub struct Currency {
    /// ISO 4217 code (`USD`).
    pub code: &'static str,
    /// Symbol as the API writes it (`$`).
    pub symbol: &'static str,
    /// Minor units per major unit: 100 for cents, 1 for yen.
    pub minor: i64,
    /// How much larger amounts are than in USD, so yen totals look like yen.
    scale: i64,
}

/// The currencies generated; the first is the primary one served by `/v1/invoices/summary`.
pub static CURRENCIES: [Currency; 4] = [
    Currency {
        code: "USD",
        symbol: "$",
        minor: 100,
        scale: 1,
    },
    Currency {
        code: "EUR",
        symbol: "€",
        minor: 100,
        scale: 1,
    },
    Currency {
        code: "GBP",
        symbol: "£",
        minor: 100,
        scale: 1,
    },
    Currency {
        code: "JPY",
        symbol: "¥",
        minor: 1,
        scale: 150,
    },
];

impl Currency {
    /// An amount in minor units as the JSON number the API writes.
    pub fn amount(&self, minor_units: i64) -> Value {
        if self.minor == 1 {
            json!(minor_units)
        } else {
            json!(minor_units as f64 / self.minor as f64)
        }
    }

    /// An amount for humans (the PDF): `1234.50 USD`.
    pub fn display(&self, minor_units: i64) -> String {
        if self.minor == 1 {
            format!("{minor_units} {}", self.code)
        } else {
            let sign = if minor_units < 0 { "-" } else { "" };
            let abs = minor_units.abs();
            format!(
                "{sign}{}.{:02} {}",
                abs / self.minor,
                abs % self.minor,
                self.code
            )
        }
    }
}

/// Whether an invoice bills subscriptions or one-time purchases (`invoiceType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvoiceType {
    /// Legacy licence-based (Office) billing.
    Recurring,
    /// Modern commerce and one-time purchases.
    OneTime,
}

impl InvoiceType {
    /// The value of `invoiceType`.
    pub fn as_str(self) -> &'static str {
        match self {
            InvoiceType::Recurring => "Recurring",
            InvoiceType::OneTime => "OneTime",
        }
    }

    /// `billingProvider` of the invoice's details and line items.
    fn billing_provider(self) -> &'static str {
        match self {
            InvoiceType::Recurring => "office",
            InvoiceType::OneTime => "one_time",
        }
    }

    /// The provider segment of the legacy line-item link.
    fn provider_segment(self) -> &'static str {
        match self {
            InvoiceType::Recurring => "Office",
            InvoiceType::OneTime => "OneTime",
        }
    }

    /// `attributes.objectType` of the line items.
    fn line_item_object_type(self) -> &'static str {
        match self {
            InvoiceType::Recurring => "LicenseBasedLineItem",
            InvoiceType::OneTime => "OneTimeInvoiceLineItem",
        }
    }
}

/// One generated invoice.
#[derive(Debug)]
pub struct Invoice {
    /// `D0200…` for Recurring, `G…` for OneTime, as in the docs' examples.
    pub id: String,
    /// Recurring or OneTime.
    pub invoice_type: InvoiceType,
    /// The currency of every amount on the invoice.
    pub currency: &'static Currency,
    /// Invoice date, in days since 1970-01-01.
    pub date: i64,
    /// Total charges in minor units: the sum of the line items.
    pub total_charges: i64,
    /// Amount paid in minor units.
    pub paid_amount: i64,
    /// The one tax receipt's id.
    pub receipt_id: String,
    /// The line items, in order.
    pub line_items: Vec<LineItem>,
}

/// One billing line item.
#[derive(Debug)]
pub struct LineItem {
    customer: usize,
    product: usize,
    order_id: String,
    subscription_id: String,
    quantity: i64,
    subtotal: i64,
    tax: i64,
}

impl LineItem {
    /// `totalForCustomer` in minor units.
    pub fn total(&self) -> i64 {
        self.subtotal + self.tax
    }
}

struct Customer {
    id: String,
    name: &'static str,
    domain: &'static str,
    country: &'static str,
}

const CUSTOMER_NAMES: [(&str, &str, &str); 5] = [
    ("Contoso Ltd", "contoso.onmicrosoft.com", "US"),
    ("Fabrikam Inc", "fabrikam.onmicrosoft.com", "US"),
    ("Northwind Traders", "northwind.onmicrosoft.com", "GB"),
    ("Tailspin Toys", "tailspintoys.onmicrosoft.com", "DE"),
    ("Wingtip Toys", "wingtiptoys.onmicrosoft.com", "JP"),
];

/// (productId, skuId, productName, skuName, publisherName, chargeType)
const PRODUCTS: [(&str, &str, &str, &str, &str, &str); 6] = [
    (
        "CFQ7TTC0LF8Q",
        "0001",
        "Microsoft 365 Business Premium",
        "Microsoft 365 Business Premium",
        "Microsoft Corporation",
        "new",
    ),
    (
        "CFQ7TTC0LFLZ",
        "0002",
        "Microsoft 365 E3",
        "Microsoft 365 E3",
        "Microsoft Corporation",
        "renew",
    ),
    (
        "DZH318Z0BPS6",
        "0001",
        "Azure plan",
        "Azure plan",
        "Microsoft Corporation",
        "usageCharge",
    ),
    (
        "CFQ7TTC0LH18",
        "0001",
        "Dynamics 365 Sales Enterprise",
        "Dynamics 365 Sales Enterprise",
        "Microsoft Corporation",
        "cycleCharge",
    ),
    (
        "CFQ7TTC0HDB0",
        "0008",
        "Windows 365 Enterprise",
        "Windows 365 Enterprise 2 vCPU, 8 GB, 128 GB",
        "Microsoft Corporation",
        "new",
    ),
    (
        "DG7GMGF0DVT4",
        "0003",
        "Visual Studio Professional subscription",
        "Visual Studio Professional subscription (1 month)",
        "Microsoft Corporation",
        "purchase",
    ),
];

/// All the generated data, read-only after start.
pub struct Data {
    /// Newest first, which is the order `/v1/invoices` pages through.
    pub invoices: Vec<Invoice>,
    customers: Vec<Customer>,
    partner_id: String,
}

impl Data {
    /// Generates `count` invoices from `seed`. The first two are USD (one Recurring, one OneTime)
    /// so the primary currency always has both kinds of detail.
    pub fn generate(seed: u64, count: usize) -> Data {
        let mut rng = fastrand::Rng::with_seed(seed);
        let partner_id = random_uuid(&mut rng);
        let customers = CUSTOMER_NAMES
            .iter()
            .map(|&(name, domain, country)| Customer {
                id: random_uuid(&mut rng),
                name,
                domain,
                country,
            })
            .collect();
        let anchor = days_from_civil(ANCHOR.0, ANCHOR.1, ANCHOR.2);
        let mut ids = HashSet::new();
        let mut invoices = Vec::with_capacity(count);
        for k in 0..count {
            let currency = match k {
                0 | 1 => &CURRENCIES[0],
                _ => match rng.u32(0..100) {
                    0..=49 => &CURRENCIES[0],
                    50..=69 => &CURRENCIES[1],
                    70..=84 => &CURRENCIES[2],
                    _ => &CURRENCIES[3],
                },
            };
            let invoice_type = match k {
                0 => InvoiceType::Recurring,
                1 => InvoiceType::OneTime,
                _ if rng.u32(0..100) < 60 => InvoiceType::Recurring,
                _ => InvoiceType::OneTime,
            };
            let id = loop {
                let candidate = match invoice_type {
                    InvoiceType::Recurring => {
                        let tail: String = (0..6)
                            .map(|_| {
                                let n = rng.u8(0..36);
                                char::from_digit(u32::from(n), 36)
                                    .unwrap_or('0')
                                    .to_ascii_uppercase()
                            })
                            .collect();
                        format!("D020{tail}")
                    }
                    InvoiceType::OneTime => format!("G{:09}", rng.u32(1..1_000_000_000)),
                };
                if ids.insert(candidate.clone()) {
                    break candidate;
                }
            };
            let date = anchor - k as i64 * INVOICE_SPACING_DAYS - i64::from(rng.u8(0..4));
            let total_charges =
                rng.i64(500..60_000) * currency.minor * currency.scale + rng.i64(0..currency.minor);
            let paid_amount = match k {
                0..=2 => 0,
                3..=5 if rng.bool() => total_charges / 2,
                3..=5 => 0,
                _ if rng.u32(0..10) == 0 => 0,
                _ => total_charges,
            };
            let line_items = generate_line_items(&mut rng, total_charges, invoice_type);
            invoices.push(Invoice {
                id,
                invoice_type,
                currency,
                date,
                total_charges,
                paid_amount,
                receipt_id: format!("{}", 123_456 + k * 37),
                line_items,
            });
        }
        Data {
            invoices,
            customers,
            partner_id,
        }
    }

    /// The invoice with `id`; also accepts the `Recurring-`/`OneTime-` prefixed form the API
    /// writes in its own `links.self` (seed example `/invoices/Recurring-D02005YFHI`).
    pub fn invoice(&self, id: &str) -> Option<&Invoice> {
        let bare = id
            .strip_prefix("Recurring-")
            .or_else(|| id.strip_prefix("OneTime-"))
            .unwrap_or(id);
        self.invoices
            .iter()
            .find(|invoice| invoice.id.eq_ignore_ascii_case(bare))
    }

    /// An `Invoice` resource (seed `get-a-collection-of-invoices`).
    pub fn invoice_json(&self, invoice: &Invoice) -> Value {
        let id = &invoice.id;
        let kind = invoice.invoice_type;
        let currency = invoice.currency;
        json!({
            "id": id,
            "invoiceDate": date_time(invoice.date),
            "billingPeriodStartDate": date_time(invoice.date - 31),
            "billingPeriodEndDate": date_time(invoice.date - 1),
            "totalCharges": currency.amount(invoice.total_charges),
            "paidAmount": currency.amount(invoice.paid_amount),
            "currencyCode": currency.code,
            "currencySymbol": currency.symbol,
            "pdfDownloadLink": format!("/invoices/{id}/documents/statement"),
            "taxReceipts": [{
                "id": invoice.receipt_id,
                "taxReceiptPdfDownloadLink":
                    format!("/invoices/{id}/receipts/{}/documents/statement", invoice.receipt_id),
            }],
            "invoiceDetails": [{
                "invoiceLineItemType": "billing_line_items",
                "billingProvider": kind.billing_provider(),
                "links": { "self": link(&format!(
                    "/invoices/{}-{id}/lineitems/{}/BillingLineItems",
                    kind.as_str(),
                    kind.provider_segment(),
                )) },
                "attributes": { "objectType": "InvoiceDetail" },
            }],
            "documentType": "invoice",
            "invoiceType": kind.as_str(),
            "links": { "self": link(&format!("/invoices/{}-{id}", kind.as_str())) },
            "attributes": { "objectType": "Invoice" },
        })
    }

    /// One billing line item of `invoice`.
    pub fn line_item_json(&self, invoice: &Invoice, index: usize) -> Value {
        let Some(item) = invoice.line_items.get(index) else {
            return Value::Null;
        };
        let currency = invoice.currency;
        let customer = &self.customers[item.customer % self.customers.len()];
        let (product_id, sku_id, product_name, sku_name, publisher, charge_type) =
            PRODUCTS[item.product % PRODUCTS.len()];
        let unit_price = item.subtotal as f64 / currency.minor as f64 / item.quantity as f64;
        let unit_price = (unit_price * 10_000.0).round() / 10_000.0;
        // Two halves: one `json!` this size passes the macro recursion limit.
        let mut head = json!({
            "partnerId": self.partner_id,
            "customerId": customer.id,
            "customerName": customer.name,
            "customerDomainName": customer.domain,
            "customerCountry": customer.country,
            "invoiceNumber": invoice.id,
            "mpnId": "1234567",
            "resellerMpnId": 0,
            "orderId": item.order_id,
            "orderDate": date_time(invoice.date - 40),
            "productId": product_id,
            "skuId": sku_id,
            "availabilityId": format!("{product_id}{sku_id}"),
            "skuName": sku_name,
            "productName": product_name,
            "chargeType": charge_type,
            "unitPrice": unit_price,
            "effectiveUnitPrice": unit_price,
            "unitType": "",
            "quantity": item.quantity,
            "billableQuantity": item.quantity,
            "subtotal": currency.amount(item.subtotal),
            "taxTotal": currency.amount(item.tax),
            "totalForCustomer": currency.amount(item.total()),
            "currency": currency.code,
            "publisherName": publisher,
            "publisherId": "",
        });
        let rest = json!({
            "subscriptionDescription": product_name,
            "subscriptionId": item.subscription_id,
            "chargeStartDate": date_time(invoice.date - 31),
            "chargeEndDate": date_time(invoice.date - 1),
            "termAndBillingCycle": "1 Month Subscription",
            "alternateId": item.order_id.replace('-', "").get(..12).unwrap_or_default(),
            "priceAdjustmentDescription": "",
            "discountDetails": "",
            "pricingCurrency": currency.code,
            "pcToBCExchangeRate": 1,
            "pcToBCExchangeRateDate": date_time(invoice.date - 31),
            "meterDescription": "",
            "reservationOrderId": "",
            "billingFrequency": "Monthly",
            "invoiceLineItemType": "billing_line_items",
            "billingProvider": invoice.invoice_type.billing_provider(),
            "attributes": { "objectType": invoice.invoice_type.line_item_object_type() },
        });
        if let (Some(map), Value::Object(rest)) = (head.as_object_mut(), rest) {
            map.extend(rest);
        }
        head
    }

    /// The `InvoiceSummary` for one currency (seed `get-the-reseller-s-current-account-balance`),
    /// with `details` split by invoice type (only the types the currency has, as in the
    /// summaries example where CHF has only `OneTime`).
    pub fn summary_json(&self, currency: &Currency) -> Value {
        let of_currency: Vec<&Invoice> = self
            .invoices
            .iter()
            .filter(|invoice| invoice.currency.code == currency.code)
            .collect();
        let mut summary = summary_fields(currency, &of_currency);
        let details: Vec<Value> = [InvoiceType::Recurring, InvoiceType::OneTime]
            .into_iter()
            .filter_map(|kind| {
                let of_kind: Vec<&Invoice> = of_currency
                    .iter()
                    .copied()
                    .filter(|invoice| invoice.invoice_type == kind)
                    .collect();
                (!of_kind.is_empty()).then(|| {
                    let mut inner = summary_fields(currency, &of_kind);
                    if let Some(map) = inner.as_object_mut() {
                        map.insert("attributes".into(), attributes("InvoiceSummary"));
                    }
                    json!({ "invoiceType": kind.as_str(), "summary": inner })
                })
            })
            .collect();
        if let Some(map) = summary.as_object_mut() {
            map.insert("details".into(), Value::Array(details));
            map.insert("links".into(), json!({ "self": link("/invoices/summary") }));
            map.insert("attributes".into(), attributes("InvoiceSummary"));
        }
        summary
    }

    /// The currencies that have at least one invoice, in [`CURRENCIES`] order.
    pub fn currencies(&self) -> impl Iterator<Item = &'static Currency> + '_ {
        CURRENCIES.iter().filter(|currency| {
            self.invoices
                .iter()
                .any(|invoice| invoice.currency.code == currency.code)
        })
    }

    /// The seek-paging token for `offset` into `invoice`'s line items: opaque to clients, checked
    /// on the way back in so a forged or foreign token is a 400.
    pub fn continuation_token(&self, invoice: &Invoice, offset: usize) -> String {
        format!("{:016x}-{offset}", self.token_mac(invoice, offset))
    }

    /// The offset a token from [`Data::continuation_token`] stands for.
    pub fn parse_continuation_token(&self, invoice: &Invoice, token: &str) -> Option<usize> {
        let (mac, offset) = token.trim().split_once('-')?;
        let offset: usize = offset.parse().ok()?;
        let mac = u64::from_str_radix(mac, 16).ok()?;
        (mac == self.token_mac(invoice, offset)).then_some(offset)
    }

    fn token_mac(&self, invoice: &Invoice, offset: usize) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.partner_id.hash(&mut hasher);
        invoice.id.hash(&mut hasher);
        offset.hash(&mut hasher);
        hasher.finish()
    }
}

fn generate_line_items(rng: &mut fastrand::Rng, total: i64, kind: InvoiceType) -> Vec<LineItem> {
    let count = rng.usize(5..=40);
    let weights: Vec<i64> = (0..count).map(|_| rng.i64(1..=100)).collect();
    let weight_sum: i64 = weights.iter().sum();
    let mut allotted = 0;
    weights
        .iter()
        .enumerate()
        .map(|(index, weight)| {
            // Every share is positive (totals are at least 500 major units); the last takes
            // the rounding remainder so the items add up to the invoice exactly.
            let line_total = if index + 1 == count {
                total - allotted
            } else {
                total * weight / weight_sum
            };
            allotted += line_total;
            let tax = line_total / 11;
            let quantity = rng.i64(1..=50);
            LineItem {
                customer: rng.usize(..CUSTOMER_NAMES.len()),
                product: match kind {
                    InvoiceType::Recurring => rng.usize(..2),
                    InvoiceType::OneTime => rng.usize(..PRODUCTS.len()),
                },
                order_id: random_uuid(rng),
                subscription_id: random_uuid(rng),
                quantity,
                subtotal: line_total - tax,
                tax,
            }
        })
        .collect()
}

/// A version-4-shaped UUID drawn from the seeded generator (so ids repeat with the seed).
fn random_uuid(rng: &mut fastrand::Rng) -> String {
    uuid::Builder::from_random_bytes(rng.u128(..).to_le_bytes())
        .into_uuid()
        .to_string()
}

fn summary_fields(currency: &Currency, invoices: &[&Invoice]) -> Value {
    let balance: i64 = invoices
        .iter()
        .map(|invoice| invoice.total_charges - invoice.paid_amount)
        .sum();
    let first = invoices.iter().map(|invoice| invoice.date).min();
    let latest = invoices.iter().map(|invoice| invoice.date).max();
    // A payment lands 20 days after its invoice; the latest one is the "last payment".
    let last_payment = invoices
        .iter()
        .filter(|invoice| invoice.paid_amount > 0)
        .max_by_key(|invoice| invoice.date);
    let or_none = |day: Option<i64>| day.map_or_else(|| NO_DATE.to_owned(), date_time);
    json!({
        "balanceAmount": currency.amount(balance),
        "currencyCode": currency.code,
        "currencySymbol": currency.symbol,
        "accountingDate": or_none(latest),
        "firstInvoiceCreationDate": or_none(first),
        "lastPaymentDate": or_none(last_payment.map(|invoice| invoice.date + 20)),
        "lastPaymentAmount": currency.amount(last_payment.map_or(0, |invoice| invoice.paid_amount)),
        "latestInvoiceDate": or_none(latest),
    })
}

/// A `Link` with no headers.
pub fn link(uri: &str) -> Value {
    json!({ "uri": uri, "method": "GET", "headers": [] })
}

/// `{"objectType": kind}`.
pub fn attributes(kind: &str) -> Value {
    json!({ "objectType": kind })
}

/// `YYYY-MM-DDT00:00:00Z` for a day number.
pub fn date_time(days: i64) -> String {
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T00:00:00Z")
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m as u32, d as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(
            date_time(days_from_civil(2024, 2, 29)),
            "2024-02-29T00:00:00Z"
        );
        assert_eq!(
            date_time(days_from_civil(1899, 12, 31)),
            "1899-12-31T00:00:00Z"
        );
    }

    #[test]
    fn generation_is_deterministic_and_consistent() {
        let a = Data::generate(7, 50);
        let b = Data::generate(7, 50);
        let c = Data::generate(8, 50);
        let ids = |d: &Data| d.invoices.iter().map(|i| i.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&a), ids(&b));
        assert_ne!(ids(&a), ids(&c));
        for invoice in &a.invoices {
            let sum: i64 = invoice.line_items.iter().map(LineItem::total).sum();
            assert_eq!(sum, invoice.total_charges, "{}", invoice.id);
            assert!(invoice.line_items.iter().all(|item| item.total() > 0));
            assert!((5..=40).contains(&invoice.line_items.len()));
        }
        let unique: HashSet<_> = ids(&a).into_iter().collect();
        assert_eq!(unique.len(), 50);
    }

    #[test]
    fn continuation_tokens_are_checked() {
        let data = Data::generate(1, 3);
        let invoice = &data.invoices[0];
        let token = data.continuation_token(invoice, 10);
        assert_eq!(data.parse_continuation_token(invoice, &token), Some(10));
        assert_eq!(
            data.parse_continuation_token(&data.invoices[1], &token),
            None
        );
        assert_eq!(data.parse_continuation_token(invoice, "0-10"), None);
    }
}
