//! Renders the CRD manifests from the Rust types, the way `make generate` writes them.

use kube::CustomResourceExt;

use crate::{EgressPolicy, WorkflowBaseline};

/// Header written at the top of every generated file.
const HEADER: &str = "# Generated from the Rust types in crds/src by `make generate`. Do not edit.\n";

/// Every CRD as (file name under `crds/`, YAML text).
pub fn render() -> Vec<(&'static str, String)> {
    vec![
        ("egresspolicies.yaml", to_yaml(&EgressPolicy::crd())),
        ("workflowbaselines.yaml", to_yaml(&WorkflowBaseline::crd())),
    ]
}

fn to_yaml<T: serde::Serialize>(value: &T) -> String {
    let body = serde_yaml::to_string(value).expect("a CRD always serializes to YAML");
    format!("{HEADER}{body}")
}
