//! `mesh-agent run --visualizer-addr`: a live page of the swarm, as the
//! Docker Swarm Visualizer draws it (one column per node, one box per
//! task, a colour per service), served by a manager itself: the page and
//! its script are in the binary, no CDN. `GET /` is the page, `GET /state`
//! the swarm as JSON, `GET /events` the same as a server-sent event, which
//! the page asks for again every half second. What it draws is made from
//! the store by `manager::visualizer`.

use std::future::Future;

use tokio::net::TcpListener;

use super::server::{accept_loop, request_line, write_response};

/// The page.
pub(crate) const PAGE: &str = include_str!("visualizer.html");
/// How soon the page asks `/events` again.
const RETRY_MS: u64 = 500;

/// Serves `listener`; `current` gives the view as JSON (`None` while this
/// node is no manager).
pub async fn serve<F, Fut>(listener: TcpListener, current: F)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Option<String>> + Send,
{
    accept_loop(listener, move |mut stream, head| {
        let current = current.clone();
        async move {
            let view = || async { current().await.unwrap_or_else(|| "null".into()) };
            match request_line(&head) {
                ("GET", "/") => write_response(&mut stream, 200, "text/html; charset=utf-8", PAGE).await,
                ("GET", "/state") => write_response(&mut stream, 200, "application/json", &view().await).await,
                // The view now; the stream ends and the page's EventSource
                // comes back after RETRY_MS for the next one. Short streams
                // pass proxies that buffer, leave nothing open for a page that
                // went away, and let headless browsers (which wait for open
                // requests) finish rendering.
                ("GET", "/events") => {
                    let event = format!("retry: {RETRY_MS}\ndata: {}\n\n", view().await);
                    write_response(&mut stream, 200, "text/event-stream", &event).await
                }
                _ => write_response(&mut stream, 404, "text/plain", "not found: /, /state or /events\n").await,
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_asks_for_events_and_loads_nothing_from_elsewhere() {
        assert!(PAGE.contains("EventSource(\"/events\")") && !PAGE.contains("https://"));
    }
}
