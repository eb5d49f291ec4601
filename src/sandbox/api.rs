//! The billing routes proper, answered from the generated [`Data`] once the request has passed
//! the fault knobs and the Bearer check: summary, summaries, the invoice collection (index
//! paging), one invoice, line items (seek paging, and legacy index paging), statement PDFs.

use http::{header, HeaderMap, HeaderValue, StatusCode};
use serde_json::{json, Value};

use super::data::{attributes, link, Data, Invoice, CURRENCIES};
use super::requests::RouteName;
use super::{json_response, pdf, Refusal, BAD_INPUT, NOT_FOUND};
use crate::body::{self, Response};

/// Page size of the seek-paged line items when the request names none, and the most it may
/// ask for (reference §5.5: default and max 2000).
const LINE_ITEM_PAGE_MAX: usize = 2000;

/// A matched billing route and its path parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRoute {
    /// `/v1/invoices/summary`.
    Summary,
    /// `/v1/invoices/summaries`.
    Summaries,
    /// `/v1/invoices`.
    Invoices,
    /// `/v1/invoices/{id}`.
    Invoice(String),
    /// `/v1/invoices/{id}/lineitems`.
    LineItems(String),
    /// `/v1/invoices/{id}/lineitems/{provider}/{type}`.
    LegacyLineItems {
        /// Invoice id as requested.
        id: String,
        /// Billing provider segment.
        provider: String,
        /// Line item type segment.
        kind: String,
    },
    /// `/v1/invoices/{id}/documents/statement`.
    Statement(String),
    /// `/v1/invoices/{id}/receipts/{receiptId}/documents/statement`.
    Receipt {
        /// Invoice id.
        id: String,
        /// Tax receipt id.
        receipt: String,
    },
}

impl ApiRoute {
    /// Matches a `/v1/...` path; route segments are case-insensitive, as the API's own links
    /// mix cases (`/lineitems/Office/BillingLineItems`).
    pub fn classify(path: &str) -> Option<ApiRoute> {
        let segments: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
        let is = |segment: &str, literal: &str| segment.eq_ignore_ascii_case(literal);
        let id = |segment: &str| (!segment.is_empty()).then(|| segment.to_owned());
        match segments.as_slice() {
            [v1, invoices] if is(v1, "v1") && is(invoices, "invoices") => Some(ApiRoute::Invoices),
            [v1, invoices, summary]
                if is(v1, "v1") && is(invoices, "invoices") && is(summary, "summary") =>
            {
                Some(ApiRoute::Summary)
            }
            [v1, invoices, summaries]
                if is(v1, "v1") && is(invoices, "invoices") && is(summaries, "summaries") =>
            {
                Some(ApiRoute::Summaries)
            }
            [v1, invoices, invoice] if is(v1, "v1") && is(invoices, "invoices") => {
                id(invoice).map(ApiRoute::Invoice)
            }
            [v1, invoices, invoice, lineitems]
                if is(v1, "v1") && is(invoices, "invoices") && is(lineitems, "lineitems") =>
            {
                id(invoice).map(ApiRoute::LineItems)
            }
            [v1, invoices, invoice, lineitems, provider, kind]
                if is(v1, "v1")
                    && is(invoices, "invoices")
                    && is(lineitems, "lineitems")
                    && !provider.is_empty()
                    && !kind.is_empty() =>
            {
                id(invoice).map(|id| ApiRoute::LegacyLineItems {
                    id,
                    provider: (*provider).to_owned(),
                    kind: (*kind).to_owned(),
                })
            }
            [v1, invoices, invoice, documents, statement]
                if is(v1, "v1")
                    && is(invoices, "invoices")
                    && is(documents, "documents")
                    && is(statement, "statement") =>
            {
                id(invoice).map(ApiRoute::Statement)
            }
            [v1, invoices, invoice, receipts, receipt, documents, statement]
                if is(v1, "v1")
                    && is(invoices, "invoices")
                    && is(receipts, "receipts")
                    && is(documents, "documents")
                    && is(statement, "statement")
                    && !receipt.is_empty() =>
            {
                id(invoice).map(|id| ApiRoute::Receipt {
                    id,
                    receipt: (*receipt).to_owned(),
                })
            }
            _ => None,
        }
    }

