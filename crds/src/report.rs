//! An anomaly report as data: what the node agent puts on the `AnomalousEgress` Event about a
//! job's `WorkflowBaseline` (annotation [`ANNOTATION`], JSON), and what the operator's
//! notifiers send. One format, so the Event, the webhook body and the messages say the same.
//!
//! Its strings come from a runner pod (host names from its DNS answers, process names): they are
//! the attacker's words, to be shown as text, never as markup or links.

use serde::{Deserialize, Serialize};

use crate::Protocol;

/// Annotation of the `AnomalousEgress` Event on a `WorkflowBaseline` holding the report's JSON.
pub const ANNOTATION: &str = "runwarden.dev/report";
/// Annotation the operator sets on that Event once its notifiers were given the report.
pub const NOTIFIED_ANNOTATION: &str = "runwarden.dev/notified";
/// Most processes and executables a report names.
pub const MAX_PROCESSES: usize = 8;
/// Most reasons a report gives.
pub const MAX_REASONS: usize = 8;
/// Longest string a report holds (longer ones are cut).
pub const MAX_TEXT: usize = 256;

/// One anomalous destination of one workflow run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AnomalyReport {
    /// Namespace of the runner pod and of the job's baseline.
    pub namespace: String,
    /// `owner/name`.
    pub repository: String,
    /// Workflow file path.
    pub workflow: String,
    /// Job name.
    pub job: String,
    /// Workflow run id.
    pub run_id: String,
    /// ARC's runner scale set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_set: Option<String>,
    /// The runner pod.
    pub pod: String,
    /// Its `EphemeralRunner`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
    /// The job's `WorkflowBaseline`.
    pub baseline: String,
    /// The name the pod looked up, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The address called.
    pub address: String,
    /// Destination port.
    pub port: u16,
    /// `TCP` or `UDP`.
    pub protocol: Protocol,
    /// Process names (`comm`) that called it.
    #[serde(default)]
    pub processes: Vec<String>,
    /// Executables that called it.
    #[serde(default)]
    pub executables: Vec<String>,
    /// `info`, `low`, `medium`, `high` or `critical`.
    pub severity: String,
    /// The detector's suspicion, 0 to 1.
    pub score: f64,
    /// Why it is unusual, strongest first.
    #[serde(default)]
    pub reasons: Vec<String>,
    /// When it was first called (RFC 3339).
    pub first_seen: String,
}

impl AnomalyReport {
    /// Cuts every list and string to the bounds above (the report goes in an annotation and in
    /// messages; a pod chooses how long its names are).
    pub fn bounded(mut self) -> Self {
        let cut = |s: &mut String| {
            if s.len() > MAX_TEXT {
                let mut at = MAX_TEXT;
                while !s.is_char_boundary(at) {
                    at -= 1;
                }
                s.truncate(at);
            }
        };
        self.processes.truncate(MAX_PROCESSES);
        self.executables.truncate(MAX_PROCESSES);
        self.reasons.truncate(MAX_REASONS);
        for s in self.processes.iter_mut().chain(&mut self.executables).chain(&mut self.reasons) {
            cut(s);
        }
        if let Some(h) = &mut self.host {
            cut(h);
        }
        self
    }

    /// `host:port/TCP` (or the address when no name is known).
    pub fn destination(&self) -> String {
        let proto = match self.protocol {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        };
        match &self.host {
            Some(h) => format!("{h}:{}/{proto}", self.port),
            None if self.address.contains(':') => format!("[{}]:{}/{proto}", self.address, self.port),
            None => format!("{}:{}/{proto}", self.address, self.port),
        }
    }

