//! The hickory-server `RequestHandler` behind muster's TCP listeners.
//! hickory owns the TCP framing, idle timeouts and malformed-message
//! replies; this adapter only asks the shared [`Authority`] for the
//! answer, exactly as the UDP path does.

use std::sync::Arc;

use hickory_proto::op::{Header, HeaderCounts, ResponseCode};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tracing::debug;

use super::answer::Authority;
use super::wire::{Outcome, answer_request, response_edns, response_metadata};
use crate::telemetry::Metrics;

/// Answers queries that hickory's server has already parsed.
pub struct Handler {
    authority: Arc<Authority>,
    metrics: Arc<Metrics>,
}

impl Handler {
    pub fn new(authority: Arc<Authority>, metrics: Arc<Metrics>) -> Self {
        Self { authority, metrics }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let received = std::time::Instant::now();
        let answer = answer_request(&self.authority, request);
        let outcome = Outcome {
            qtype: request.queries.queries().first().map(|q| q.query_type()),
            rcode: answer.rcode,
            truncated: false,
            rrl: None,
        };
        let metadata = response_metadata(&request.metadata, &answer);
        let edns = response_edns(request);
        let response = MessageResponseBuilder::new(&request.queries, edns.as_ref()).build(
            metadata,
            answer.answers.iter(),
            answer.authorities.iter(),
            std::iter::empty(),
            answer.additionals.iter(),
        );
        let sent = response_handle.send_response(response).await;
        self.metrics.record_dns("tcp", &outcome, received.elapsed());
        match sent {
            Ok(info) => info,
            Err(error) => {
                debug!(error = %error, "dns response not sent");
                let mut failed = metadata;
                failed.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata: failed,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}
