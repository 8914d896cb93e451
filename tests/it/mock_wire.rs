//! The OpenAI adapter against the mock provider's real wire output: what the gateway
//! bills from a stream must equal what the same call reports without streaming.

use crate::{http10, start_mock};
use bytes::BytesMut;
use llm_gateway::providers::openai::{parse_usage, ChatStream};

#[test]
fn stream_usage_equals_non_stream_usage_and_is_stripped() {
    let (_mock, addr) = start_mock();
    let body = |stream: bool| {
        serde_json::json!({
            "model": "gpt-4o-mini",
            "stream": stream,
            "stream_options": if stream { serde_json::json!({"include_usage": true}) } else { serde_json::Value::Null },
            "messages": [{"role": "user", "content": "count my tokens please [[mock: tokens=7]]"}],
        })
        .to_string()
    };
    let (status, _, plain) = http10(addr, "POST", "/v1/chat/completions", body(false).as_bytes());
    assert_eq!(status, 200);
    let plain: serde_json::Value = serde_json::from_slice(&plain).unwrap();
    let expected = parse_usage(&plain["usage"]).unwrap();
    assert_eq!(expected.output, 7);

    let (status, head, streamed) =
        http10(addr, "POST", "/v1/chat/completions", body(true).as_bytes());
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase().contains("text/event-stream"),
        "{head}"
    );
    // Fed one byte at a time, as the worst network would deliver it.
    let mut s = ChatStream::new(true);
    let mut out = BytesMut::new();
    for b in streamed.chunks(1) {
        s.feed(b, &mut out);
    }
    let c = s.finish(&mut out);
    assert!(c.complete);
    assert_eq!(c.usage, Some(expected));
    let text = String::from_utf8(out.to_vec()).unwrap();
    assert!(
        !text.contains("\"usage\""),
        "usage leaked to the client: {text}"
    );
    assert!(text.ends_with("data: [DONE]\n\n"));
}
