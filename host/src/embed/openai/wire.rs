//! The JSON of `POST /v1/embeddings` and the headers that steer retries, as the servers that
//! speak the protocol actually send them.
//!
//! Error bodies differ between servers, so [`error_message`] accepts each known shape: OpenAI,
//! Azure, Ollama and recent vLLM send `{"error": {"message", "type", "code"}}`;
//! text-embeddings-inference sends `{"error": "...", "error_type": "..."}`; older vLLM sends
//! `{"message": "...", "type": "..."}`. Anything else is quoted, shortened.

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;
use serde::{Deserialize, Serialize};

/// The request body. `encoding_format: "float"` asks for JSON numbers: OpenAI's clients default
/// to base64, and a server that defaulted to it would send strings where vectors belong.
#[derive(Debug, Serialize)]
pub(super) struct EmbeddingRequest<'a> {
    pub model: &'a str,
    pub input: &'a [String],
    pub encoding_format: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<usize>,
}

/// The success body; fields this client does not use (`object`, `model`, `usage`) are ignored.
#[derive(Debug, Deserialize)]
pub(super) struct EmbeddingResponse {
    pub data: Vec<EmbeddingItem>,
}

/// One vector of a success body, with the position of its text in the request.
#[derive(Debug, Deserialize)]
pub(super) struct EmbeddingItem {
    pub index: usize,
    pub embedding: Vec<f32>,
}

/// Longest part of an unrecognised error body quoted in an error message.
const QUOTED_BODY_CHARS: usize = 300;

/// The human-readable message of an error body, with its `type`/`code` when the server gave
/// them, e.g. `Incorrect API key provided (invalid_request_error, invalid_api_key)`.
pub(super) fn error_message(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) else {
        return quote(&text);
    };
    let error = json.get("error");
    let (message, kinds) = match error {
        Some(serde_json::Value::Object(error)) => (
            error.get("message").and_then(|m| m.as_str()),
            [error.get("type"), error.get("code")],
        ),
        Some(serde_json::Value::String(message)) => {
            (Some(message.as_str()), [json.get("error_type"), None])
        }
        _ => (
            json.get("message").and_then(|m| m.as_str()),
            [json.get("type"), None],
        ),
    };
    let Some(message) = message.filter(|m| !m.trim().is_empty()) else {
        return quote(&text);
    };
    let kinds: Vec<String> = kinds
        .into_iter()
        .flatten()
        .filter_map(|kind| match kind {
            serde_json::Value::String(kind) if !kind.is_empty() => Some(kind.clone()),
            serde_json::Value::Number(code) => Some(code.to_string()),
            _ => None,
        })
        .collect();
    if kinds.is_empty() {
        message.to_owned()
    } else {
        format!("{message} ({})", kinds.join(", "))
    }
}

/// Whether a 429 body says the account is out of credit (OpenAI's `insufficient_quota`): the
/// status says "slow down" but waiting does not help, so it is not retried.
pub(super) fn is_quota_exhausted(body: &[u8]) -> bool {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) else {
        return false;
    };
    let Some(error) = json.get("error") else {
        return false;
    };
    ["type", "code"]
        .iter()
        .any(|field| error.get(field).and_then(|v| v.as_str()) == Some("insufficient_quota"))
}

fn quote(text: &str) -> String {
    let text = text.trim();
    if text.is_empty() {
        return "no error message in the response".to_owned();
    }
    match text.char_indices().nth(QUOTED_BODY_CHARS) {
        Some((cut, _)) => format!("{:?}...", &text[..cut]),
        None => format!("{text:?}"),
    }
}

/// How long the server asked to wait before the next request: `retry-after-ms` (OpenAI and
/// Azure send it, more precise) if present, else `Retry-After` as seconds or an HTTP date.
/// `None` when neither is there or parses; a date in the past means "now".
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(millis) = header("retry-after-ms").and_then(|v| v.parse::<f64>().ok())
        && millis.is_finite()
        && millis >= 0.0
    {
        return Duration::try_from_secs_f64(millis / 1000.0).ok();
    }
    let value = header("retry-after")?;
    if let Ok(seconds) = value.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0)
            .then(|| Duration::try_from_secs_f64(seconds).ok())
            .flatten();
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

    #[test]
    fn request_has_the_fields_servers_expect() {
        let input = vec!["a".to_owned(), "b".to_owned()];
        let body = EmbeddingRequest {
            model: "m",
            input: &input,
            encoding_format: "float",
            dimensions: None,
        };
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"model":"m","input":["a","b"],"encoding_format":"float"}"#
        );
        let body = EmbeddingRequest {
            dimensions: Some(256),
            ..body
        };
        assert!(
            serde_json::to_string(&body)
                .unwrap()
                .ends_with(r#","dimensions":256}"#)
        );
    }

    #[test]
    fn error_messages_of_each_server_shape() {
        let openai = br#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
        assert_eq!(
            error_message(openai),
            "Incorrect API key provided (invalid_request_error, invalid_api_key)"
        );
        let tei = br#"{"error":"batch size 64 > maximum allowed batch size 32","error_type":"validation"}"#;
        assert_eq!(
            error_message(tei),
            "batch size 64 > maximum allowed batch size 32 (validation)"
        );
        let old_vllm =
            br#"{"object":"error","message":"model not found","type":"NotFoundError","code":404}"#;
        assert_eq!(error_message(old_vllm), "model not found (NotFoundError)");
        assert_eq!(
            error_message(b"<html>Bad Gateway</html>"),
            r#""<html>Bad Gateway</html>""#
        );
        assert_eq!(error_message(b""), "no error message in the response");
        let long = "x".repeat(1000);
        assert!(error_message(long.as_bytes()).len() < 320);
    }

    #[test]
    fn quota_exhaustion_is_recognised() {
        assert!(is_quota_exhausted(
            br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#
        ));
        assert!(!is_quota_exhausted(
            br#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#
        ));
        assert!(!is_quota_exhausted(b"slow down"));
    }

    #[test]
    fn retry_after_in_every_form() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.insert(*name, HeaderValue::from_str(value).unwrap());
            }
            map
        };
        assert_eq!(retry_after(&headers(&[]), now), None);
        assert_eq!(
            retry_after(&headers(&[("retry-after", "2")]), now),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "1.5")]), now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            retry_after(
                &headers(&[("retry-after", "2"), ("retry-after-ms", "250")]),
                now
            ),
            Some(Duration::from_millis(250))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(7));
        assert_eq!(
            retry_after(&headers(&[("retry-after", &later)]), now),
            Some(Duration::from_secs(7))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(7));
        assert_eq!(
            retry_after(&headers(&[("retry-after", &earlier)]), now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "-1")]), now), None);
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")]), now), None);
    }
}
