//! A minimal, valid one-page PDF 1.4 (catalog, page tree, page, Helvetica, one content stream)
//! with a few lines of text, its cross-reference table computed from the real byte offsets.

/// A one-page PDF showing `lines`, top to bottom. Non-ASCII characters print as `?`.
pub fn document(title: &str, lines: &[String]) -> Vec<u8> {
    let mut content = String::from("BT\n/F1 18 Tf\n72 760 Td\n");
    content.push_str(&format!("({}) Tj\n/F1 12 Tf\n", escape(title)));
    for line in lines {
        content.push_str(&format!("0 -24 Td\n({}) Tj\n", escape(line)));
    }
    content.push_str("ET\n");

    let objects = [
        "<< /Type /Catalog /Pages 2 0 R >>".to_owned(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_owned(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] \
         /Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>"
            .to_owned(),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"
            .to_owned(),
        format!(
            "<< /Length {} >>\nstream\n{content}endstream",
            content.len()
        ),
    ];

    // The second line is the customary binary comment, telling transfer tools this is binary.
    let mut pdf: Vec<u8> = b"%PDF-1.4\n%\xE2\xE3\xCF\xD3\n".to_vec();
    let mut offsets = Vec::with_capacity(objects.len());
    for (index, object) in objects.iter().enumerate() {
        offsets.push(pdf.len());
        pdf.extend_from_slice(format!("{} 0 obj\n{object}\nendobj\n", index + 1).as_bytes());
    }
    let xref = pdf.len();
    // Each xref entry is exactly 20 bytes: 10-digit offset, 5-digit generation, type, EOL.
    let mut table = format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1);
    for offset in offsets {
        table.push_str(&format!("{offset:010} 00000 n \n"));
    }
    table.push_str(&format!(
        "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF",
        objects.len() + 1
    ));
    pdf.extend_from_slice(table.as_bytes());
    pdf
}

/// Escapes a PDF literal string; anything outside printable ASCII becomes `?`.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '(' | ')' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('?'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
        haystack.windows(needle.len()).position(|w| w == needle)
    }

    #[test]
    fn xref_offsets_point_at_their_objects() {
        let pdf = document("Invoice (D0200ABC)", &["Total: 12.50 €".to_owned()]);
        assert!(pdf.starts_with(b"%PDF-1.4\n"));
        assert!(pdf.ends_with(b"%%EOF"));
        let text = String::from_utf8_lossy(&pdf).into_owned();
        let startxref: usize = text
            .rsplit("startxref\n")
            .next()
            .and_then(|tail| tail.lines().next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        assert!(pdf[startxref..].starts_with(b"xref\n0 6\n"));
        let table = &text[text.find("xref\n").unwrap()..];
        for (object, line) in table.lines().skip(3).take(5).enumerate() {
            let offset: usize = line[..10].parse().unwrap();
            let header = format!("{} 0 obj\n", object + 1);
            assert!(pdf[offset..].starts_with(header.as_bytes()), "{line}");
        }
        assert!(find(&pdf, b"(Invoice \\(D0200ABC\\)) Tj").is_some());
        assert!(find(&pdf, b"(Total: 12.50 ?) Tj").is_some());
        let stream_start = find(&pdf, b"stream\n").unwrap() + 7;
        let stream_end = find(&pdf, b"endstream").unwrap();
        let length_at = find(&pdf, b"/Length ").unwrap() + 8;
        let length: usize = String::from_utf8_lossy(&pdf[length_at..])
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(length, stream_end - stream_start);
    }
}
