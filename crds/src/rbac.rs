//! RBAC as data: each component (operator, node agent) lists the permissions its code uses, and
//! the same list generates its manifests (`make generate`) and drives its preflight check at
//! start, so the two cannot drift apart.

use k8s_openapi::api::authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::{Value, json};

/// One permission: API group, resource (with `/subresource`), verbs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permission {
    /// API group (`""` for core).
    pub group: &'static str,
    /// Resource, or `resource/subresource`.
    pub resource: &'static str,
    /// Verbs.
    pub verbs: &'static [&'static str],
    /// Why the component needs it (written into the manifest).
    pub why: &'static str,
}

/// The ServiceAccount of a component and everything it may do.
#[derive(Clone, Copy, Debug)]
pub struct Rbac {
    /// Name of the ServiceAccount, ClusterRole, Role and bindings.
    pub name: &'static str,
    /// `app.kubernetes.io/component` label.
    pub component: &'static str,
    /// The source file, named in the generated manifest's header.
    pub source: &'static str,
    /// Cluster-wide permissions.
    pub cluster: &'static [Permission],
    /// Permissions in the component's own namespace.
    pub namespaced: &'static [Permission],
}

fn rules(perms: &[Permission]) -> Vec<Value> {
    perms.iter().map(|p| json!({"apiGroups": [p.group], "resources": [p.resource], "verbs": p.verbs})).collect()
}

impl Rbac {
    /// ServiceAccount, ClusterRole and ClusterRoleBinding, and Role and RoleBinding when there
    /// are namespaced permissions, for the component in `namespace`.
    pub fn manifests(&self, namespace: &str) -> Vec<Value> {
        let name = self.name;
        let labels = json!({"app.kubernetes.io/name": "runwarden", "app.kubernetes.io/component": self.component});
        let subject = json!([{"kind": "ServiceAccount", "name": name, "namespace": namespace}]);
        let mut out = vec![
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": name, "namespace": namespace, "labels": labels}}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                   "metadata": {"name": name, "labels": labels}, "rules": rules(self.cluster)}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": name, "labels": labels},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
                   "subjects": subject}),
        ];
        if !self.namespaced.is_empty() {
            out.push(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                   "metadata": {"name": name, "namespace": namespace, "labels": labels}, "rules": rules(self.namespaced)}));
            out.push(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                   "metadata": {"name": name, "namespace": namespace, "labels": labels},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                   "subjects": subject}));
        }
        out
    }

    /// The manifests as one YAML document stream, with each permission's reason as a comment.
    pub fn yaml(&self, namespace: &str) -> String {
        let mut out =
            format!("# Generated from {} by `make generate`. Do not edit.\n# Why each permission:\n", self.source);
        for p in self.cluster.iter().chain(self.namespaced) {
            let group = if p.group.is_empty() { "core" } else { p.group };
            out.push_str(&format!("#   {group} {} [{}]: {}\n", p.resource, p.verbs.join(", "), p.why));
        }
        for m in self.manifests(namespace) {
            out.push_str("---\n");
            out.push_str(&serde_yaml::to_string(&m).expect("manifests serialize"));
        }
        out
    }

    /// The permissions `client` lacks, as `verb group/resource[ in namespace]`, asked of the API
    /// server with SelfSubjectAccessReviews (`namespace` is the component's own).
    pub async fn missing(&self, client: &Client, namespace: &str) -> Result<Vec<String>, kube::Error> {
        let mut missing = Vec::new();
        let checks = self.cluster.iter().map(|p| (p, None)).chain(self.namespaced.iter().map(|p| (p, Some(namespace))));
        for (p, ns) in checks {
            for verb in p.verbs {
                if !allowed(client, p, verb, ns).await? {
                    let group = if p.group.is_empty() { "core" } else { p.group };
                    let scope = ns.map(|n| format!(" in {n}")).unwrap_or_default();
                    missing.push(format!("{verb} {group}/{}{scope}", p.resource));
                }
            }
        }
        Ok(missing)
    }
}

async fn allowed(client: &Client, p: &Permission, verb: &str, namespace: Option<&str>) -> Result<bool, kube::Error> {
    let (resource, subresource) = match p.resource.split_once('/') {
        Some((r, s)) => (r, Some(s.to_string())),
        None => (p.resource, None),
    };
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                group: Some(p.group.to_string()),
                resource: Some(resource.to_string()),
                subresource,
                verb: Some(verb.to_string()),
                namespace: namespace.map(str::to_string),
                ..ResourceAttributes::default()
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let answer = api.create(&PostParams::default(), &review).await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}