    /// The `spec.approved` entry that approves this destination for the job: the name the pod
    /// looked up (or the single address), this port and protocol.
    pub fn approved_entry(&self) -> serde_json::Value {
        let protocol = serde_json::to_value(self.protocol).unwrap_or_default();
        match &self.host {
            Some(h) => serde_json::json!({"host": h, "ports": [self.port], "protocol": protocol}),
            None => {
                let bits = if self.address.contains(':') { 128 } else { 32 };
                serde_json::json!({"cidr": format!("{}/{bits}", self.address), "ports": [self.port], "protocol": protocol})
            }
        }
    }

    /// The command that approves the destination (appends to `spec.approved`, which the API
    /// server defaults to an empty list).
    pub fn approve_command(&self) -> String {
        let patch = serde_json::json!([{"op": "add", "path": "/spec/approved/-", "value": self.approved_entry()}]);
        format!(
            "kubectl -n {} patch workflowbaseline {} --type=json -p '{}'",
            self.namespace,
            self.baseline,
            patch.to_string().replace('\'', "'\\''")
        )
    }

    /// The lines to add under `spec.approved` of the baseline's manifest (GitOps).
    pub fn approve_manifest(&self) -> String {
        let entry = self.approved_entry();
        let mut lines = Vec::new();
        for (i, (k, v)) in entry.as_object().into_iter().flatten().enumerate() {
            let lead = if i == 0 { "- " } else { "  " };
            lines.push(format!("{lead}{k}: {v}"));
        }
        lines.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> AnomalyReport {
        AnomalyReport {
            namespace: "arc-runners".into(),
            repository: "acme/web".into(),
            workflow: ".github/workflows/ci.yml".into(),
            job: "build".into(),
            run_id: "4711".into(),
            scale_set: Some("big".into()),
            pod: "big-abc-runner-x".into(),
            runner: Some("big-abc-runner-x".into()),
            baseline: "acme-web-ci-build-1234".into(),
            host: Some("paste.example.net".into()),
            address: "203.0.113.7".into(),
            port: 443,
            protocol: Protocol::Tcp,
            processes: vec!["curl".into()],
            executables: vec!["/usr/bin/curl".into()],
            severity: "high".into(),
            score: 0.8,
            reasons: vec!["first call to a new domain".into()],
            first_seen: "2026-12-03T07:00:00Z".into(),
        }
    }

    #[test]
    fn the_approve_command_appends_the_destination_to_the_approved_list() {
        let r = report();
        assert_eq!(
            r.approve_command(),
            "kubectl -n arc-runners patch workflowbaseline acme-web-ci-build-1234 --type=json -p \
             '[{\"op\":\"add\",\"path\":\"/spec/approved/-\",\"value\":{\"host\":\"paste.example.net\",\"ports\":[443],\"protocol\":\"TCP\"}}]'"
        );
        assert_eq!(r.approve_manifest(), "- host: \"paste.example.net\"\n  ports: [443]\n  protocol: \"TCP\"");
        let by_address = AnomalyReport { host: None, address: "2001:db8::7".into(), ..report() };
        assert_eq!(by_address.approved_entry()["cidr"], "2001:db8::7/128");
        assert_eq!(by_address.destination(), "[2001:db8::7]:443/TCP");
    }

    #[test]
    fn a_quote_in_a_name_cannot_end_the_shell_word() {
        let r = AnomalyReport { host: Some("a'; rm -rf /; '".into()), ..report() };
        let cmd = r.approve_command();
        assert!(cmd.contains(r#"a'\''; rm -rf /; '\''"#), "{cmd}");
    }

    #[test]
    fn long_names_and_lists_are_cut() {
        let r = AnomalyReport {
            host: Some("é".repeat(200)),
            processes: vec!["p".into(); 20],
            reasons: vec!["r".repeat(1000); 20],
            ..report()
        }
        .bounded();
        assert!(r.host.as_ref().unwrap().len() <= MAX_TEXT);
        assert_eq!(r.processes.len(), MAX_PROCESSES);
        assert!(r.reasons.iter().all(|s| s.len() == MAX_TEXT) && r.reasons.len() == MAX_REASONS);
    }
}
