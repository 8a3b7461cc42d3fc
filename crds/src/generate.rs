//! Renders the CRD manifests from the Rust types, the way `make generate` writes them.

use kube::CustomResourceExt;

use crate::{EgressPolicy, WorkflowBaseline, WorkflowRun};

/// Header written at the top of every generated file.
const HEADER: &str = "# Generated from the Rust types in crds/src by `make generate`. Do not edit.\n";

/// Every CRD as (file name under `crds/`, YAML text).
pub fn render() -> Vec<(&'static str, String)> {
    vec![
        ("egresspolicies.yaml", to_yaml(&EgressPolicy::crd())),
        ("workflowbaselines.yaml", to_yaml(&WorkflowBaseline::crd())),
        ("workflowruns.yaml", to_yaml(&WorkflowRun::crd())),
    ]
}

/// The CRDs as templates of the Helm chart (`charts/runwarden/templates/crds/`): rendered when
/// `crds.install` is set, so `helm upgrade` updates them (Helm's own `crds/` directory never
/// does), and kept at uninstall when `crds.keep` is set (the default: deleting a CRD deletes
/// every baseline and policy).
pub fn render_chart() -> Vec<(&'static str, String)> {
    render()
        .into_iter()
        .map(|(name, yaml)| {
            let body = yaml.strip_prefix(HEADER).unwrap_or(&yaml).replacen(
                "\nmetadata:\n",
                "\nmetadata:\n  {{- if .Values.crds.keep }}\n  annotations:\n    helm.sh/resource-policy: keep\n  {{- end }}\n",
                1,
            );
            let header = "# Generated from the Rust types in crds/src by `make generate`. Do not edit.\n";
            (name, format!("{header}{{{{- if .Values.crds.install }}}}\n{body}{{{{- end }}}}\n"))
        })
        .collect()
}

fn to_yaml<T: serde::Serialize>(value: &T) -> String {
    let mut value = serde_json::to_value(value).expect("a CRD always serializes");
    kubernetes_formats(&mut value);
    let body = serde_yaml::to_string(&value).expect("a CRD always serializes to YAML");
    format!("{HEADER}{body}")
}

/// schemars names Rust's unsigned integers `uint16`, `uint32`...: formats Kubernetes does not
/// know, warned about on every apply. The smallest signed format that holds the range is used
/// instead (the `minimum`/`maximum` schemars writes keep the range).
fn kubernetes_formats(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::String(format)) = map.get_mut("format") {
                match format.as_str() {
                    "uint8" | "uint16" => *format = "int32".into(),
                    "uint32" | "uint64" | "uint" => *format = "int64".into(),
                    _ => {}
                }
            }
            map.values_mut().for_each(kubernetes_formats);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(kubernetes_formats),
        _ => {}
    }
}
