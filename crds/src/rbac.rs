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
    /// Permissions in the namespaces that hold runners (their pods, baselines, policies,
    /// notifier Secrets, Events): a Role in each when they are listed (`runnerNamespaces`),
    /// cluster-wide when they are not.
    pub runner: &'static [Permission],
    /// A permission granted only on the objects an administrator lists at install (`None`:
    /// none), never cluster-wide.
    pub listed: Option<Listed>,
    /// Cluster-wide permissions a feature that is off by default needs: in a ClusterRole of
    /// their own, rendered by the chart only when the feature is on, and checked at start only
    /// then (see [`Rbac::missing_optional`]).
    pub optional: Option<Optional>,
}

/// Cluster permissions of a feature that is off by default.
#[derive(Clone, Copy, Debug)]
pub struct Optional {
    /// The permissions.
    pub permissions: &'static [Permission],
    /// The Helm condition that turns the feature on (`and .Values.a .Values.b`).
    pub condition: &'static str,
    /// Suffix of the ClusterRole's and ClusterRoleBinding's name (`<name>-<suffix>`).
    pub suffix: &'static str,
}

/// A permission granted only in the namespaces, and on the names, an administrator lists (the
/// chart value [`Listed::value`]: `[{namespace, names}]`): a Role with `resourceNames` in each
/// namespace; a namespace listed without names grants it on every object of that kind there.
#[derive(Clone, Copy, Debug)]
pub struct Listed {
    /// The permission (verbs that take `resourceNames`: get, update, patch, delete).
    pub permission: Permission,
    /// The chart value that lists the objects.
    pub value: &'static str,
    /// Suffix of the Role's and RoleBinding's name (`<name>-<suffix>`).
    pub suffix: &'static str,
}

/// Objects of a [`Listed`] permission in one namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct Grant {
    /// Namespace.
    pub namespace: String,
    /// Names (empty: every object of the kind in the namespace).
    #[serde(default)]
    pub names: Vec<String>,
}

fn rules(perms: &[Permission]) -> Vec<Value> {
    perms.iter().map(|p| json!({"apiGroups": [p.group], "resources": [p.resource], "verbs": p.verbs})).collect()
}

impl Rbac {
    /// ServiceAccount, ClusterRole and ClusterRoleBinding, and Role and RoleBinding when there
    /// are namespaced permissions, for the component in `namespace`; the runner permissions
    /// cluster-wide.
    pub fn manifests(&self, namespace: &str) -> Vec<Value> {
        self.manifests_for(namespace, &[])
    }

