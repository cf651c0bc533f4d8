//! A URL query string's parameters (`a=1&b=x%20y`), percent- and plus-decoded.

use std::collections::HashMap;

fn hex_digit(byte: u8) -> Option<u8> {
    (byte as char).to_digit(16).map(|digit| digit as u8)
}

/// Decodes one `application/x-www-form-urlencoded` component; invalid escapes stay as written.
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'+' => out.push(b' '),
            b'%' if index + 2 < bytes.len() => match (hex_digit(bytes[index + 1]), hex_digit(bytes[index + 2])) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    index += 2;
                }
                _ => out.push(b'%'),
            },
            byte => out.push(byte),
        }
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The parameters of `query` (the last value wins).
pub fn parse(query: Option<&str>) -> HashMap<String, String> {
    query
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) => (decode(key), decode(value)),
            None => (decode(pair), String::new()),
        })
        .collect()
}

/// A non-negative integer parameter, `default` when absent or malformed, at most `most`.
pub fn number(params: &HashMap<String, String>, key: &str, default: u64, most: u64) -> u64 {
    params.get(key).and_then(|value| value.parse().ok()).unwrap_or(default).min(most)
}

/// A non-empty text parameter.
pub fn text<'a>(params: &'a HashMap<String, String>, key: &str) -> Option<&'a str> {
    params.get(key).map(String::as_str).filter(|value| !value.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_escapes_and_pluses() {
        let params = parse(Some("q=a%20b+c&state=running&bad=%zz&end=%4"));
        assert_eq!(params["q"], "a b c");
        assert_eq!(params["state"], "running");
        assert_eq!(params["bad"], "%zz");
        assert_eq!(params["end"], "%4");
        assert_eq!(number(&parse(Some("limit=9000")), "limit", 50, 500), 500);
        assert_eq!(number(&parse(None), "limit", 50, 500), 50);
        assert_eq!(text(&parse(Some("stage=")), "stage"), None);
    }
}