    /// The name in the request log.
    pub fn name(&self) -> RouteName {
        match self {
            ApiRoute::Summary => RouteName::Summary,
            ApiRoute::Summaries => RouteName::Summaries,
            ApiRoute::Invoices => RouteName::Invoices,
            ApiRoute::Invoice(_) => RouteName::Invoice,
            ApiRoute::LineItems(_) | ApiRoute::LegacyLineItems { .. } => RouteName::LineItems,
            ApiRoute::Statement(_) => RouteName::Statement,
            ApiRoute::Receipt { .. } => RouteName::Receipt,
        }
    }

    /// Whether only App+User tokens may call it (reference §4.1).
    pub fn user_only(&self) -> bool {
        matches!(
            self,
            ApiRoute::Summaries
                | ApiRoute::Invoice(_)
                | ApiRoute::Statement(_)
                | ApiRoute::Receipt { .. }
        )
    }
}

/// Answers an authorised request for `route`.
pub fn respond(
    data: &Data,
    route: &ApiRoute,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Response {
    let result =
        match route {
            ApiRoute::Summary => Ok(json_response(
                StatusCode::OK,
                &data.summary_json(&CURRENCIES[0]),
            )),
            ApiRoute::Summaries => Ok(summaries(data)),
            ApiRoute::Invoices => invoices(data, query),
            ApiRoute::Invoice(id) => find(data, id)
                .map(|invoice| json_response(StatusCode::OK, &data.invoice_json(invoice))),
            ApiRoute::LineItems(id) => find(data, id)
                .and_then(|invoice| seek_line_items(data, invoice, id, query, headers)),
            ApiRoute::LegacyLineItems { id, provider, kind } => find(data, id)
                .and_then(|invoice| legacy_line_items(data, invoice, id, provider, kind, query)),
            ApiRoute::Statement(id) => find(data, id).map(statement),
            ApiRoute::Receipt { id, receipt } => find(data, id).and_then(|invoice| {
                if invoice.receipt_id == *receipt {
                    Ok(receipt_pdf(invoice))
                } else {
                    Err(Refusal::new(
                        StatusCode::NOT_FOUND,
                        NOT_FOUND,
                        &format!(
                            "Tax receipt {receipt} of invoice {} was not found.",
                            invoice.id
                        ),
                    ))
                }
            }),
        };
    result.unwrap_or_else(Refusal::into_response)
}

fn find<'d>(data: &'d Data, id: &str) -> Result<&'d Invoice, Refusal> {
    data.invoice(id).ok_or_else(|| {
        Refusal::new(
            StatusCode::NOT_FOUND,
            NOT_FOUND,
            &format!("Invoice {id} was not found."),
        )
    })
}

fn summaries(data: &Data) -> Response {
    let items: Vec<Value> = data
        .currencies()
        .map(|currency| data.summary_json(currency))
        .collect();
    json_response(
        StatusCode::OK,
        &collection(items, link("/invoices/summaries"), None),
    )
}

/// `{totalCount, items, links, attributes}`. `totalCount` is the number of items on this page,
/// as in the docs' example (`size=2` gives `"totalCount": 2` with a `next` link).
fn collection(items: Vec<Value>, self_link: Value, next: Option<Value>) -> Value {
    let mut links = json!({ "self": self_link });
    if let (Some(next), Some(map)) = (next, links.as_object_mut()) {
        map.insert("next".into(), next);
    }
    json!({
        "totalCount": items.len(),
        "items": items,
        "links": links,
        "attributes": attributes("Collection"),
    })
}

/// Index paging: `size` (optional, positive; absent means "everything from `offset`") and
/// `offset` (optional, zero-based).
struct IndexPage {
    size: Option<usize>,
    offset: usize,
}

impl IndexPage {
    fn parse(query: Option<&str>) -> Result<IndexPage, Refusal> {
        let size = param(query, "size")
            .map(|text| positive(&text, "size"))
            .transpose()?;
        let offset = match param(query, "offset") {
            None => 0,
            Some(text) => text.trim().parse::<usize>().map_err(|_| {
                bad_input(&format!(
                    "The offset '{}' is not valid: it must be a zero-based index (0 or more).",
                    short(&text)
                ))
            })?,
        };
        Ok(IndexPage { size, offset })
    }

    /// The index range this page covers out of `total`.
    fn range(&self, total: usize) -> (usize, usize) {
        let start = self.offset.min(total);
        let end = self
            .size
            .map_or(total, |size| start.saturating_add(size).min(total));
        (start, end)
    }

    /// `?size=N&offset=M` for a page starting at `offset`.
    fn query(&self, offset: usize) -> String {
        match self.size {
            Some(size) => format!("?size={size}&offset={offset}"),
            None if offset > 0 => format!("?offset={offset}"),
            None => String::new(),
        }
    }
}

