//! Writing the answers the gateway makes or reshapes: CORS headers, preflights, an
//! upstream's refusal of an upgrade, and the reading of an upstream's 500.

use super::problem::Problem;
use crate::edge::request_id::REQUEST_ID_HEADER;
use crate::routing::resolve::Target;
use crate::runtime::state::GatewayState;
use crate::secrets::presence::hint;
use crate::secrets::reports::reported_missing;
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::Result;

/// Largest upstream 500 body inspected for the "NAME is not set" signature.
const MAX_INSPECTED_ERROR: usize = 4096;

/// Replaces whatever `Access-Control-*` the upstream sent with the policy's, and marks the
/// answer as varying by Origin.
pub(crate) fn apply_cors(
    response: &mut ResponseHeader,
    headers: &[(&'static str, String)],
) -> Result<()> {
    let upstream_cors: Vec<http::HeaderName> = response
        .headers
        .keys()
        .filter(|name| name.as_str().starts_with("access-control-"))
        .cloned()
        .collect();
    for name in upstream_cors {
        response.remove_header(&name);
    }
    for (name, value) in headers {
        response.insert_header(*name, value.as_str())?;
    }
    response.append_header(http::header::VARY, "Origin")?;
    Ok(())
}

pub(crate) async fn send_preflight(
    session: &mut ServerSession,
    headers: &[(&'static str, String)],
    request_id: &str,
) -> Result<()> {
    let mut response = ResponseHeader::build(204, Some(headers.len() + 3))?;
    apply_cors(&mut response, headers)?;
    response.insert_header(http::header::CONTENT_LENGTH, "0")?;
    response.insert_header(REQUEST_ID_HEADER, request_id)?;
    session.write_response_header(Box::new(response)).await
}

/// Relays an upstream's refusal of an upgrade as the plain HTTP answer it was, so the client
/// sees the status and reason instead of a socket that died with 1006.
pub(crate) async fn relay_refusal(
    session: &mut ServerSession,
    mut response: Box<ResponseHeader>,
    body: bytes::Bytes,
    request_id: &str,
) -> Result<()> {
    for name in ["connection", "transfer-encoding", "keep-alive", "upgrade"] {
        response.remove_header(name);
    }
    response.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    response.insert_header(REQUEST_ID_HEADER, request_id)?;
    session.write_response_header(response).await?;
    session.write_response_body(body, true).await
}

/// Whether requests to this target need secrets, so a 500 may be the field's signature.
pub(crate) fn holds_secrets(target: &Target) -> bool {
    target
        .agent
        .as_ref()
        .is_some_and(|a| !a.agent.required_secrets.is_empty())
}

/// Whether an upstream 500 is small enough to hold back and read for the signature.
pub(crate) fn is_small(response: &ResponseHeader) -> bool {
    response
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|len| len <= MAX_INSPECTED_ERROR)
}

/// The answer for an upstream 500: `secret_missing` when it is the field's "NAME is not
/// set" (and the upstream is marked as lacking it), else an `upstream_error` carrying its text.
pub(crate) fn upstream_error_answer(
    state: &GatewayState,
    target: &Target,
    status: u16,
    body: &[u8],
) -> Problem {
    let upstream = &target.upstream;
    let required = target
        .agent
        .as_ref()
        .map_or(&[][..], |a| a.agent.required_secrets.as_slice());
    match reported_missing(status, body, required) {
        Some(secret) => {
            state.upstream_reported_missing(&upstream.name, secret);
            Problem::secret_missing(secret, &hint(upstream, secret, None))
        }
        None => Problem::upstream_status(&upstream.name, status, body),
    }
}
