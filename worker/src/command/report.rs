//! The `cohort-metrics {json}` lines a command trial prints to record an epoch.
//!
//! The JSON is one flat object: an integer `epoch` (1 or more) and named finite numbers. It is
//! parsed here, by a small parser of exactly that shape, rather than by a general one: every
//! other shape (nested values, strings, `NaN`, `Infinity`, a number that overflows) is refused
//! with a message naming the value, which is what a user fixing the script needs.

/// What starts a metrics line.
pub const PREFIX: &str = "cohort-metrics";

/// The longest metrics line accepted, in bytes.
pub const MAX_METRICS_LINE_BYTES: usize = 64 << 10;

/// The most values one metrics line may carry (besides `epoch`).
pub const MAX_VALUES: usize = 256;

/// The longest metric name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

/// One recorded epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// 1-based epoch number.
    pub epoch: u32,
    /// Named values, in the order printed.
    pub values: Vec<(String, f64)>,
}

/// Why a metrics line was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("cohort-metrics line refused: {0}")]
pub struct ReportError(pub String);

/// `Some` for a metrics line (parsed, or why not), `None` for any other output line.
pub fn parse_line(line: &str) -> Option<Result<Report, ReportError>> {
    let rest = line.strip_prefix(PREFIX)?;
    if !(rest.is_empty() || rest.starts_with([' ', '\t'])) {
        return None;
    }
    Some(parse_object(rest.trim()))
}

struct Cursor<'a> {
    text: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn skip_space(&mut self) {
        while self.at < self.text.len() && self.text[self.at].is_ascii_whitespace() {
            self.at += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_space();
        self.text.get(self.at).copied()
    }

    fn expect(&mut self, byte: u8) -> Result<(), ReportError> {
        match self.peek() {
            Some(found) if found == byte => {
                self.at += 1;
                Ok(())
            }
            Some(found) => Err(ReportError(format!("expected {:?} at byte {}, found {:?}", byte as char, self.at, found as char))),
            None => Err(ReportError(format!("expected {:?}, the line ended", byte as char))),
        }
    }

    fn string(&mut self) -> Result<String, ReportError> {
        self.expect(b'"')?;
        let mut out = Vec::new();
        while let Some(&byte) = self.text.get(self.at) {
            self.at += 1;
            match byte {
                b'"' => return String::from_utf8(out).map_err(|_| ReportError("a name is not UTF-8".into())),
                b'\\' => {
                    let escaped = *self.text.get(self.at).ok_or_else(|| ReportError("unfinished escape".into()))?;
                    self.at += 1;
                    match escaped {
                        b'"' | b'\\' | b'/' => out.push(escaped),
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        _ => return Err(ReportError(format!("unsupported escape \\{} in a name", escaped as char))),
                    }
                }
                _ => out.push(byte),
            }
        }
        Err(ReportError("a name's quotes are not closed".into()))
    }

    /// The raw token of a value: everything up to the next `,` or `}` (trimmed).
    fn token(&mut self) -> &str {
        self.skip_space();
        let start = self.at;
        let mut depth = 0i32;
        let mut in_string = false;
        while let Some(&byte) = self.text.get(self.at) {
            match byte {
                b'"' => in_string = !in_string,
                b'[' | b'{' if !in_string => depth += 1,
                b']' | b'}' if !in_string && depth > 0 => depth -= 1,
                b',' | b'}' if !in_string && depth == 0 => break,
                _ => {}
            }
            self.at += 1;
        }
        std::str::from_utf8(&self.text[start..self.at]).unwrap_or("").trim()
    }
}

/// A JSON number token's value; `Err` names what it is instead.
fn number(name: &str, token: &str) -> Result<f64, ReportError> {
    if matches!(token, "NaN" | "nan" | "Infinity" | "-Infinity" | "inf" | "-inf") {
        return Err(ReportError(format!("{name} is {token}: only finite numbers are recorded (a diverged loss? check the learning rate)")));
    }
    let is_number = !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'));
    let value: f64 = match is_number.then(|| token.parse::<f64>().ok()).flatten() {
        Some(value) => value,
        None => {
            let shown: String = token.chars().take(40).collect();
            return Err(ReportError(format!("{name} is {shown}, not a number")));
        }
    };
    if !value.is_finite() {
        return Err(ReportError(format!("{name} is {token}, beyond a finite double")));
    }
    Ok(value)
}