fn invoices(data: &Data, query: Option<&str>) -> Result<Response, Refusal> {
    let page = IndexPage::parse(query)?;
    let (start, end) = page.range(data.invoices.len());
    let items = data.invoices[start..end]
        .iter()
        .map(|invoice| data.invoice_json(invoice))
        .collect();
    let next = (page.size.is_some() && end < data.invoices.len())
        .then(|| link(&format!("/invoices{}", page.query(end))));
    let self_link = link(&format!("/invoices{}", page.query(page.offset)));
    Ok(json_response(
        StatusCode::OK,
        &collection(items, self_link, next),
    ))
}

fn legacy_line_items(
    data: &Data,
    invoice: &Invoice,
    requested_id: &str,
    provider: &str,
    kind: &str,
    query: Option<&str>,
) -> Result<Response, Refusal> {
    check_provider(provider)?;
    let billing = check_line_item_type(kind)?;
    let page = IndexPage::parse(query)?;
    // The sandbox generates billing line items only; usage line items are an empty collection.
    let total = if billing { invoice.line_items.len() } else { 0 };
    let (start, end) = page.range(total);
    let items = (start..end)
        .map(|index| data.line_item_json(invoice, index))
        .collect();
    let base = format!("/invoices/{requested_id}/lineitems/{provider}/{kind}");
    let next =
        (page.size.is_some() && end < total).then(|| link(&format!("{base}{}", page.query(end))));
    let self_link = link(&format!("{base}{}", page.query(page.offset)));
    Ok(json_response(
        StatusCode::OK,
        &collection(items, self_link, next),
    ))
}

/// Seek paging (reference §5.5): the first request names `provider`, `invoicelineitemtype` and
/// `size`; later ones add `seekOperation=Next` and send the body's `continuationToken` in the
/// `MS-ContinuationToken` header.
fn seek_line_items(
    data: &Data,
    invoice: &Invoice,
    requested_id: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response, Refusal> {
    let provider = param(query, "provider").ok_or_else(|| {
        bad_input("The provider parameter is required (onetime, office, azure or marketplace).")
    })?;
    check_provider(&provider)?;
    let kind = param(query, "invoicelineitemtype").ok_or_else(|| {
        bad_input(
            "The invoicelineitemtype parameter is required (billinglineitems or usagelineitems).",
        )
    })?;
    let billing = check_line_item_type(&kind)?;
    if let Some(period) = param(query, "period") {
        if !period.eq_ignore_ascii_case("current") && !period.eq_ignore_ascii_case("previous") {
            return Err(bad_input(&format!(
                "The period '{}' is not valid: use current or previous.",
                short(&period)
            )));
        }
    }
    let size = match param(query, "size") {
        Some(text) => positive(&text, "size")?.min(LINE_ITEM_PAGE_MAX),
        None => LINE_ITEM_PAGE_MAX,
    };
    // Items are in the invoice's currency; asking for another currency finds none.
    let currency_matches = param(query, "currencycode")
        .is_none_or(|code| code.eq_ignore_ascii_case(invoice.currency.code));
    let total = if billing && currency_matches {
        invoice.line_items.len()
    } else {
        0
    };

    let seek_next = param(query, "seekoperation").is_some_and(|op| op.eq_ignore_ascii_case("next"));
    let start = if seek_next {
        let token = headers
            .get("ms-continuationtoken")
            .and_then(|value| value.to_str().ok())
            .ok_or_else(|| {
                bad_input("seekOperation=Next needs the MS-ContinuationToken header from the previous page.")
            })?;
        data.parse_continuation_token(invoice, token)
            .filter(|offset| *offset <= total)
            .ok_or_else(|| bad_input("The continuation token is not valid for this request."))?
    } else {
        0
    };
    let end = start.saturating_add(size).min(total);
    let items: Vec<Value> = (start..end)
        .map(|index| data.line_item_json(invoice, index))
        .collect();

    let kept: Vec<(String, String)> = query
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .filter(|(key, _)| !key.eq_ignore_ascii_case("seekoperation"))
                .map(|(key, value)| (key.into_owned(), value.into_owned()))
                .collect()
        })
        .unwrap_or_default();
    let kept_query = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(kept)
        .finish();
    let self_uri = format!("/invoices/{requested_id}/lineitems?{kept_query}");
    let body = if end < total {
        let token = data.continuation_token(invoice, end);
        let next = json!({
            "uri": format!("{self_uri}&seekOperation=Next"),
            "method": "GET",
            "headers": [{ "key": "MS-ContinuationToken", "value": token }],
        });
        let mut body = collection(items, link(&self_uri), Some(next));
        if let Some(map) = body.as_object_mut() {
            map.insert("continuationToken".into(), Value::from(token));
        }
        body
    } else {
        collection(items, link(&self_uri), None)
    };
    Ok(json_response(StatusCode::OK, &body))
}

