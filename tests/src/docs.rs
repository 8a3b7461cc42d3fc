//! The part of `docs/operations.md` generated from the chart's alerts
//! (`charts/runwarden/files/alerts.yaml`): one section per alert with its severity, summary,
//! expression and runbook, so that the documentation and the shipped rules cannot differ.
//! `make generate` rewrites it (`runwarden-docs`); a test fails when it is stale.

use std::path::{Path, PathBuf};

/// Where the generated part starts and ends in `docs/operations.md`.
pub const BEGIN: &str = "<!-- alerts: generated from charts/runwarden/files/alerts.yaml by `make generate` -->";
/// See [`BEGIN`].
pub const END: &str = "<!-- end of generated alerts -->";

/// The repository's root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The section for every alert of `alerts_yaml`, in order.
pub fn alerts_section(alerts_yaml: &str) -> Result<String, String> {
    let alerts: serde_yaml::Value = serde_yaml::from_str(alerts_yaml).map_err(|e| format!("alerts.yaml: {e}"))?;
    let text = |v: &serde_yaml::Value| v.as_str().unwrap_or_default().trim().to_string();
    let mut out = String::new();
    for group in alerts["groups"].as_sequence().ok_or("alerts.yaml: no groups")? {
        for rule in group["rules"].as_sequence().ok_or("alerts.yaml: a group without rules")? {
            let name = text(&rule["alert"]);
            let pending = rule["for"].as_str().map(|f| format!(", after {f}")).unwrap_or_default();
            out.push_str(&format!(
                "### {name}\n\n{} ({}{pending})\n\n```promql\n{}\n```\n\n{}\n\nWhat to do: {}\n\n",
                text(&rule["annotations"]["summary"]),
                text(&rule["labels"]["severity"]),
                text(&rule["expr"]),
                text(&rule["annotations"]["description"]),
                text(&rule["annotations"]["runbook"]),
            ));
        }
    }
    Ok(out)
}

/// `doc` with the part between [`BEGIN`] and [`END`] replaced by `section`.
pub fn with_section(doc: &str, section: &str) -> Result<String, String> {
    let start = doc.find(BEGIN).ok_or("docs/operations.md has no generated-alerts marker")? + BEGIN.len();
    let end = doc.find(END).ok_or("docs/operations.md has no end-of-alerts marker")?;
    Ok(format!("{}\n\n{section}{}", &doc[..start], &doc[end..]))
}

/// `docs/operations.md` as it should be.
pub fn operations() -> Result<String, String> {
    let root = root();
    let read = |p: &str| std::fs::read_to_string(root.join(p)).map_err(|e| format!("{p}: {e}"));
    with_section(&read("docs/operations.md")?, &alerts_section(&read("charts/runwarden/files/alerts.yaml")?)?)
}
