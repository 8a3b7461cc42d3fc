//! Types shared by both resources: a destination rule (host pattern or CIDR, ports, protocol),
//! the transport protocol, the severity scale and the status condition.
//!
//! Host patterns and CIDRs are checked by CEL rules in the schema, so a bad pattern is refused
//! by `kubectl apply` with a message that names the field, before any component reads it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Most conditions in a status.
pub const MAX_CONDITIONS: usize = 8;

/// A destination that is allowed: exactly one of `host` or `cidr`, optionally limited to ports
/// and a protocol.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.host) != has(self.cidr)").message("set exactly one of host or cidr"))]
pub struct EndpointRule {
    /// DNS name of the destination, lowercase, e.g. `api.github.com`. A single leading `*.`
    /// matches every name below the rest (`*.githubusercontent.com` matches
    /// `objects.githubusercontent.com` but not `githubusercontent.com` itself). The name is the
    /// one the runner pod looked up: calls are matched through the DNS answers it received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(
        validation = Rule::new("self == self.lowerAscii()").message("must be lowercase"),
        validation = Rule::new("!self.contains('*') || (self.startsWith('*.') && self.lastIndexOf('*') == 0)")
            .message("may contain a single '*' wildcard, only as the leading label '*.'"),
        validation = Rule::new("!self.startsWith('*.') || self.substring(2).contains('.')")
            .message("a wildcard must be followed by at least two labels ('*.example.com', not '*.com')"),
        validation = Rule::new(r"self.matches('^(\\*\\.)?([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\\.)*[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$')")
            .message("must be a DNS name: labels of 1-63 letters, digits and '-', not starting or ending with '-', separated by '.'"),
    )]
    pub host: Option<String>,

    /// IP range of the destination in CIDR notation, e.g. `140.82.112.0/20` or
    /// `2606:50c0::/32`. Write a single address as `/32` (IPv4) or `/128` (IPv6). Use it for
    /// destinations called by address, without a DNS lookup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 43))]
    #[x_kube(
        validation = Rule::new("isCIDR(self)").message("must be a CIDR such as 10.0.0.0/8 or 2001:db8::/32 (a single address is 203.0.113.7/32)"),
        validation = Rule::new("!isCIDR(self) || cidr(self) == cidr(self).masked()")
            .message("must not have bits set after the prefix length (write 10.0.0.0/8, not 10.1.2.3/8)"),
    )]
    pub cidr: Option<String>,

    /// Destination ports this rule allows. Empty or absent: every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(range(min = 1, max = 65535)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub ports: Vec<u16>,

    /// Transport protocol this rule allows: `TCP` or `UDP`. Absent: both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = crate::schema::field_doc_wins)]
    pub protocol: Option<Protocol>,

    /// Why this destination is allowed, for the people who review it (free text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 200))]
    pub description: Option<String>,
}

/// Transport protocol of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
pub enum Protocol {
    /// TCP: `connect()` of a stream socket.
    #[serde(rename = "TCP")]
    Tcp,
    /// UDP: `connect()` or `sendto()` of a datagram socket (DNS, QUIC).
    #[serde(rename = "UDP")]
    Udp,
}

/// How suspicious an outbound call is, from least to most.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
pub enum Severity {
    /// Worth recording, not worth a person's attention.
    Info,
    /// Unusual but most likely benign.
    Low,
    /// New and unexplained: a person should look.
    Medium,
    /// New with signs of abuse: look now.
    High,
    /// Matches a known attack pattern (e.g. cloud metadata, tunnelling): act now.
    Critical,
}

/// Status of a condition: the standard Kubernetes values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// The controller cannot tell.
    Unknown,
}

/// One aspect of an object's state, in the shape of Kubernetes' `metav1.Condition` (with
/// bounded lengths so status stays small).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Kind of condition, CamelCase, e.g. `Ready` or `Settled`.
    #[schemars(length(min = 1, max = 64))]
    pub r#type: String,
    /// `True`, `False` or `Unknown`.
    pub status: ConditionStatus,
    /// `metadata.generation` of the object when the condition was last set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub observed_generation: Option<i64>,
    /// When `status` last changed.
    pub last_transition_time: Time,
    /// Machine-readable CamelCase reason for the last transition, e.g. `InvalidSelector`.
    #[schemars(length(min = 1, max = 128))]
    pub reason: String,
    /// Human-readable detail: what is wrong and what to do.
    #[serde(default)]
    #[schemars(length(max = 1024))]
    pub message: String,
}
