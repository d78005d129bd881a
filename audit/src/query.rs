//! Queries over records from many sidecars' logs, and the call tree of one request.

use std::fmt::Write as _;

use serde::Serialize;

use crate::format::Record;

/// A record with where it came from.
#[derive(Debug, Clone, Serialize)]
pub struct Located {
    /// The log (folder or store) it was read from.
    pub log: String,
    /// Its sequence number there.
    pub seq: u64,
    /// The record.
    #[serde(flatten)]
    pub record: Record,
}

impl Located {
    /// Who called: the peer for inbound records, this sidecar for outbound ones.
    pub fn caller(&self) -> &str {
        if self.record.direction == "inbound" {
            &self.record.peer
        } else {
            &self.record.local
        }
    }

    /// Who was called.
    pub fn callee(&self) -> &str {
        if self.record.direction == "inbound" {
            &self.record.local
        } else {
            &self.record.peer
        }
    }
}

/// A pattern: exact, or a prefix ending in `*`.
fn matches(pattern: &Option<String>, v: &str) -> bool {
    match pattern {
        None => true,
        Some(p) => match p.strip_suffix('*') {
            Some(prefix) => v.starts_with(prefix),
            None => v == p,
        },
    }
}

/// What `query` selects. Unset fields match everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Caller SPIFFE ID (exact or `prefix*`).
    pub caller: Option<String>,
    /// Callee SPIFFE ID (exact or `prefix*`).
    pub callee: Option<String>,
    /// Path (exact or `prefix*`).
    pub path: Option<String>,
    /// Decision (`allow`, `deny`, `bad_chain`, `unauthenticated`, `error`).
    pub decision: Option<String>,
    /// Trace id.
    pub trace_id: Option<String>,
    /// From this unix time (microseconds), inclusive.
    pub since_us: Option<i64>,
    /// Until this unix time (microseconds), exclusive.
    pub until_us: Option<i64>,
}

impl Filter {
    /// Whether `r` is selected.
    pub fn accepts(&self, r: &Located) -> bool {
        matches(&self.caller, r.caller())
            && matches(&self.callee, r.callee())
            && matches(&self.path, &r.record.path)
            && matches(&self.decision, &r.record.decision)
            && matches(&self.trace_id, &r.record.trace_id)
            && self.since_us.is_none_or(|s| r.record.time_us >= s)
            && self.until_us.is_none_or(|u| r.record.time_us < u)
    }
}

/// One call in a trace.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Call {
    /// Caller SPIFFE ID.
    pub from: String,
    /// Callee SPIFFE ID.
    pub to: String,
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Status the callee's sidecar returned (or the caller's, when the callee has no record).
    pub status: u16,
    /// Decision at the callee (or `unrecorded` when only the caller logged it).
    pub decision: String,
    /// Deciding policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Depth in the tree (1 = called by the origin).
    pub depth: usize,
    /// The callers above, origin first.
    pub chain: Vec<String>,
    /// Unix microseconds.
    pub time_us: i64,
    /// Duration at the callee's sidecar.
    pub duration_us: u64,
    /// Notes (chain refusals, restarts).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// The call tree of one request.
#[derive(Debug, Clone, Serialize)]
pub struct Trace {
    /// Trace id.
    pub trace_id: String,
    /// Services, in order of first appearance.
    pub services: Vec<String>,
    /// Calls, in time order.
    pub calls: Vec<Call>,
}

/// Builds the call tree of `trace_id` from records of any number of sidecars.
pub fn trace(trace_id: &str, records: &[Located]) -> Trace {
    let mut rs: Vec<&Located> = records.iter().filter(|r| r.record.trace_id == trace_id).collect();
    rs.sort_by_key(|r| r.record.time_us);
    let mut calls: Vec<Call> = Vec::new();
    // The callee's inbound record is authoritative (it saw the verified chain and made the decision).
    for r in rs.iter().filter(|r| r.record.direction == "inbound") {
        let chain = if r.record.chain.is_empty() {
            vec![r.record.peer.clone()]
        } else {
            r.record.chain.clone()
        };
        calls.push(Call {
            from: r.record.peer.clone(),
            to: r.record.local.clone(),
            method: r.record.method.clone(),
            path: r.record.path.clone(),
            status: r.record.status,
            decision: r.record.decision.clone(),
            policy: r.record.policy.clone(),
            depth: chain.len(),
            chain,
            time_us: r.record.time_us,
            duration_us: r.record.duration_us,
            note: r.record.note.clone(),
        });
    }
    // Outbound records the callee never logged (refused at the handshake, callee log not collected).
    for r in rs.iter().filter(|r| r.record.direction == "outbound") {
        let answered = calls.iter().any(|c| {
            c.from == r.record.local
                && r.record.peer.split(" | ").any(|p| p == c.to)
                && c.path == r.record.path
        });
        if !answered {
            let chain = if r.record.chain.is_empty() {
                vec![r.record.local.clone()]
            } else {
                r.record.chain.clone()
            };
            calls.push(Call {
                from: r.record.local.clone(),
                to: r.record.peer.clone(),
                method: r.record.method.clone(),
                path: r.record.path.clone(),
                status: r.record.status,
                decision: "unrecorded".into(),
                policy: None,
                depth: chain.len(),
                chain,
                time_us: r.record.time_us,
                duration_us: r.record.duration_us,
                note: if r.record.note.is_empty() {
                    "only the caller recorded this call".into()
                } else {
                    r.record.note.clone()
                },
            });
        }
    }
    calls.sort_by_key(|c| (c.depth, c.time_us));
    let mut services: Vec<String> = Vec::new();
    for c in &calls {
        for s in c.chain.iter().chain([&c.from, &c.to]) {
            if !services.contains(s) {
                services.push(s.clone());
            }
        }
    }
    Trace {
        trace_id: trace_id.to_owned(),
        services,
        calls,
    }
}

