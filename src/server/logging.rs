//! Log lines of a cluster node name the node: `node=ID` first on each text line,
//! `"node":"ID"` first in each JSON object, once the node's id is known
//! ([`set_node`], by the cluster shell). A node running alone logs as before.

use std::fmt;
use std::sync::OnceLock;

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

static NODE: OnceLock<String> = OnceLock::new();

/// This process's node id, for every log line from now on (set once).
pub fn set_node(id: &str) {
    let _ = NODE.set(id.to_owned());
}

/// An event format that puts the node id before what `inner` writes.
struct WithNode<F> {
    inner: F,
    json: bool,
}

impl<S, N, F> FormatEvent<S, N> for WithNode<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let Some(node) = NODE.get() else {
            return self.inner.format_event(ctx, writer, event);
        };
        if !self.json {
            write!(writer, "node={node} ")?;
            return self.inner.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => {
                let id = serde_json::to_string(node).map_err(|_| fmt::Error)?;
                write!(writer, "{{\"node\":{id},{rest}")
            }
            None => writer.write_str(&line),
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), as text or JSON.
pub fn init(log_format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = if log_format == "json" {
        builder
            .json()
            .event_format(WithNode {
                inner: format().json(),
                json: true,
            })
            .try_init()
    } else {
        builder
            .event_format(WithNode {
                inner: format(),
                json: false,
            })
            .try_init()
    };
}

fn format() -> format::Format {
    format::Format::default()
}
