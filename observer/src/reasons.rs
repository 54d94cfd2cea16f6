//! The kernel's reset reasons (`enum sk_rst_reason`, 6.10+) as `reason` label values.
//!
//! The numbers differ between kernel versions, so the table is read from the running kernel's
//! BTF at start-up ([`crate::probes::btf::KernelBtf::reset_reasons`]); everything that names a
//! reason (classification, the exposition, the event log) asks this table.

use std::collections::BTreeMap;

/// Names of the kernel's RST reasons (`enum sk_rst_reason`, 6.10+), by value.
#[derive(Debug, Clone, Default)]
pub struct ResetReasons {
    names: BTreeMap<u32, String>,
}

impl ResetReasons {
    /// Builds the table from `enum sk_rst_reason` members, value → name
    /// (`SK_RST_REASON_NO_SOCKET` → `no_socket`).
    pub fn from_names(values: impl IntoIterator<Item = (u32, String)>) -> Self {
        Self { names: values.into_iter().map(|(v, name)| (v, reason_label(&name))).collect() }
    }

    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (u32, &'a str)>) -> Self {
        Self { names: pairs.into_iter().map(|(v, n)| (v, reason_label(n))).collect() }
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The `reason` label for a value: the kernel's name, `not_specified` when the kernel gave
    /// none ([`observer_common::REASON_NONE`] or an empty table), `unknown` otherwise.
    pub fn label(&self, value: u32) -> &str {
        if value == observer_common::REASON_NONE || self.names.is_empty() {
            return "not_specified";
        }
        self.names.get(&value).map_or("unknown", String::as_str)
    }

    /// Value of a reason by label, e.g. `tcp_abort_on_close`.
    pub fn value_of(&self, label: &str) -> Option<u32> {
        self.names.iter().find(|(_, n)| n.as_str() == label).map(|(v, _)| *v)
    }
}

/// `SK_RST_REASON_TCP_ABORT_ON_CLOSE` → `tcp_abort_on_close`.
fn reason_label(name: &str) -> String {
    name.strip_prefix("SK_RST_REASON_").unwrap_or(name).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_labels_are_lower_case_without_prefix() {
        // 6.10 and 6.18 number MPTCP_RST_EUNSPEC differently; labels come from names.
        let v6_10 = ResetReasons::from_pairs([
            (0, "SK_RST_REASON_NOT_SPECIFIED"),
            (1, "SK_RST_REASON_NO_SOCKET"),
            (9, "SK_RST_REASON_MPTCP_RST_EUNSPEC"),
        ]);
        let v6_18 = ResetReasons::from_pairs([
            (1, "SK_RST_REASON_NO_SOCKET"),
            (11, "SK_RST_REASON_TCP_ABORT_ON_CLOSE"),
            (17, "SK_RST_REASON_MPTCP_RST_EUNSPEC"),
        ]);
        assert_eq!(v6_10.label(9), "mptcp_rst_eunspec");
        assert_eq!(v6_18.label(17), "mptcp_rst_eunspec");
        assert_eq!(v6_18.label(11), "tcp_abort_on_close");
        assert_eq!(v6_10.label(0), "not_specified");
        assert_eq!(v6_18.label(99), "unknown");
        assert_eq!(v6_18.value_of("no_socket"), Some(1));
    }

    #[test]
    fn kernels_without_the_enum_report_not_specified() {
        let none = ResetReasons::default();
        assert_eq!(none.label(3), "not_specified");
        assert_eq!(none.label(observer_common::REASON_NONE), "not_specified");
    }
}