    /// As [`Self::manifests`], with the runner permissions granted only in `runner_namespaces`
    /// (a Role and RoleBinding in each) when it is not empty.
    pub fn manifests_for(&self, namespace: &str, runner_namespaces: &[String]) -> Vec<Value> {
        let name = self.name;
        let labels = json!({"app.kubernetes.io/name": "runwarden", "app.kubernetes.io/component": self.component});
        let subject = json!([{"kind": "ServiceAccount", "name": name, "namespace": namespace}]);
        let mut cluster = rules(self.cluster);
        if runner_namespaces.is_empty() {
            cluster.extend(rules(self.runner));
        }
        let role = |ns: &str, perms: &[Permission]| {
            [
                json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                       "metadata": {"name": name, "namespace": ns, "labels": labels}, "rules": rules(perms)}),
                json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                       "metadata": {"name": name, "namespace": ns, "labels": labels},
                       "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                       "subjects": subject}),
            ]
        };
        let mut out = vec![
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": name, "namespace": namespace, "labels": labels}}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                   "metadata": {"name": name, "labels": labels}, "rules": cluster}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": name, "labels": labels},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
                   "subjects": subject}),
        ];
        if !self.namespaced.is_empty() {
            out.extend(role(namespace, self.namespaced));
        }
        for ns in runner_namespaces {
            out.extend(role(ns, self.runner));
        }
        out.extend(self.optional_manifests(namespace));
        out
    }

    /// The ClusterRole and ClusterRoleBinding of the [`Optional`] permissions (none without).
    pub fn optional_manifests(&self, namespace: &str) -> Vec<Value> {
        let Some(optional) = self.optional else { return Vec::new() };
        let name = format!("{}-{}", self.name, optional.suffix);
        let labels = json!({"app.kubernetes.io/name": "runwarden", "app.kubernetes.io/component": self.component});
        let subject = json!([{"kind": "ServiceAccount", "name": self.name, "namespace": namespace}]);
        vec![
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                   "metadata": {"name": name, "labels": labels}, "rules": rules(optional.permissions)}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": name, "labels": labels},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
                   "subjects": subject}),
        ]
    }

    /// A Role and RoleBinding of the [`Listed`] permission in each granted namespace, for the
    /// component's ServiceAccount in `namespace`.
    pub fn listed_manifests(&self, namespace: &str, grants: &[Grant]) -> Vec<Value> {
        let Some(listed) = self.listed else { return Vec::new() };
        let name = format!("{}-{}", self.name, listed.suffix);
        let labels = json!({"app.kubernetes.io/name": "runwarden", "app.kubernetes.io/component": self.component});
        let subject = json!([{"kind": "ServiceAccount", "name": self.name, "namespace": namespace}]);
        let mut out = Vec::new();
        for g in grants {
            let mut rule = rules(&[listed.permission]).remove(0);
            if !g.names.is_empty() {
                rule["resourceNames"] = json!(g.names);
            }
            out.push(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                            "metadata": {"name": name, "namespace": g.namespace, "labels": labels}, "rules": [rule]}));
            out.push(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                            "metadata": {"name": name, "namespace": g.namespace, "labels": labels},
                            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                            "subjects": subject}));
        }
        out
    }

    fn header(&self) -> String {
        let mut out =
            format!("# Generated from {} by `make generate`. Do not edit.\n# Why each permission:\n", self.source);
        for p in self
            .cluster
            .iter()
            .chain(self.namespaced)
            .chain(self.runner)
            .chain(self.listed.iter().map(|l| &l.permission))
            .chain(self.optional.iter().flat_map(|o| o.permissions))
        {
            let group = if p.group.is_empty() { "core" } else { p.group };
            out.push_str(&format!("#   {group} {} [{}]: {}\n", p.resource, p.verbs.join(", "), p.why));
        }
        out
    }

    /// The manifests as one YAML document stream, with each permission's reason as a comment.
    pub fn yaml(&self, namespace: &str) -> String {
        let mut out = self.header();
        for m in self.manifests(namespace) {
            out.push_str("---\n");
            out.push_str(&serde_yaml::to_string(&m).expect("manifests serialize"));
        }
        out
    }

    /// The Helm chart's template of the manifests: in the release's namespace, with the runner
    /// permissions in a Role in each of `.Values.runnerNamespaces` when it is set (and in the
    /// ClusterRole when it is not).
    pub fn chart_yaml(&self) -> String {
        const NS: &str = "{{ .Release.Namespace }}";
        const MARK: &str = "runwarden-runner-namespace";
        let mut out = self.header();
        out.push_str("# Runner permissions: cluster-wide, or only in .Values.runnerNamespaces when set.\n");
        // Render with one runner namespace named MARK, then turn what is about it into template.
        let optional = self.optional_manifests(NS);
        for m in self.manifests_for(NS, &[MARK.to_string()]).into_iter().filter(|m| !optional.contains(m)) {
            let text = serde_yaml::to_string(&m).expect("manifests serialize");
            if m["metadata"]["namespace"] == MARK {
                out.push_str("{{- range .Values.runnerNamespaces }}\n---\n");
                out.push_str(&text.replace(MARK, "{{ . }}").replace(NS, "{{ $.Release.Namespace }}"));
                out.push_str("{{- end }}\n");
                continue;
            }
            out.push_str("---\n");
            out.push_str(&text);
            if m["kind"] == "ClusterRole" && !self.runner.is_empty() {
                out.push_str("{{- if not .Values.runnerNamespaces }}\n");
                let runner = serde_yaml::to_string(&rules(self.runner)).expect("rules serialize");
                out.push_str(&runner);
                out.push_str("{{- end }}\n");
            }
        }
        if let Some(listed) = self.listed {
            // Rendered for one grant of one name, MARK, then templated over the value's list.
            out.push_str(&format!(
                "# {}: only on the objects listed in .Values.{} (no names: all of that namespace's).\n",
                listed.permission.resource, listed.value
            ));
            out.push_str(&format!("{{{{- range .Values.{} }}}}\n", listed.value));
            let grant = Grant { namespace: MARK.to_string(), names: vec![MARK.to_string()] };
            for m in self.listed_manifests(NS, &[grant]) {
                let text = serde_yaml::to_string(&m).expect("manifests serialize");
                let names = format!("  resourceNames:\n  - {MARK}\n");
                assert!(m["kind"] != "Role" || text.contains(&names), "a Role's rule names its objects: {text}");
                let templated = "{{- with .names }}\n  resourceNames:\n  {{- toYaml . | nindent 2 }}\n{{- end }}\n";
                out.push_str("---\n");
                out.push_str(
                    &text
                        .replace(&names, templated)
                        .replace(MARK, "{{ .namespace }}")
                        .replace(NS, "{{ $.Release.Namespace }}"),
                );
            }
            out.push_str("{{- end }}\n");
        }
        if let Some(o) = self.optional {
            out.push_str(&format!(
                "# Only when it is used: {{{{ {} }}}}.\n{{{{- if {} }}}}\n",
                o.condition, o.condition
            ));
            for m in optional {
                out.push_str("---\n");
                out.push_str(
                    &serde_yaml::to_string(&m).expect("manifests serialize").replace(NS, "{{ .Release.Namespace }}"),
                );
            }
            out.push_str("{{- end }}\n");
        }
        out
    }

    /// The [`Optional`] permissions `client` lacks (for when the feature is on), as
    /// [`Self::missing`] says them.
    pub async fn missing_optional(&self, client: &Client) -> Result<Vec<String>, kube::Error> {
        let mut missing = Vec::new();
        for p in self.optional.iter().flat_map(|o| o.permissions) {
            for verb in p.verbs {
                if !allowed(client, p, verb, None).await? {
                    let group = if p.group.is_empty() { "core" } else { p.group };
                    missing.push(format!("{verb} {group}/{}", p.resource));
                }
            }
        }
        Ok(missing)
    }

    /// The permissions `client` lacks, as `verb group/resource[ in namespace]`, asked of the API
    /// server with SelfSubjectAccessReviews (`namespace` is the component's own; the runner
    /// permissions are checked in each of `runner_namespaces`, or cluster-wide when empty).
    pub async fn missing(
        &self,
        client: &Client,
        namespace: &str,
        runner_namespaces: &[String],
    ) -> Result<Vec<String>, kube::Error> {
        let mut missing = Vec::new();
        let mut checks: Vec<(&Permission, Option<&str>)> = self
            .cluster
            .iter()
            .map(|p| (p, None))
            .chain(self.namespaced.iter().map(|p| (p, Some(namespace))))
            .collect();
        if runner_namespaces.is_empty() {
            checks.extend(self.runner.iter().map(|p| (p, None)));
        } else {
            for ns in runner_namespaces {
                checks.extend(self.runner.iter().map(|p| (p, Some(ns.as_str()))));
            }
        }
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