fn check_provider(provider: &str) -> Result<(), Refusal> {
    const PROVIDERS: [&str; 5] = ["onetime", "one_time", "office", "azure", "marketplace"];
    if PROVIDERS
        .iter()
        .any(|known| provider.eq_ignore_ascii_case(known))
    {
        Ok(())
    } else {
        Err(bad_input(&format!(
            "The provider '{}' is not valid: use onetime, office, azure or marketplace.",
            short(provider)
        )))
    }
}

/// `true` for billing line items, `false` for usage line items.
fn check_line_item_type(kind: &str) -> Result<bool, Refusal> {
    if kind.eq_ignore_ascii_case("billinglineitems") {
        Ok(true)
    } else if kind.eq_ignore_ascii_case("usagelineitems") {
        Ok(false)
    } else {
        Err(bad_input(&format!(
            "The invoice line item type '{}' is not valid: use billinglineitems or usagelineitems.",
            short(kind)
        )))
    }
}

fn statement(invoice: &Invoice) -> Response {
    let currency = invoice.currency;
    let lines = [
        format!(
            "Invoice date: {}",
            &super::data::date_time(invoice.date)[..10]
        ),
        format!("Invoice type: {}", invoice.invoice_type.as_str()),
        format!("Total charges: {}", currency.display(invoice.total_charges)),
        format!("Paid amount: {}", currency.display(invoice.paid_amount)),
        format!("Line items: {}", invoice.line_items.len()),
        "Partner Center sandbox - generated data, not a real invoice.".to_owned(),
    ];
    pdf_response(
        pdf::document(&format!("Invoice {}", invoice.id), &lines),
        &format!("Invoice_{}.pdf", invoice.id),
    )
}

fn receipt_pdf(invoice: &Invoice) -> Response {
    let lines = [
        format!("Invoice: {}", invoice.id),
        format!(
            "Amount: {}",
            invoice.currency.display(invoice.total_charges)
        ),
        "Partner Center sandbox - generated data, not a real receipt.".to_owned(),
    ];
    pdf_response(
        pdf::document(&format!("Tax receipt {}", invoice.receipt_id), &lines),
        &format!("TaxReceipt_{}.pdf", invoice.receipt_id),
    )
}

fn pdf_response(bytes: Vec<u8>, filename: &str) -> Response {
    let mut response = Response::new(body::full(bytes));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/pdf"),
    );
    // Invoice and receipt ids are generated ASCII, so this is always a valid header value.
    if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename={filename}")) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    response
}

/// The first value of query parameter `name` (names compared case-insensitively).
fn param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.into_owned())
}

fn positive(text: &str, name: &str) -> Result<usize, Refusal> {
    text.trim()
        .parse::<usize>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            bad_input(&format!(
                "The {name} '{}' is not valid: it must be a positive integer.",
                short(text)
            ))
        })
}

fn bad_input(description: &str) -> Refusal {
    Refusal::new(StatusCode::BAD_REQUEST, BAD_INPUT, description)
}

/// Client input echoed into an error, cut short and stripped of control characters.
fn short(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_case_insensitively() {
        assert_eq!(ApiRoute::classify("/v1/invoices"), Some(ApiRoute::Invoices));
        assert_eq!(
            ApiRoute::classify("/v1/Invoices/Summary"),
            Some(ApiRoute::Summary)
        );
        assert_eq!(
            ApiRoute::classify(
                "/v1/invoices/Recurring-D02005YFHI/lineitems/Office/BillingLineItems"
            ),
            Some(ApiRoute::LegacyLineItems {
                id: "Recurring-D02005YFHI".into(),
                provider: "Office".into(),
                kind: "BillingLineItems".into(),
            })
        );
        assert_eq!(
            ApiRoute::classify("/v1/invoices/G1/receipts/99/documents/statement"),
            Some(ApiRoute::Receipt {
                id: "G1".into(),
                receipt: "99".into()
            })
        );
        assert_eq!(ApiRoute::classify("/v1/invoices/"), None);
        assert_eq!(ApiRoute::classify("/v2/invoices"), None);
        assert_eq!(ApiRoute::classify("/v1/customers"), None);
    }
}
