//! Name rules shared by the CLI and the server.

/// A DNS label: 1–63 of `a-z0-9-`, not starting or ending with `-`. Namespaces, clusters, VMs and peers use it,
/// because they end up in `<vm>.<namespace>.fcdev`.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The cluster `fcdev up` makes when no `--name` is given; its VMs are `<vm>.<namespace>.fcdev` (no cluster part).
pub const DEFAULT_CLUSTER: &str = "dev";

/// The DNS suffix of every VM name.
pub const DNS_SUFFIX: &str = "fcdev";

pub fn vm_hostname(vm: &str, namespace: &str) -> String {
    format!("{vm}.{namespace}.{DNS_SUFFIX}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        assert!(is_dns_label("alice"));
        assert!(is_dns_label("n1"));
        assert!(is_dns_label("a-b"));
        assert!(!is_dns_label(""));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label("a-"));
        assert!(!is_dns_label("Alice"));
        assert!(!is_dns_label("a.b"));
        assert!(!is_dns_label("a_b"));
        assert!(!is_dns_label(&"a".repeat(64)));
    }
}
