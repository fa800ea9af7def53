//! Runs an admitted request's authentication policy, the one step of admission that may wait
//! (for a JWKS fetch or the forward-auth service), so it is kept out of the pure
//! [`super::admission::admit`]. Nothing reaches an upstream before it has decided.

use super::admission::{agent_label, Admission, RefusalReason, Refused};
use super::problem::Problem;
use super::upstream_request::ClientInfo;
use crate::auth::authenticator::AgentRef;
use crate::auth::metrics::AuthMetrics;
use crate::auth::ALLOWED;
use crate::runtime::state::ActiveConfig;
use pingora::http::RequestHeader;
use std::sync::Arc;

/// Turns `admission` into a refusal when the agent's policy does not let the request
/// through; a verified client's identity goes into `client` for the upstream request.
pub(crate) async fn authorize(
    active: &ActiveConfig,
    metrics: &AuthMetrics,
    request: &RequestHeader,
    admission: Admission,
    client: &mut ClientInfo,
) -> Admission {
    let (admitted, websocket) = match &admission {
        Admission::Forward(admitted) => (admitted, false),
        Admission::Upgrade(admitted) => (admitted, true),
        _ => return admission,
    };
    let Some(agent) = &admitted.target.agent else {
        return admission;
    };
    let Some(policy) = &agent.agent.auth else {
        return admission;
    };
    let agent_ref = AgentRef {
        slug: &agent.agent.slug,
        binding: &agent.agent.name,
        instance: &agent.instance,
    };
    let decision = active
        .auth
        .authenticate(policy, request, &agent_ref, metrics)
        .await;
    let method = policy.method.label();
    match decision {
        Ok(verified) => {
            metrics.decided(&admitted.route, method, ALLOWED);
            client.identity = Some(Arc::new(verified));
            admission
        }
        Err(failure) => {
            metrics.decided(&admitted.route, method, failure.result());
            Admission::Refuse(Refused {
                problem: Problem::auth(&failure, &policy.name),
                reason: RefusalReason::Auth,
                route: admitted.route.clone(),
                agent: agent_label(&admitted.target).to_owned(),
                upstream: None,
                websocket,
            })
        }
    }
}