fn parse_object(text: &str) -> Result<Report, ReportError> {
    if text.is_empty() {
        return Err(ReportError("no JSON object after cohort-metrics".into()));
    }
    let mut cursor = Cursor { text: text.as_bytes(), at: 0 };
    cursor.expect(b'{')?;
    let mut epoch = None;
    let mut values: Vec<(String, f64)> = Vec::new();
    if cursor.peek() == Some(b'}') {
        cursor.at += 1;
    } else {
        loop {
            let name = cursor.string()?;
            cursor.expect(b':')?;
            let token = cursor.token().to_string();
            if name == "epoch" {
                let is_integer = !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit());
                let parsed = token.parse::<u32>().ok().filter(|&e| is_integer && e >= 1);
                epoch = Some(parsed.ok_or_else(|| ReportError(format!("epoch is {token}: an integer from 1 is expected")))?);
            } else {
                if name.is_empty() || name.len() > MAX_NAME_BYTES {
                    return Err(ReportError(format!("a metric name has 1 to {MAX_NAME_BYTES} bytes")));
                }
                if values.iter().any(|(seen, _)| *seen == name) {
                    return Err(ReportError(format!("{name} appears twice")));
                }
                values.push((name.clone(), number(&name, &token)?));
                if values.len() > MAX_VALUES {
                    return Err(ReportError(format!("more than {MAX_VALUES} values")));
                }
            }
            match cursor.peek() {
                Some(b',') => cursor.at += 1,
                Some(b'}') => {
                    cursor.at += 1;
                    break;
                }
                _ => return Err(ReportError(format!("expected , or }} after {name}"))),
            }
        }
    }
    if cursor.peek().is_some() {
        return Err(ReportError("text after the JSON object".into()));
    }
    let epoch = epoch.ok_or_else(|| ReportError("no \"epoch\": each line records one epoch, numbered from 1".into()))?;
    Ok(Report { epoch, values })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metrics_line_records_an_epoch() {
        let report = parse_line(r#"cohort-metrics {"epoch": 3, "val_loss": 0.12, "acc": 9.5e-1, "n": -2}"#).unwrap().unwrap();
        assert_eq!(report, Report { epoch: 3, values: vec![("val_loss".into(), 0.12), ("acc".into(), 0.95), ("n".into(), -2.0)] });
        assert!(parse_line("epoch 3 loss 0.1").is_none());
        assert!(parse_line("cohort-metricsX {}").is_none());
    }

    #[test]
    fn non_finite_and_malformed_lines_are_refused_with_the_reason() {
        let refused = |line: &str| parse_line(line).unwrap().unwrap_err().to_string();
        assert!(refused(r#"cohort-metrics {"epoch": 1, "val_loss": NaN}"#).contains("val_loss is NaN: only finite numbers"));
        assert!(refused(r#"cohort-metrics {"epoch": 1, "val_loss": -Infinity}"#).contains("-Infinity"));
        assert!(refused(r#"cohort-metrics {"epoch": 1, "val_loss": 1e999}"#).contains("beyond a finite double"));
        assert!(refused(r#"cohort-metrics {"epoch": 1.5}"#).contains("epoch is 1.5"));
        assert!(refused(r#"cohort-metrics {"epoch": 0}"#).contains("epoch is 0"));
        assert!(refused(r#"cohort-metrics {"val_loss": 1}"#).contains("no \"epoch\""));
        assert!(refused(r#"cohort-metrics {"epoch": 1, "name": "x"}"#).contains("not a number"));
        assert!(refused(r#"cohort-metrics {"epoch": 1, "nested": {"a": 1}}"#).contains("not a number"));
        assert!(refused(r#"cohort-metrics {"epoch": 1, "a": 1, "a": 2}"#).contains("twice"));
        assert!(refused(r#"cohort-metrics {"epoch": 1} trailing"#).contains("text after"));
        assert!(refused("cohort-metrics").contains("no JSON object"));
        assert!(refused(r#"cohort-metrics {"epoch": 1"#).contains("expected"));
    }
}