impl Trace {
    /// An indented text tree.
    pub fn to_text(&self) -> String {
        let mut out = format!("trace {}\n", self.trace_id);
        let roots: Vec<&Call> = self.calls.iter().filter(|c| c.depth == 1).collect();
        let mut origins: Vec<&str> = roots.iter().map(|c| c.from.as_str()).collect();
        origins.dedup();
        if origins.is_empty() {
            origins = self.calls.iter().map(|c| c.from.as_str()).take(1).collect();
        }
        for o in origins {
            let _ = writeln!(out, "{o}");
            self.text_children(&mut out, &[o.to_owned()], 1);
        }
        out
    }

    fn text_children(&self, out: &mut String, path: &[String], depth: usize) {
        for c in self.calls.iter().filter(|c| c.depth == depth && c.chain == path) {
            let policy = c
                .policy
                .as_deref()
                .map(|p| format!(" by {p}"))
                .unwrap_or_default();
            let note = if c.note.is_empty() {
                String::new()
            } else {
                format!(" [{}]", c.note)
            };
            let _ = writeln!(
                out,
                "{}└─ {} {} -> {}  {} {}{policy}{note}",
                "   ".repeat(depth - 1),
                c.method,
                c.path,
                c.to,
                c.status,
                c.decision
            );
            let mut next = path.to_vec();
            next.push(c.to.clone());
            self.text_children(out, &next, depth + 1);
        }
    }

    /// Graphviz DOT.
    pub fn to_dot(&self) -> String {
        let q = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        let mut out = format!(
            "digraph \"trace {}\" {{\n  rankdir=LR;\n  node [shape=box];\n",
            self.trace_id
        );
        for s in &self.services {
            let _ = writeln!(out, "  \"{}\";", q(s));
        }
        for c in &self.calls {
            let color = if c.status < 400 && c.decision == "allow" {
                "black"
            } else {
                "red"
            };
            let _ = writeln!(
                out,
                "  \"{}\" -> \"{}\" [label=\"{} {} {} {}\", color={color}];",
                q(&c.from),
                q(&c.to),
                q(&c.method),
                q(&c.path),
                c.status,
                q(&c.decision)
            );
        }
        out.push_str("}\n");
        out
    }

    /// A self-contained HTML page that draws the call graph (inline SVG, no external resources).
    pub fn to_html(&self) -> String {
        let data = serde_json::to_string(self)
            .unwrap_or_else(|_| "{}".into())
            .replace("</", "<\\/");
        HTML.replace("__TITLE__", &self.trace_id)
            .replace("__DATA__", &data)
    }
}

const HTML: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Trustline trace __TITLE__</title>
<style>
body{font:14px system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:18px} .node rect{fill:#eef4ff;stroke:#3b6fd8;rx:6} .node text{font:12px monospace}
.edge path{fill:none;stroke:#555;stroke-width:1.5} .edge.denied path{stroke:#c62828;stroke-dasharray:5 3}
.edge text{font:11px monospace;fill:#333} .edge.denied text{fill:#c62828}
table{border-collapse:collapse;margin-top:16px} td,th{border:1px solid #ccc;padding:4px 8px;font:12px monospace}
</style></head><body>
<h1>Trace <code>__TITLE__</code></h1>
<svg id="graph" xmlns="http://www.w3.org/2000/svg"></svg>
<table id="calls"><thead><tr><th>depth</th><th>from</th><th>to</th><th>request</th><th>status</th><th>decision</th><th>policy</th><th>note</th></tr></thead><tbody></tbody></table>
<script id="trace-data" type="application/json">__DATA__</script>
<script>
(function () {
  const t = JSON.parse(document.getElementById('trace-data').textContent);
  const svg = document.getElementById('graph');
  const NS = 'http://www.w3.org/2000/svg';
  const W = 250, H = 44, GX = 230, GY = 50;
  // Column = depth of first appearance in a chain; row = order within the column.
  const col = {};
  t.services.forEach(s => { col[s] = Infinity; });
  t.calls.forEach(c => {
    c.chain.forEach((s, i) => { col[s] = Math.min(col[s], i); });
    col[c.to] = Math.min(col[c.to], c.depth);
  });
  const rows = {}, pos = {};
  t.services.forEach(s => {
    const k = isFinite(col[s]) ? col[s] : 0;
    rows[k] = (rows[k] || 0) + 1;
    pos[s] = { x: 20 + k * (W + GX), y: 20 + (rows[k] - 1) * (H + GY) };
  });
  const maxX = Math.max(...Object.values(pos).map(p => p.x)) + W + 20;
  const maxY = Math.max(...Object.values(pos).map(p => p.y)) + H + 20 + t.calls.length * 14;
  svg.setAttribute('width', maxX); svg.setAttribute('height', maxY);
  function el(name, attrs, parent) {
    const e = document.createElementNS(NS, name);
    Object.entries(attrs).forEach(([k, v]) => e.setAttribute(k, v));
    parent.appendChild(e); return e;
  }
  const labels = [];
  t.calls.forEach((c, i) => {
    const a = pos[c.from], b = pos[c.to];
    if (!a || !b) return;
    const ok = c.decision === 'allow' && c.status < 400;
    const g = el('g', { class: 'edge' + (ok ? '' : ' denied') }, svg);
    const x1 = a.x + W, y1 = a.y + H / 2 + (i % 3) * 6, x2 = b.x, y2 = b.y + H / 2 + (i % 3) * 6;
    el('path', { d: `M${x1},${y1} C${x1 + GX / 2},${y1} ${x2 - GX / 2},${y2} ${x2},${y2}` }, g);
    labels.push([g, x1 + 8, (y1 + y2) / 2 - 6 - (i % 3) * 12, `${c.method} ${c.path} ${c.status} ${c.decision}`]);
    const row = document.querySelector('#calls tbody').insertRow();
    [c.depth, c.from, c.to, c.method + ' ' + c.path, c.status, c.decision, c.policy || '', c.note || '']
      .forEach(v => { row.insertCell().textContent = v; });
  });
  t.services.forEach(s => {
    const p = pos[s];
    const g = el('g', { class: 'node', 'data-id': s }, svg);
    el('rect', { x: p.x, y: p.y, width: W, height: H }, g);
    const tx = el('text', { x: p.x + 10, y: p.y + H / 2 + 4 }, g);
    tx.textContent = s;
  });
  // Edge labels last, so no box covers them.
  labels.forEach(([g, x, y, text]) => { el('text', { x: x, y: y }, g).textContent = text; });
  document.body.setAttribute('data-rendered', t.calls.length);
})();
</script></body></html>
"##;

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::too_many_arguments)]
    fn rec(
        dir: &str,
        local: &str,
        peer: &str,
        path: &str,
        chain: &[&str],
        status: u16,
        decision: &str,
        t: i64,
    ) -> Located {
        Located {
            log: local.into(),
            seq: 0,
            record: Record {
                time_us: t,
                trace_id: "t1".into(),
                direction: dir.into(),
                local: local.into(),
                peer: peer.into(),
                method: "GET".into(),
                path: path.into(),
                status,
                decision: decision.into(),
                chain: chain.iter().map(|s| (*s).to_owned()).collect(),
                ..Default::default()
            },
        }
    }

    #[test]
    fn the_call_tree_of_a_trace() {
        let rs = vec![
            rec("outbound", "a", "b", "/x", &["a"], 200, "allow", 1),
            rec("inbound", "b", "a", "/x", &["a"], 200, "allow", 2),
            rec("outbound", "b", "c", "/y", &["a", "b"], 200, "allow", 3),
            rec("inbound", "c", "b", "/y", &["a", "b"], 200, "allow", 4),
            rec("outbound", "b", "d", "/z", &["a", "b"], 502, "error", 5),
        ];
        let t = trace("t1", &rs);
        assert_eq!(t.services, vec!["a", "b", "c", "d"]);
        assert_eq!(t.calls.len(), 3);
        assert_eq!(t.calls[2].decision, "unrecorded");
        let text = t.to_text();
        assert!(
            text.contains("a\n└─ GET /x -> b  200 allow\n   └─ GET /y -> c  200 allow"),
            "{text}"
        );
        assert!(t.to_dot().contains("\"b\" -> \"d\""));
        let html = t.to_html();
        assert!(html.contains("\"trace_id\":\"t1\"") && !html.contains("__DATA__"));
        let f = Filter {
            caller: Some("b".into()),
            ..Default::default()
        };
        assert_eq!(rs.iter().filter(|r| f.accepts(r)).count(), 3);
        let f = Filter {
            path: Some("/y*".into()),
            decision: Some("allow".into()),
            ..Default::default()
        };
        assert_eq!(rs.iter().filter(|r| f.accepts(r)).count(), 2);
    }
}
